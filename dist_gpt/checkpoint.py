"""Resumable checkpoints: named parts saved and restored together, atomically, sealed by a manifest.

    parts = {"train": state, "model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "loader": loader,
             "rng": RNGState()}
    checkpointer = Checkpointer(run.checkpoints, accelerator, keep=2)
    checkpointer.save(step, parts)      # every rank calls it; the main process writes
    checkpointer.restore(path, parts)   # every rank reads

A part is anything with `state_dict()` / `load_state_dict()`; its state may mix tensors and JSON values. On disk
(format 2), for a checkpoint `checkpoints/step_000500/`:

    trainer.json               {"format": 2, "parts": {name: the part's state without its tensors}}
    NAME.safetensors           the part's tensors, keyed by their path in the state ("state/transformer.wte.weight/exp_avg")
    NAME_rank{R}.json|.safetensors   the same for a per-rank part (`per_rank = True`: the RNG)
    MANIFEST.json              {"format": 2, "step": N, "files": {name: {"bytes", "sha256"}}}, written last

The folder is written as `.tmp_step_N/`, every file fsynced, the manifest last, then renamed. A checkpoint counts only
when the manifest is valid JSON, lists exactly the files in the folder (plain names, nothing outside it), and every
file's size and SHA-256 match; otherwise resume skips it with a warning and falls back to an older one. Nothing is ever
unpickled. Checkpoints written before the parts existed (format 1, a flat trainer.json) still restore.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write, disk_error, fsync_dir, read_json, sha256_file

MANIFEST = "MANIFEST.json"
TRAINER = "trainer.json"
FORMAT = 2
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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


# ----------------------------------------------------------------------------- the parts


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where the run is: what the loop counts, what it measured, and the batching it was trained with."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    elapsed_s: float = 0.0
    wandb_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    world_size: int = 1
    tokens_per_step: int = 0
    batch_size: int = 0
    grad_accum: int = 1
    block_size: int = 0
    eval_iters: int = 0  # batches per split at each evaluation (0: not decided yet; see Trainer.evaluate)

    def finished(self, t: Any) -> bool:
        """The run reached train.max_steps or spent train.time_budget_s."""
        return self.step >= t.max_steps or (t.time_budget_s > 0 and self.elapsed_s >= t.time_budget_s)

    def record_val(self, val_loss: float) -> None:
        self.last_val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)


class ModelState:
    """The model's full (unsharded) state dict under plain GPT names, whatever wraps it (DDP, FSDP2, torch.compile).

    torch's distributed state-dict utilities strip the wrappers' prefixes (`module.`, `_orig_mod.`) and gather FSDP
    shards; the full tensors land on the main process (others get an empty dict). Every rank must call both methods.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        try:
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as e:
            detail = " ".join(str(e).splitlines()[:2]).strip()[:300]
            raise UserError(
                f"the checkpoint holds a model of another shape than the config asks for ({detail}); "
                "keep the model section of the run you resume, or start a new one with another --run.out_dir"
            ) from None


class OptimizerState:
    """The optimizer's full state dict (moments and step counts keyed by parameter name, and the param groups).

    On load, the moments and counts come from the checkpoint and every hyperparameter from the current optimizer,
    built from the current config: a resumed run takes a changed train.lr, betas or weight decay.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if len(state["param_groups"]) != len(configured):
            raise UserError(
                f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this run's {len(configured)}: resume with the same train.optimizer"
            )
        groups = [
            {**hyper, "params": saved["params"]} for saved, hyper in zip(state["param_groups"], configured, strict=True)
        ]
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            {**state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True),
        )


class RNGState:
    """This rank's random generators: Python, NumPy, torch's CPU generator and the current CUDA device's."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state(legacy=False)
        state = {
            "python": random.getstate(),
            "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = state["numpy"]
        np.random.set_state(
            {
                **np_state,
                "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]},
            }
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- tensors <-> files


def _split(state: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    """`state` without its tensors, which go into `tensors` keyed by their path ("a/b/c")."""
    if isinstance(state, torch.Tensor):
        tensors["/".join(path)] = state
        return None
    if isinstance(state, dict):
        out = {}
        for key, value in state.items():
            kept = _split(value, (*path, str(key)), tensors)
            if kept is not None or not isinstance(value, torch.Tensor):
                out[key] = kept
        return out
    return state


def _join(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split`."""
    state = {} if state is None else state
    for key, tensor in tensors.items():
        node = state
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = tensor
    return state


# ----------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores named parts as `checkpoints/step_N/` folders; keeps the newest `keep` complete ones."""

    def __init__(self, root: Path, accelerator: Any, keep: int):
        self.root, self.acc, self.keep = Path(root), accelerator, keep

    def save(self, step: int, parts: dict[str, Stateful]) -> dict[str, Any] | None:
        """Every rank calls this. Sharded parts are gathered (collectives, in the order of `parts`), per-rank parts sent to
        the main process, which writes the folder and gets the saved states back (None elsewhere)."""
        states = {name: part.state_dict() for name, part in parts.items() if not getattr(part, "per_rank", False)}
        ranked = {
            name: self._gather(part.state_dict()) for name, part in parts.items() if getattr(part, "per_rank", False)
        }
        if self.acc.is_main_process:
            files: dict[str, dict[str, torch.Tensor]] = {}
            skeletons: dict[str, Any] = {}
            for name, state in states.items():
                tensors: dict[str, torch.Tensor] = {}
                skeletons[name] = _split(state, (), tensors)
                if tensors:
                    files[f"{name}.safetensors"] = tensors
            jsons: dict[str, Any] = {TRAINER: {"format": FORMAT, "parts": skeletons}}
            for name, per_rank in ranked.items():
                for r, state in enumerate(per_rank):
                    tensors = {}
                    jsons[f"{name}_rank{r}.json"] = _split(state, (), tensors)
                    files[f"{name}_rank{r}.safetensors"] = tensors
            self._write(step, files, jsons)
        self.acc.wait_for_everyone()
        return states if self.acc.is_main_process else None

    def restore(self, path: Path, parts: dict[str, Stateful]) -> set[str]:
        """Load every part from the checkpoint at `path`, in the order of `parts`; a part the checkpoint lacks keeps its
        state. Returns the names of the parts restored."""
        states = read_parts(path, self.acc.process_index)
        for name, part in parts.items():
            if name in states:
                part.load_state_dict(states[name])
        return set(states) & set(parts)

    def _gather(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        if self.acc.num_processes == 1:
            return [state]
        from accelerate.utils import gather_object

        return gather_object([state])

    def _write(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], jsons: dict[str, Any]) -> Path:
        """Write `step_N` completely or not at all, then keep only the newest `keep`."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp_step_{step:06d}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, state in tensors.items():
                flat = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
                _write_durable(tmp / name, lambda p, flat=flat: _save_file(flat, p))
            for name, obj in jsons.items():
                _write_durable(tmp / name, lambda p, obj=obj: p.write_text(json.dumps(obj)))
            files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
            _write_durable(
                tmp / MANIFEST,
                lambda p: p.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1)),
            )
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(tmp, e) from None
        for old in list_checkpoints(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _write_durable(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def read_parts(path: Path, rank: int = 0) -> dict[str, Any]:
    """Every part's state in the checkpoint at `path` (this rank's for per-rank parts); format 1 is converted."""
    head = read_json(path / TRAINER, "checkpoint file")
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        return _read_format1(path, head, rank)
    states = {}
    for name, skeleton in head["parts"].items():
        file = path / f"{name}.safetensors"
        states[name] = _join(skeleton, load_weights(file, "checkpoint file")) if file.is_file() else skeleton
    for file in sorted(path.glob(f"*_rank{rank}.json")):
        name = file.name[: -len(f"_rank{rank}.json")]
        tensors = path / f"{name}_rank{rank}.safetensors"
        states[name] = _join(
            read_json(file, "checkpoint file"), load_weights(tensors, "checkpoint file") if tensors.is_file() else {}
        )
    return states


def read_train_state(path: Path) -> TrainState:
    """The TrainState of a checkpoint, without loading any tensor (to plan a resume before building anything)."""
    head = read_json(path / TRAINER, "checkpoint file")
    state = TrainState()
    state.load_state_dict(head["parts"]["train"] if head.get("format") == FORMAT else head)
    return state


def _read_format1(path: Path, head: dict[str, Any], rank: int) -> dict[str, Any]:
    """A checkpoint written before the parts existed: a flat trainer.json, optimizer.safetensors keyed "param/slot"."""
    train = TrainState()
    train.load_state_dict(head)
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_weights(path / "optimizer.safetensors", "checkpoint file").items():
        name, _, slot = key.rpartition("/")
        optimizer.setdefault(name, {})[slot] = tensor
    states: dict[str, Any] = {
        "train": train.state_dict(),
        "model": load_weights(path / "model.safetensors", "checkpoint file"),
        "optimizer": {"state": optimizer, "param_groups": head["param_groups"]},
        "loader": head["loader"],
    }
    if head.get("scaler"):
        states["scaler"] = head["scaler"]
    rng = path / f"rng_rank{rank}.json"
    if rng.is_file():
        tensors = load_weights(path / f"rng_rank{rank}.safetensors", "checkpoint file")
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        states["rng"] = {
            **read_json(rng, "checkpoint file"),
            "torch": tensors["torch"],
            **({"cuda": cuda[0]} if cuda else {}),
        }
    return states


# ----------------------------------------------------------------------------- finding a checkpoint to resume


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root` (a run's checkpoints/), newest first (complete or not)."""
    if not root.is_dir():
        return []
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    # by number: step_1000000 is newer than step_999999
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong (naming the file)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return f"{manifest_path} is corrupt"
    for name in files:
        if not _NAME.fullmatch(name) or name in (".", "..", MANIFEST):
            return f"{manifest_path} names a file outside the checkpoint ({name[:80]!r})"
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if present - set(files):
        return f"{path} holds files its manifest does not list ({', '.join(sorted(present - set(files))[:3])})"
    missing = [n for n in (TRAINER, "model.safetensors") if n not in files]
    if missing:
        return f"{manifest_path} does not list {missing[0]}"
    for name, expected in files.items():
        f = path / name
        if not f.is_file() or f.is_symlink():
            return f"{f} is missing"
        if f.stat().st_size != expected["bytes"]:
            return f"{f} is truncated or altered ({f.stat().st_size} bytes, expected {expected['bytes']})"
        if sha256_file(f) != expected["sha256"]:
            return f"{f} is corrupt (SHA-256 does not match the manifest)"
    return None


def find_resumable(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint under `root`. Each broken newer one is reported through `warn` and renamed
    `broken_step_N` (kept for inspection, never resumed, never counted by the rotation)."""
    for path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        aside = path.with_name(f"broken_{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        warn(
            f"warning: skipping checkpoint {path.name}: {problem}; moved it to {aside.name} and falling back to an older one"
        )
    return None


def clean_partial_checkpoints(root: Path) -> None:
    """Remove `.tmp_step_*` folders left by a save that was killed."""
    for tmp in root.glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
