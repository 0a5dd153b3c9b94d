"""The run directory: weights in and out, atomic resumable checkpoints, resume discovery, the run lock.

    RUN_DIR/
      config.yaml  tokenizer.json  model.safetensors  summary.json  metrics.jsonl  samples.jsonl
      checkpoints/step_000500/  model.safetensors optimizer.safetensors trainer.json
                                rng_rank{R}.json rng_rank{R}.safetensors  MANIFEST.json

A checkpoint is written into `checkpoints/.tmp_step_N/`, every file fsynced, then `MANIFEST.json`
(size and SHA-256 of each file) last, then the folder is renamed to `step_N`. Only a folder whose
manifest matches its files counts; resume skips anything else with a warning. Nothing is ever
unpickled: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write, disk_error, fsync_dir, read_json

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"


# ----------------------------------------------------------------------------- weights


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically (contiguous CPU copies, so any state dict works)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: _save_file(flat, tmp, metadata))


def load_weights(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file, or raise a UserError naming the file when it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{what} {path} is corrupt or truncated ({e}); restore it or use another checkpoint") from None


# ----------------------------------------------------------------------------- loading a finished run


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: Any
    config: Any
    run_dir: Path


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """A run directory's model (in eval mode, on `device`), tokenizer and config."""
    import yaml

    from dist_gpt.config import from_dict
    from dist_gpt.model import GPT
    from dist_gpt.tokenizers import load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir} (pass the directory that pretrain/finetune printed)")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run directory: config.yaml is missing")
    try:
        cfg = from_dict(yaml.safe_load(config_path.read_text()))
    except yaml.YAMLError as e:
        raise UserError(f"{config_path} is corrupt: {e}") from None
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    state = load_weights(run_dir / "model.safetensors", "model weights")
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{run_dir / 'model.safetensors'} does not match the model in config.yaml: {str(e).splitlines()[0]}") from None
    return LoadedRun(model=model.to(device).eval(), tokenizer=tokenizer, config=cfg, run_dir=run_dir)


# ----------------------------------------------------------------------------- resumable checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_durable(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], jsons: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/step_N` completely or not at all, then keep only the newest `keep`."""
    root = run_dir / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, state in tensors.items():
            flat = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
            _write_durable(tmp / name, lambda p, flat=flat: _save_file(flat, p))
        for name, obj in jsons.items():
            _write_durable(tmp / name, lambda p, obj=obj: p.write_text(json.dumps(obj)))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write_durable(tmp / MANIFEST, lambda p: p.write_text(json.dumps({"step": step, "files": files}, indent=1)))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(tmp, e) from None
    for old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first (complete or not)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)  # by number: step_1000000 is newer than step_999999


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong (naming the file)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{manifest_path} is corrupt"
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != expected["bytes"]:
            return f"{f} is truncated or altered ({f.stat().st_size} bytes, expected {expected['bytes']})"
        if _sha256(f) != expected["sha256"]:
            return f"{f} is corrupt (SHA-256 does not match the manifest)"
    return None


def find_resumable(run_dir: Path, warn) -> Path | None:
    """The newest complete checkpoint. Each broken newer one is reported through `warn` and renamed
    `broken_step_N` (kept for inspection, never resumed, never counted by the rotation)."""
    for path in list_checkpoints(run_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        aside = path.with_name(f"broken_{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        warn(f"warning: skipping checkpoint {path.name}: {problem}; moved it to {aside.name} and falling back to an older one")
    return None


def clean_partial_checkpoints(run_dir: Path) -> None:
    """Remove `.tmp_step_*` folders left by a save that was killed."""
    for tmp in (run_dir / CHECKPOINTS).glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint_json(path: Path, name: str) -> Any:
    return read_json(path / name, "checkpoint file")


def read_checkpoint_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_weights(path / name, "checkpoint file")


# ----------------------------------------------------------------------------- the run lock


class RunLock:
    """`RUN_DIR/.lock` holding the owner's host and PID, so two live runs never share a directory."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self, log) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"] and not _pid_alive(owner.get("pid", -1))):
                    log(f"removing a stale lock {self.path} left by {owner or 'an unreadable owner'} (that process is gone)")
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f"run directory {self.path.parent} is in use by a live run (PID {owner.get('pid')} on {owner.get('host')}); "
                    f"wait for it to finish, stop it, or choose another --run.out_dir (delete {self.path} only if that run is dead)"
                ) from None
            except OSError as e:
                raise UserError(f"cannot create {self.path}: {e.strerror}; is the run directory writable?") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, json.JSONDecodeError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed but not yet reaped) counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
