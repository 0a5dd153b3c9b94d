"""Sweep the CPU speedrun: each set of overrides is a full `launch/pretrain.py` run; prints a Markdown table.

    python bench/sweep_speedrun.py --set= --set="--train.optimizer=muon" --set="--model.pos_emb=rope --model.qk_norm=true"
    python bench/sweep_speedrun.py --sets my_sets.txt --budget 30 --repeats 2
    python bench/sweep_speedrun.py --steps 600 --set= --set="--model.activation=relu2"    # equal steps, not equal time

(Write `--set=...` with the equals sign: a value starting with -- is otherwise read as an option.)

Every run starts from configs/speedrun_cpu.yaml (or --config) with the set's overrides on top, in a fresh
run directory, on the same code path a user runs. --budget S shortens train.time_budget_s (quick sweeps;
the ranking can change with the budget, so confirm winners at the full budget). --steps N trains N steps
with no time budget instead: the loss then does not depend on the machine's speed or load, which makes
it the fair way to compare quality on a busy machine (measure speed separately). Repeats run round-robin
over the sets so that drifting background load hits every set alike. The table has the final val loss
(min and median over repeats), wall seconds of the whole process (min and median), steps reached and
tokens/s. A --sets file holds one set per line; blank lines and lines starting with # are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(args: argparse.Namespace, overrides: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--config",
        args.config,
        f"--data.source={args.source}",
        *args.common,
    ]
    if args.steps:
        cmd += [f"--train.max_steps={args.steps}", "--train.time_budget_s=0"]
    elif args.budget:
        cmd += [f"--train.time_budget_s={args.budget}"]
    cmd += [*overrides, f"--run.out_dir={out}", "--run.resume=never", "--run.overwrite=true"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-5:])
        return {"error": tail, "wall_s": wall}
    summary = json.loads((out / "summary.json").read_text())
    return {
        "val": summary["final_val_loss"],
        "wall_s": wall,
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        help='one set of overrides, quoted: --set="--train.lr=2e-2 --train.batch_size=64" (--set= is the config as it is)',
    )
    p.add_argument("--sets", dest="sets_file", help="a file with one set of overrides per line")
    p.add_argument("--config", default="configs/speedrun_cpu.yaml")
    p.add_argument(
        "--source",
        default=str(REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"),
        help="data.source (the corpus)",
    )
    p.add_argument("--budget", type=float, default=0, help="train.time_budget_s for every run (default: the config's)")
    p.add_argument(
        "--steps", type=int, default=0, help="train exactly this many steps, no time budget (equal-steps comparison)"
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="/tmp/sweep_speedrun", help="run directories and results.jsonl go here")
    p.add_argument("--common", default="", help='overrides added to every run: --common="--data.dir=/tmp/data"')
    args = p.parse_args()
    args.common = shlex.split(args.common)
    sets = list(args.sets)
    if args.sets_file:
        lines = Path(args.sets_file).read_text().splitlines()
        sets += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not sets:
        p.error("give at least one --set or --sets FILE")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "prepare.py"),
            "--config",
            args.config,
            f"--data.source={args.source}",
            *args.common,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if prep.returncode != 0:
        sys.exit(prep.stderr)
    mode = f"{args.steps} steps each" if args.steps else f"time budget {args.budget or 'from the config'} s"
    print(
        f"# speedrun sweep {time.strftime('%Y-%m-%d %H:%M')}: {args.config}, {mode}, {args.repeats} repeat(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[int, list[dict]] = {i: [] for i in range(len(sets))}
    with open(out / "results.jsonl", "a") as log:
        for r in range(args.repeats):
            for i, overrides in enumerate(sets):
                res = run_once(args, shlex.split(overrides), out / f"set{i}_rep{r}")
                res.update(set=overrides, repeat=r, load_after=round(os.getloadavg()[0], 2))
                results[i].append(res)
                log.write(json.dumps(res) + "\n")
                log.flush()
                shown = f"val {res['val']:.4f}" if "val" in res else f"FAILED: {res['error']}"
                print(
                    f"  [{r + 1}/{args.repeats}] {overrides or '(config)'}: {shown}, {res['wall_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

    print(
        "\n| overrides | final val (min) | final val (median) | wall s (min) | wall s (median) | steps | tokens/s (whole run) |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, overrides in enumerate(sets):
        ok = [res for res in results[i] if "val" in res]
        if not ok:
            print(f"| `{overrides or '(config)'}` | failed | | | | | |")
            continue
        val, wall = [res["val"] for res in ok], [res["wall_s"] for res in ok]
        steps = statistics.median(res["steps"] for res in ok)
        tok = statistics.median(res["tokens_per_s"] or 0 for res in ok)
        print(
            f"| `{overrides or '(config)'}` | {min(val):.4f} | {statistics.median(val):.4f} | {min(wall):.1f} | {statistics.median(wall):.1f} | {steps:.0f} | {tok:,.0f} |"
        )


if __name__ == "__main__":
    main()
