"""The run directory: the only code that knows its files and the rules for creating, resuming, overwriting and locking it.

    RUN_DIR/
      .dist_gpt_run   the marker: dist_gpt created this directory as a run (JSON: stage, data and tokenizer fingerprints)
      .lock           held (flock) by the live process training into it
      config.yaml  tokenizer.json  parent.json (finetunes)  model.safetensors  summary.json  metrics.jsonl  samples.jsonl
      checkpoints/step_000500/ ...   (checkpoint.py)
      profile/        profiler traces and memory snapshots (log.profile_steps; profiling.py)

The rules (docs/fault_tolerance.md lists them with their tests):
- dist_gpt writes only into an empty (or new) directory or one of its own runs; never into any other folder, a folder
  that holds runs, a finetune's own parent, or anything above them.
- Opening a run writes nothing but the lock. The run's files are (re)written only when training really starts
  (`begin`), after the command's settings were checked against what the directory holds; `run.overwrite` clears the
  old run only then.
- A run that holds a trained model but no checkpoint is never silently retrained.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dist_gpt.checkpoint import (
    clean_partial_checkpoints,
    find_resumable,
    list_checkpoints,
    load_weights,
    read_train_state,
    save_weights,
)
from dist_gpt.config import MODEL_KEYS_FREE, Config, GPTConfig, read_saved_config, save_config
from dist_gpt.errors import UserError
from dist_gpt.io import FileLock, atomic_write_json, read_json
from dist_gpt.model import GPT
from dist_gpt.tokenizers import load_tokenizer
from dist_gpt.tracking import log

MARKER = ".dist_gpt_run"
LOCK = ".lock"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
PARENT = "parent.json"
MODEL = "model.safetensors"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
CHECKPOINTS = "checkpoints"
PROFILE = "profile"
REPO = Path(__file__).resolve().parents[1]


def is_run_dir(path: str | Path) -> bool:
    """True for a directory dist_gpt created as a run: it holds the marker, or (runs written before the marker
    existed) a config.yaml beside a model.safetensors or a checkpoints/ folder."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return (path / CONFIG).is_file() and ((path / MODEL).is_file() or (path / CHECKPOINTS).is_dir())


def read_marker(path: Path) -> dict[str, Any]:
    """The marker's JSON ({} for a run written before markers, or an unreadable one)."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_of(path: Path) -> str:
    """ "pretrain" or "finetune" for an existing run."""
    return read_marker(path).get("stage") or ("finetune" if (path / PARENT).is_file() else "pretrain")


def read_config(run_dir: str | Path) -> Config:
    """A run's config.yaml as a Config, or one error naming what is wrong with it."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a run directory: {CONFIG} is missing (pass the directory that pretrain/finetune printed)"
        )
    return read_saved_config(path)


# ----------------------------------------------------------------------------- loading a finished run


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    config: Config
    run_dir: Path


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """A run directory's model (in eval mode, on `device`), tokenizer and config."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir} (pass the directory that pretrain/finetune printed)")
    cfg = read_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    state = load_weights(run_dir / MODEL, "model weights")
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[
            :300
        ]  # which keys are missing, unexpected or of another shape
        raise UserError(f"{run_dir / MODEL} does not match the model in {CONFIG}: {detail}") from None
    return LoadedRun(model=model.to(device).eval(), tokenizer=tokenizer, config=cfg, run_dir=run_dir)


# ----------------------------------------------------------------------------- the lock


def is_locked(run_dir: Path) -> bool:
    """True while a live process trains into `run_dir`."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- opening a run


@dataclass
class RunDir:
    """An opened run directory: where to write, and the checkpoint to resume from (if any). Only the main process
    holds the lock and writes."""

    path: Path
    stage: str
    resume_from: Path | None = None
    existing: bool = False  # it held a run when opened
    clear: bool = False  # run.overwrite: the old run goes when training begins
    created: bool = False  # this command made the directory
    lock: FileLock | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES

    @property
    def profile(self) -> Path:
        return self.path / PROFILE

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, stage: str) -> RunDir:
        """Check `cfg.out_dir` may hold this run, lock it, and find the checkpoint to resume. Writes nothing else."""
        path = cfg.out_dir
        _check_target(path, cfg, stage)
        existed = path.exists()
        run = cls(path=path, stage=stage, existing=existed and is_run_dir(path))
        if run.existing and stage_of(path) != stage:
            raise UserError(
                f"{path} holds a {stage_of(path)} run; this {stage} needs its own directory: choose another --run.out_dir"
            )
        if run.existing and cfg.run.resume == "never" and not cfg.run.overwrite:
            raise UserError(
                f"run directory {path} already exists and run.resume=never; pass --run.overwrite=true to replace it, or choose another --run.out_dir"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create run directory {path}: {e.strerror}; choose a writable --run.out_dir"
            ) from None
        run.created = not existed
        run.lock = FileLock(path / LOCK, f"run in {path}", log)
        try:
            try:
                run.lock.acquire(wait=False)
            except UserError:
                pid = run.lock.holder()
                raise UserError(
                    f"run directory {path} is in use by a live run{f' (PID {pid})' if pid else ''}; wait for it to finish, stop it, or choose another --run.out_dir"
                ) from None
            if run.existing:
                run._find_checkpoint(cfg)
        except BaseException:
            run.release()
            raise
        return run

    def _find_checkpoint(self, cfg: Config) -> None:
        if cfg.run.resume == "never":  # (run.overwrite: checked in open)
            self.clear = True
            return
        clean_partial_checkpoints(self.checkpoints)
        had = bool(list_checkpoints(self.checkpoints))
        self.resume_from = find_resumable(self.checkpoints, log)
        if self.resume_from is None and (self.path / MODEL).is_file():
            why = (
                "no complete checkpoint survives (the broken ones were moved aside)"
                if had
                else "its checkpoints/ folder is gone"
            )
            raise UserError(
                f"{self.path} holds a trained model but {why}, so it cannot be resumed; rerunning would train again from step 0 and replace it. "
                f"To train it further, finetune from it (launch/finetune.py --finetune.init_from={self.path}); to start over, "
                "pass --run.resume=never --run.overwrite=true"
            )
        if self.resume_from is not None:
            log(f"resuming from {self.resume_from}")

    def finished(self, cfg: Config) -> bool:
        """True when the checkpoint to resume already reached the configured end (nothing to train)."""
        return self.resume_from is not None and read_train_state(self.resume_from).finished(cfg.train)

    def check_resume(self, model: GPTConfig, tokenizer: Any, data_fingerprint: str | None) -> None:
        """A resumed run must keep its model and see the tokenizer and the data it was trained with."""
        if self.resume_from is None:
            return
        saved = read_config(self.path).model
        changed = [
            f.name
            for f in fields(saved)
            if f.name not in MODEL_KEYS_FREE
            and getattr(model, f.name) != getattr(saved, f.name)
            and not (f.name == "vocab_size" and model.vocab_size == 0)  # 0: the tokenizer's, checked below
        ]
        if changed:
            ours = ", ".join(f"{k}={getattr(model, k)!r}" for k in changed)
            values = [(k, getattr(saved, k)) for k in changed]
            theirs = " ".join(f"--model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values)
            raise UserError(
                f"{self.path} was trained with another model than this command asks for ({ours}); to resume it, add {theirs} "
                "(its config.yaml has them), or choose another --run.out_dir"
            )
        mine = load_tokenizer(self.path / TOKENIZER)
        if mine.fingerprint() != tokenizer.fingerprint():
            raise UserError(
                f"{self.path} was trained with another tokenizer ({mine.kind}, {mine.vocab_size} tokens) than this command's data "
                f"({tokenizer.kind}, {tokenizer.vocab_size} tokens): resume with the data it was trained on, or choose another --run.out_dir"
            )
        theirs = read_marker(self.path).get("data_fingerprint")
        if theirs and data_fingerprint and theirs != data_fingerprint:
            raise UserError(
                f"{self.path} was trained on other data (data fingerprint {theirs[:12]}, this command's {data_fingerprint[:12]}): resume with "
                "the same data.source and data settings, or finetune from it to train on new data"
            )

    # --- writing -----------------------------------------------------------------------------------

    def begin(
        self, cfg: Config, tokenizer: Any, data_fingerprint: str | None, parent: dict[str, Any] | None = None
    ) -> None:
        """Training starts: clear an overwritten run, then write the marker, config.yaml, tokenizer.json (+ parent.json)."""
        if self.clear:
            log(f"run.overwrite=true: clearing {self.path}")
            for p in self.path.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        marker = {
            "stage": self.stage,
            "created": read_marker(self.path).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data_fingerprint": data_fingerprint,
        }
        atomic_write_json(self.path / MARKER, marker)
        save_config(cfg, self.path / CONFIG)
        tokenizer.save(self.path / TOKENIZER)
        if parent is not None:
            atomic_write_json(self.path / PARENT, {"parent": parent})

    def write_model(self, weights: dict[str, Any]) -> None:
        save_weights(weights, self.path / MODEL)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    def release(self) -> None:
        """Drop the lock; a directory this command created and never used is removed again."""
        if self.lock:
            self.lock.release()
            self.lock = None
        if self.created and {p.name for p in self.path.iterdir()} <= {LOCK}:
            shutil.rmtree(self.path, ignore_errors=True)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    return read_json(path, "run summary") if path.is_file() else None


# ----------------------------------------------------------------------------- where a run may not go


def _check_target(path: Path, cfg: Config, stage: str) -> None:
    """Refuse an out_dir that is not an empty folder or a dist_gpt run, or that would put a run over precious data."""
    real = path.resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"run.out_dir {path} exists and is not a directory: choose another --run.out_dir")
    protected = {
        Path("/"),
        Path.home().resolve(),
        REPO,
        *(REPO / d for d in ("data", "configs", "dist_gpt", "launch", "tests", "bench", "docs")),
    }
    protected |= {cfg.data_dir.resolve(), Path.cwd().resolve()}
    if real in protected or any(real in p.parents for p in (Path.cwd().resolve(), cfg.data_dir.resolve())):
        raise UserError(f"run.out_dir {path} is {_what(real, cfg)}; a run needs a folder of its own, e.g. runs/NAME")
    if stage == "finetune" and cfg.finetune.init_from and not cfg.finetune.init_from.startswith("hf:"):
        parent = Path(cfg.finetune.init_from).resolve()
        if real == parent or real in parent.parents or parent in real.parents:
            raise UserError(
                f"run.out_dir {path} is the parent run {cfg.finetune.init_from} (or contains or lies inside it): a finetune writes its own "
                "directory and never touches its parent's; choose another --run.out_dir"
            )
    if not path.is_dir() or is_run_dir(path):
        return
    entries = [p for p in path.iterdir() if p.name != LOCK]
    if not entries:
        return
    if any(p.is_dir() and (is_run_dir(p) or any(is_run_dir(q) for q in _subdirs(p))) for p in entries):
        raise UserError(f"run.out_dir {path} holds other runs; a run needs a folder of its own, e.g. {path / 'NAME'}")
    raise UserError(
        f"run.out_dir {path} is a non-empty folder that is not a dist_gpt run (no {MARKER} marker); dist_gpt writes only into new or empty "
        "folders and its own runs: choose another --run.out_dir"
    )


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _what(real: Path, cfg: Config) -> str:
    if real == REPO:
        return "the repository itself"
    if real.parent == REPO:
        return f"the repository's {real.name}/ folder"
    if real == cfg.data_dir.resolve() or real in cfg.data_dir.resolve().parents:
        return "the data folder (or above it)"
    if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        return "the current directory (or above it)"
    return "a folder dist_gpt must not write a run into"
