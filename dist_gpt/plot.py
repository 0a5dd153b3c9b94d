"""Loss curves from runs' metrics.jsonl (no W&B needed): `python launch/plot.py RUN_DIR [RUN_DIR ...] --out loss.png [--log]`.

Two panels, loss against optimizer steps and against tokens seen. Each run gets one colour: its
training loss (the logged mini-batch losses, thin) and its validation loss (the evaluations, with
markers). `--log` puts the loss axis on a log scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_gpt.config import clip
from dist_gpt.errors import UserError


@dataclass
class Curves:
    """One run's losses by step, with the tokens seen at each of those steps."""

    name: str
    train: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, train_loss)
    val: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, val_loss)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(run_dir: str | Path) -> Curves:
    """The train and val losses of RUN_DIR/metrics.jsonl. A line that is not a JSON object with numbers (cut short
    by a crash, or damaged) is skipped, as is a non-finite loss (a step skipped for a NaN)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"{run_dir} is a file, not a run directory: pass run directories written by pretrain or finetune"
        )
    if not path.is_file():
        raise UserError(f"{path} not found: pass a run directory written by pretrain or finetune")
    curves = Curves(run_dir.resolve().name)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not (_number(row.get("step")) and _number(row.get("tokens"))):
            continue
        step, tokens = row["step"], row["tokens"]
        if _number(row.get("train_loss")):
            curves.train.append((step, tokens, row["train_loss"]))
        if _number(row.get("val_loss")):
            curves.val.append((step, tokens, row["val_loss"]))
    if not curves.train and not curves.val:
        raise UserError(f"{path} holds no losses yet")
    return curves


def check_out(out: str | Path) -> Path:
    """--out: a .png file name (not a folder)."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {clip(str(out))}")
    if out.is_dir():
        raise UserError(f"--out {clip(str(out))} is a folder; name a .png file")
    return out


def plot_runs(runs: list[Curves], out: str | Path | None = None, log_y: bool = False) -> Any:
    """A matplotlib Figure with the two panels; written to `out` (PNG, atomically) when given."""
    out = check_out(out) if out is not None else None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from dist_gpt.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for ax, x in zip(axes, (0, 1), strict=True):
            if run.train:
                ax.plot(
                    [r[x] for r in run.train],
                    [r[2] for r in run.train],
                    color=color,
                    linewidth=0.8,
                    alpha=0.6,
                    label=f"{run.name} train",
                )
            if run.val:
                ax.plot(
                    [r[x] for r in run.val],
                    [r[2] for r in run.val],
                    color=color,
                    linewidth=1.8,
                    marker="o",
                    markersize=3,
                    label=f"{run.name} val",
                )
    for ax, xlabel in zip(axes, ("optimizer step", "tokens seen"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        if log_y:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3.5, not 3.5 x 10^0
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("loss vs steps")
    axes[1].set_title("loss vs tokens")
    axes[1].legend(fontsize="small")
    if out is not None:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def main(args: list[str]) -> Path:
    """The `launch/plot.py` command."""
    from dist_gpt.cli import ArgParser

    p = ArgParser(
        prog="launch/plot.py",
        description="Plot train and val loss of one or more runs against steps and tokens, from RUN_DIR/metrics.jsonl.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (their metrics.jsonl); several are overlaid"
    )
    p.add_argument("--out", default="loss.png", metavar="FILE.png", help="where to write the plot (default: loss.png)")
    p.add_argument("--log", action="store_true", help="log-scale loss axis")
    opts = p.parse_args(args)
    check_out(opts.out)  # before reading anything
    plot_runs([read_metrics(r) for r in opts.runs], opts.out, opts.log)
    print(f"wrote {opts.out}")
    return Path(opts.out)
