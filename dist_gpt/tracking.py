"""What a run reports: `metrics.jsonl`, `samples.jsonl`, W&B (through Accelerate) and the progress bar.

Only the main process writes. `metrics.jsonl` is enough to plot a run; W&B is optional and never
touches the network without credentials (it then runs offline into RUN_DIR/wandb, or WANDB_DIR/wandb).
W&B's own variables WANDB_DIR, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_NAME and WANDB_RUN_ID (set by
`wandb agent` in a sweep) are respected; an explicit log.project or log.run_name wins over the variable.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dist_gpt.io import atomic_write_text, disk_error


def log(msg: str) -> None:
    """A status line for humans: stderr, so stdout stays clean for data."""
    print(msg, file=sys.stderr, flush=True)


def wandb_init_args(
    cfg: Any, run_dir: Path, wandb_id: str | None, env: Mapping[str, str] = os.environ
) -> tuple[str, dict[str, Any]]:
    """(project, keyword arguments of wandb.init) for this run, W&B's environment variables taken into account."""
    project = cfg.log.project if "log.project" in cfg.explicit else env.get("WANDB_PROJECT") or cfg.log.project
    kwargs = {
        "name": cfg.log.run_name or env.get("WANDB_NAME") or run_dir.name,
        "id": env.get("WANDB_RUN_ID")
        or wandb_id,  # a sweep agent names the run it started; otherwise ours, kept across resumes
        "resume": "allow",
        "dir": env.get("WANDB_DIR") or str(run_dir),
    }
    kwargs |= {key: env[var] for key, var in (("entity", "WANDB_ENTITY"), ("group", "WANDB_RUN_GROUP")) if env.get(var)}
    return project, kwargs


def wandb_mode_for(wandb_dir: str | Path) -> str:
    """Decide how W&B runs without ever prompting: the user's WANDB_MODE, online with credentials, else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if has_key:
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log(
        f"W&B: no credentials found, logging offline into {Path(wandb_dir) / 'wandb'} (upload later with `wandb sync`; --log.wandb=false turns it off)"
    )
    return "offline"


def append_line(path: Path, line: str) -> None:
    """One JSON line at the end of a log; a full disk (or any OS failure) is one UserError naming the file. A line cut
    short by the failure is dropped when the run resumes (`_truncate_jsonl` stops at a torn line)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise disk_error(path, e) from None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a killed run
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class Tracker:
    """Metrics and samples to JSONL files and W&B, plus the progress bar. A no-op off the main process."""

    def __init__(self, accelerator, run, cfg, start_step: int, elapsed_s: float, wandb_id: str | None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        run_dir = self.run_dir = run.path
        self.metrics_path, self.samples_path = run.metrics, run.samples
        self.use_wandb = cfg.log.wandb
        self.sample_rows: list[list[Any]] = []
        if self.main:  # a resumed run rewrites what came after its checkpoint; a fresh start keeps nothing
            _truncate_jsonl(self.metrics_path, start_step if start_step else -1)
            _truncate_jsonl(self.samples_path, start_step if start_step else -1)
        if self.use_wandb:
            project, init = wandb_init_args(cfg, run_dir, wandb_id)
            if self.main:
                wandb_mode_for(init["dir"])
            accelerator.init_trackers(project, config=cfg.to_dict(), init_kwargs={"wandb": init})
        # the bar counts steps, or seconds when a time budget ends the run (its ETA is then the budget's)
        self.by_time = cfg.train.time_budget_s > 0
        total, done = (
            (round(cfg.train.time_budget_s), round(elapsed_s)) if self.by_time else (cfg.train.max_steps, start_step)
        )
        unit = "s" if self.by_time else "step"
        self.bar = tqdm(
            total=total,
            initial=done,
            disable=not (self.main and cfg.log.progress),
            unit=unit,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        append_line(self.metrics_path, json.dumps(record))
        if self.use_wandb:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def sample(self, step: int, prompt: str, text: str) -> None:
        if not self.main:
            return
        append_line(self.samples_path, json.dumps({"step": step, "prompt": prompt, "text": text}, ensure_ascii=False))
        if self.use_wandb:
            import wandb

            self.sample_rows.append([step, text])
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({"samples": wandb.Table(columns=["step", "text"], data=self.sample_rows)}, step=step)

    def progress(self, step: int, elapsed_s: float, **postfix: Any) -> None:
        if self.by_time:
            self.bar.n = min(round(elapsed_s), self.bar.total)
            postfix = {"step": step, **postfix}
        else:
            self.bar.n = step
        self.bar.set_postfix(postfix, refresh=True)

    def write(self, msg: str) -> None:
        """A status line from the main process that does not break the progress bar."""
        if self.main:
            self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.use_wandb:
            for tracker in self.accelerator.trackers:
                tracker.finish()  # not accelerator.end_training(): that also ends the process group, which the trainer still uses
