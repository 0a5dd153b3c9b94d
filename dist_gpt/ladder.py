"""The lecture ladder: rerun "Let's build GPT" one idea at a time and see what each idea buys.

    python launch/ladder.py [--scale cpu|lecture] [--out DIR] [--rungs 01,05] [--section.key=value ...]

Each rung is a pretrain config: configs/lecture/NN_name.yaml holds the lecture's hyperparameters,
configs/lecture/cpu/NN_name.yaml the CPU scale (the same time budget for every rung). Every rung is the
same `GPT` with different switches, trained by launch/pretrain.py in a subprocess into OUT/NN_name/;
a rerun skips finished rungs and resumes an interrupted one. Then OUT/ladder.md (a table of the final
val losses beside the lecture's, plus a sample of each rung) and OUT/ladder.png (the val-loss curves).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_gpt.checkpoint import TrainState
from dist_gpt.cli import config_path
from dist_gpt.config import Config, GPTConfig, load_config, parse_overrides
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write, atomic_write_text
from dist_gpt.model import GPT
from dist_gpt.rundir import read_config, read_summary
from dist_gpt.tracking import log

PRETRAIN = Path(__file__).resolve().parents[1] / "launch" / "pretrain.py"
SCALES = ("cpu", "lecture")


@dataclass(frozen=True)
class Rung:
    name: str  # config file stem and run directory name
    adds: str  # the idea this rung adds to the one before
    lecture_val_loss: float  # what the lecture reports for this step on Tiny Shakespeare


RUNGS = (
    Rung("01_bigram", "bigram lookup table", 2.49),
    Rung("02_self_attention", "one self-attention head, 8-char context", 2.40),
    Rung("03_multi_head", "4 heads instead of 1", 2.28),
    Rung("04_feed_forward", "feed-forward layer (ReLU)", 2.24),
    Rung("05_residual_blocks", "3 blocks, residual connections, 4x MLP", 2.08),
    Rung("06_layernorm", "pre-norm LayerNorm", 2.06),
    Rung("07_dropout_scaled", "scaled up, dropout", 1.48),
)


def rung_config_file(rung: Rung, scale: str) -> str:
    return config_path(f"lecture/cpu/{rung.name}.yaml" if scale == "cpu" else f"lecture/{rung.name}.yaml")


# ----------------------------------------------------------------------------- command line

USAGE = """
usage: python launch/ladder.py [--scale cpu|lecture] [--out DIR] [--rungs 01,02,...] [--section.key=value ...] [--debug]

Rerun the journey of "Let's build GPT": seven models, each adding one idea to the one before
(bigram table, self-attention, multi-head, feed-forward, residual blocks, LayerNorm, scale + dropout),
trained one after the other with launch/pretrain.py, then a Markdown table and a plot of their val losses.

  --scale lecture   the lecture's hyperparameters (configs/lecture/*.yaml); the last rung needs a GPU.
                    The default when a GPU is present.
  --scale cpu       every rung trains for the same 150 s on a CPU (configs/lecture/cpu/*.yaml), about
                    18 minutes in all. The default without a GPU.
  --out DIR         where the runs, ladder.md and ladder.png go (default runs/lecture or runs/lecture_cpu)
  --rungs LIST      only these rungs, by number (e.g. --rungs 01,02,03)
  --section.key=v   passed to every rung's pretrain, e.g. --data.source=PATH (offline) or --log.wandb=true

Rerunning the same command skips finished rungs, resumes an interrupted one, and rewrites the report.
"""


@dataclass
class LadderArgs:
    scale: str
    out: Path
    rungs: tuple[Rung, ...]
    overrides: list[str] = field(default_factory=list)


def _select(spec: str) -> tuple[Rung, ...]:
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = []
    for w in wanted:
        match = [r for r in RUNGS if r.name == w or r.name[:2] == w.zfill(2)]
        if not match:
            raise UserError(f"--rungs: no rung {w!r}; the rungs are {', '.join(r.name for r in RUNGS)}")
        chosen.append(match[0])
    if not chosen:
        raise UserError("--rungs needs at least one rung, e.g. --rungs 01,02")
    return tuple(r for r in RUNGS if r in chosen)


def parse_ladder_args(args: list[str]) -> LadderArgs:
    if "-h" in args or "--help" in args:
        print(USAGE.strip())
        sys.exit(0)
    opts: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in ("--scale", "--out", "--rungs"):
            if not eq:
                if i + 1 >= len(args):
                    raise UserError(f"{name} needs a value (see --help)")
                value = args[i + 1]
                i += 1
            opts[name[2:]] = value
        else:
            rest.append(args[i])
        i += 1
    scale = opts.get("scale") or ("lecture" if torch.cuda.is_available() else "cpu")
    if scale not in SCALES:
        raise UserError(f"--scale must be cpu or lecture, got {scale!r}")
    overrides = [f"--{key}={value}" for key, value in parse_overrides(rest)]
    if any(o.startswith("--run.out_dir=") for o in overrides):
        raise UserError("each rung trains into OUT/<rung>: choose the folder with --out DIR, not --run.out_dir")
    out = Path(opts.get("out") or ("runs/lecture_cpu" if scale == "cpu" else "runs/lecture"))
    return LadderArgs(
        scale=scale, out=out, rungs=_select(opts["rungs"]) if "rungs" in opts else RUNGS, overrides=overrides
    )


# ----------------------------------------------------------------------------- training the rungs


def rung_overrides(rung: Rung, a: LadderArgs) -> list[str]:
    """The user's overrides, then the rung's run directory."""
    return [*a.overrides, f"--run.out_dir={a.out / rung.name}"]


def is_finished(run_dir: Path, cfg: Config) -> bool:
    """The run reached train.max_steps or spent train.time_budget_s (a summary is written at every checkpoint)."""
    summary = read_summary(run_dir)
    return summary is not None and TrainState(step=summary["steps"], elapsed_s=summary["wall_s"]).finished(cfg.train)


def train_rung(args: list[str]) -> int:
    """Run launch/pretrain.py in a subprocess that shares this terminal; its exit code."""
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), *args])
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it write its checkpoint and exit
        proc.wait()
        raise


def ladder(args: list[str]) -> None:
    """The `launch/ladder.py` command: train every rung not yet finished, then write the report."""
    a = parse_ladder_args(args)
    configs = {
        r.name: load_config(rung_config_file(r, a.scale), rung_overrides(r, a), "pretrain") for r in a.rungs
    }  # a typo fails now, not in rung 5
    log(f"lecture ladder, {a.scale} scale: {len(a.rungs)} rungs into {a.out}")
    for k, rung in enumerate(a.rungs, 1):
        run_dir = a.out / rung.name
        if is_finished(run_dir, configs[rung.name]):
            log(f"[{k}/{len(a.rungs)}] {rung.name}: finished earlier, skipping")
            continue
        log(f"\n[{k}/{len(a.rungs)}] {rung.name}: {rung.adds}")
        code = train_rung(["--config", rung_config_file(rung, a.scale), *rung_overrides(rung, a)])
        if code != 0:
            raise UserError(
                f"rung {rung.name} failed (exit code {code}; its error is above); fix it and rerun the same command to continue"
            )
    results = [read_result(r, a.out / r.name) for r in a.rungs]
    table = write_report(results, a.out, a.scale)
    print(table)
    log(f"\nreport: {a.out / 'ladder.md'}, plot: {a.out / 'ladder.png'}")


# ----------------------------------------------------------------------------- reading the runs


@dataclass
class RungResult:
    rung: Rung
    model: str  # shape in words
    params: int
    evals: list[dict]  # metrics.jsonl rows holding a val_loss, in order
    sample: str = ""  # the text generated at the last evaluation

    @property
    def final(self) -> dict:
        return self.evals[-1]


def describe_model(m: GPTConfig) -> str:
    if m.kind == "bigram":
        return f"{m.vocab_size}x{m.vocab_size} table"
    text = f"{m.n_layer}L {m.n_head}H {m.n_embd}d, ctx {m.block_size}"
    return text + (f", dropout {m.dropout:g}" if m.dropout else "")


def count_params(m: GPTConfig) -> int:
    """Every parameter, position embedding included (the lecture's count), without allocating the weights."""
    with torch.device("meta"):
        return GPT(m).num_params(non_embedding=False)


def read_result(rung: Rung, run_dir: Path) -> RungResult:
    """A rung's config.yaml, metrics.jsonl and samples.jsonl, reduced to what the report shows."""
    try:
        cfg = read_config(run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError as e:
        raise UserError(f"rung {rung.name} has not been trained: {e.filename} is missing") from None
    except UserError as e:
        raise UserError(f"rung {rung.name} has not been trained or its run is damaged: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"rung {rung.name}: a file in {run_dir} is corrupt ({e}); delete that folder and rerun the ladder to train the rung again"
        ) from None
    evals = [r for r in rows if "val_loss" in r]
    if not evals:
        raise UserError(
            f"rung {rung.name}: {run_dir / 'metrics.jsonl'} holds no evaluation yet; rerun the ladder to finish it"
        )
    samples_path = run_dir / "samples.jsonl"
    samples = (
        [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
        if samples_path.is_file()
        else []
    )
    return RungResult(
        rung=rung,
        model=describe_model(cfg.model),
        params=count_params(cfg.model),
        evals=evals,
        sample=samples[-1]["text"] if samples else "",
    )


# ----------------------------------------------------------------------------- the report

COLUMNS = ("step", "adds", "model", "params", "train steps", "val loss", "change", "lecture", "time (s)")


def markdown_table(results: list[RungResult]) -> str:
    """One row per rung; `change` is the val loss minus the previous row's, flagged when it is not a gain."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    previous = None
    for r in results:
        val = r.final["val_loss"]
        change = "" if previous is None else f"{val - previous:+.3f}" + (" (no gain)" if val >= previous else "")
        cells = (
            r.rung.name,
            r.rung.adds,
            r.model,
            f"{r.params:,}",
            f"{r.final['step']:,}",
            f"{val:.3f}",
            change,
            f"{r.rung.lecture_val_loss:.2f}",
            f"{r.final['elapsed_s']:.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
        previous = val
    return "\n".join(lines)


def stalled(results: list[RungResult]) -> list[tuple[RungResult, RungResult]]:
    """(previous, rung) pairs where the rung's final val loss is not below the previous one's."""
    return [(a, b) for a, b in zip(results, results[1:], strict=False) if b.final["val_loss"] >= a.final["val_loss"]]


def report_text(results: list[RungResult], scale: str) -> str:
    table = markdown_table(results)
    parts = [
        f"# The lecture ladder ({scale} scale)",
        "",
        table,
        "",
        "val loss: the last evaluation of each run, the mean loss over the same fixed batches of the validation split. "
        'lecture: the val loss "Let\'s build GPT" reports for that step. time: seconds of training, evaluations included. '
        "params: every parameter, position embedding included.",
    ]
    for a, b in stalled(results):
        parts += [
            "",
            f"**{b.rung.name} is not better than {a.rung.name}** (val loss {b.final['val_loss'] - a.final['val_loss']:+.3f}): at this budget its idea did not pay off.",
        ]
    parts += ["", "![val loss of every rung](ladder.png)", "", "## The last sample of each rung", ""]
    for r in results:
        parts += [f"{r.rung.name}:", "", "```text", r.sample.strip("\n")[:300], "```", ""]
    return "\n".join(parts)


def plot_curves(results: list[RungResult], path: Path, title: str) -> None:
    """Val loss against training seconds and against optimizer steps (log scale), one line per rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in results:
        line = by_time.plot(
            [e["elapsed_s"] for e in r.evals], [e["val_loss"] for e in r.evals], marker=".", label=r.rung.name
        )[0]
        later = [e for e in r.evals if e["step"] > 0]
        by_step.plot([e["step"] for e in later], [e["val_loss"] for e in later], marker=".", color=line.get_color())
    finals = [r.final["val_loss"] for r in results]
    by_time.set_ylim(min(finals) - 0.1, max(3.0, max(finals) + 0.1))
    by_time.set(xlabel="training time (s)", ylabel="val loss")
    by_step.set(xlabel="optimizer step", xscale="log")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(results: list[RungResult], out: Path, scale: str) -> str:
    """OUT/ladder.md and OUT/ladder.png; returns the table."""
    atomic_write_text(out / "ladder.md", report_text(results, scale) + "\n")
    plot_curves(
        results,
        out / "ladder.png",
        f"Let's build GPT, one idea at a time ({scale} scale): val loss on Tiny Shakespeare",
    )
    return markdown_table(results)
