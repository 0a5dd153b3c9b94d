"""Does finetuning pay? The Shakespeare char model adapted to the Sonnets, against the same model trained on
the Sonnets alone from scratch for the same time; and SFT's masked response loss before and after.

    python bench/finetune_sonnets.py                                  # pretrains the parent first (~5 min)
    python bench/finetune_sonnets.py --parent runs/shakespeare_char_cpu
    python bench/finetune_sonnets.py --quick                          # a smoke parent and 3 s budgets: checks the plumbing

Every run is launched as a user launches it (launch/pretrain.py, launch/finetune.py with the shipped
configs), except the from-scratch baseline, which has no launch script: it is `Trainer` on the very
arrays the text finetune trains on (the Sonnets encoded with the parent's tokenizer, '(' and ')'
dropped), with the parent's shape, fresh weights, the pretrain recipe of configs/shakespeare_char_cpu.yaml
(its optimizer, learning rates and warmup), and the finetune's dropout, evaluation settings and time budget. So the two
runs see the same tokens, vocabulary, val split and seconds. A char pretrain on the Sonnets
instead would build its own vocabulary (with the parentheses, without '$', '&', '3'), and its losses
would not be comparable.

Losses are from launch/evaluate.py: every token of the val split once, deterministic (SFT: the
response tokens only, as in training). Writes OUT/results.json and OUT/report.md, prints the report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIST_GPT_SHARED", REPO.parent / "shared"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
SONNETS = SHARED / "data" / "sonnets" / "sonnets_gut.txt"
QUIET = ["--log.wandb=false", "--log.progress=false"]
TEXT_PROMPT = "When"
SFT_PROMPT = "XX\nA woman's face with nature's own hand painted,"  # held out: sonnet 20


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    """launch/SCRIPT (or a .py path) with args; stop with its stderr if it fails."""
    cmd = [sys.executable, script if script.endswith(".py") and "/" in script else str(REPO / "launch" / script), *args]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{script} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def seconds(row: dict) -> str:
    return f"{row['train_s']:.0f} s" if row["train_s"] else "none"


def evaluate(run_dir: Path, data_dir: Path) -> float:
    out = run("evaluate.py", "--run", str(run_dir), f"--data.dir={data_dir}", "--json")
    return json.loads(out.stdout)["loss"]


def sample(run_dir: Path, chat: bool, tokens: int) -> str:
    prompt = SFT_PROMPT if chat else TEXT_PROMPT
    args = [
        "--run",
        str(run_dir),
        "--prompt",
        prompt,
        "--max_new_tokens",
        str(tokens),
        "--temperature",
        "0.8",
        "--seed",
        "1337",
    ]
    return run("sample.py", *args, *(["--chat"] if chat else [])).stdout.rstrip("\n")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def scratch(parent_dir: Path, data_dir: Path, out: Path, finetune_config: Path, budget: float) -> None:
    """The baseline: the parent's shape with fresh weights, trained on the finetune's prepared arrays (see the docstring)."""
    import yaml

    from dist_gpt.config import load_config
    from dist_gpt.rundir import load_run
    from dist_gpt.stages import pretrain_job, train
    from dist_gpt.tracking import log

    ft = yaml.safe_load(finetune_config.read_text())
    parent = load_run(parent_dir)
    t = ft["train"]
    same = [
        f"--train.{k}={t[k]}"
        for k in ("batch_size", "eval_interval", "eval_iters", "log_interval", "sample_prompt", "sample_tokens")
    ]
    cfg = load_config(
        str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
        [
            f"--run.out_dir={out}",
            f"--data.dir={data_dir}",
            f"--data.name={data_dir.name}",
            f"--data.source={SONNETS}",
            "--data.unknown=drop",
            f"--train.time_budget_s={budget}",
            *same,
            *QUIET,
        ],
        "pretrain",
    )
    cfg.model = parent.config.model
    cfg.model.dropout = ft["model"]["dropout"]
    cfg.data.vocab_size = parent.tokenizer.vocab_size
    log(f"from scratch: {cfg.model.n_layer} x {cfg.model.n_embd}, lr {cfg.train.lr}, {budget} s on {data_dir}")
    train(cfg, "pretrain", pretrain_job, tokenizer=parent.tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--parent",
        type=Path,
        help="an existing shakespeare_char_cpu run directory (default: pretrain one into OUT/parent)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/finetune_sonnets_bench"),
        help="where the runs and the report go (default: %(default)s)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="seconds per finetune and for the baseline (default: the configs' train.time_budget_s)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke parent and 3 s budgets: checks the plumbing, measures nothing"
    )
    p.add_argument("--no_lora", action="store_true", help="skip the LoRA SFT run")
    # the baseline, run in its own process
    p.add_argument("--scratch", nargs=3, metavar=("PARENT", "DATA_DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    text_cfg, sft_cfg = REPO / "configs" / "finetune_sonnets.yaml", REPO / "configs" / "sft_sonnets.yaml"
    budget = args.budget or (3.0 if args.quick else 0.0)
    if args.scratch:
        import yaml

        parent, data_dir, out = map(Path, args.scratch)
        scratch(
            parent, data_dir, out, text_cfg, budget or yaml.safe_load(text_cfg.read_text())["train"]["time_budget_s"]
        )
        return

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")  # every source is a local file
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    timing = [f"--train.time_budget_s={budget}"] if budget else []
    sample_tokens = 60 if args.quick else 400

    parent = args.parent.resolve() if args.parent else out / "parent"
    if not args.parent:
        config = (
            ["--config", "configs/smoke.yaml", "--model.block_size=96"]
            if args.quick
            else ["--config", "configs/shakespeare_char_cpu.yaml"]
        )
        run(
            "pretrain.py",
            *config,
            f"--data.source={SHAKESPEARE}",
            f"--data.dir={out / 'data_shakespeare'}",
            f"--run.out_dir={parent}",
            *QUIET,
        )
    text_data, sft_data = out / "data_sonnets", out / "data_sonnets_sft"
    common = [f"--finetune.init_from={parent}", f"--data.source={SONNETS}", *timing, *QUIET]

    started = time.time()
    ft_text = run(
        "finetune.py", "--config", str(text_cfg), *common, f"--data.dir={text_data}", f"--run.out_dir={out / 'text'}"
    )
    dropped = next((line for line in ft_text.stderr.splitlines() if "outside the vocabulary" in line), "")
    run(
        str(Path(__file__).resolve()),
        "--scratch",
        str(parent),
        str(text_data),
        str(out / "scratch"),
        *(["--budget", str(budget)] if budget else []),
    )
    run("finetune.py", "--config", str(sft_cfg), *common, f"--data.dir={sft_data}", f"--run.out_dir={out / 'sft'}")
    if not args.no_lora:
        run(
            "finetune.py",
            "--config",
            str(sft_cfg),
            *common,
            "--finetune.lora_rank=8",
            "--train.lr=1e-3",
            "--train.max_steps=10",
            f"--data.dir={sft_data}",
            f"--run.out_dir={out / 'sft_lora'}",
        )

    text_rows = [
        ("pretrained parent (Tiny Shakespeare only)", parent),
        ("text finetune of the parent", out / "text"),
        ("same model, Sonnets only, from scratch", out / "scratch"),
    ]
    sft_rows = [("pretrained parent", parent), ("SFT, all weights", out / "sft")] + (
        [] if args.no_lora else [("SFT, LoRA rank 8", out / "sft_lora")]
    )
    results = {
        "load_average_at_start": load,
        "wall_s": round(time.time() - started, 1),
        "unknown_characters": dropped,
        "text": [
            {
                "run": name,
                "dir": str(d),
                "val_loss": evaluate(d, text_data),
                "train_s": summary(d)["wall_s"] if d != parent else None,
            }
            for name, d in text_rows
        ],
        "sft": [
            {
                "run": name,
                "dir": str(d),
                "val_loss": evaluate(d, sft_data),
                "train_s": summary(d)["wall_s"] if d != parent else None,
            }
            for name, d in sft_rows
        ],
        "samples": {name: sample(d, chat=False, tokens=sample_tokens) for name, d in text_rows}
        | {f"{name} (--chat)": sample(d, chat=True, tokens=sample_tokens) for name, d in sft_rows},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    lines = [
        f"Sonnets val loss (nats/char; launch/evaluate.py over the whole val split; load average {load:.2f} at start). {dropped}",
        "",
        "| model | Sonnets val loss | training |",
        "|---|---|---|",
        *(f"| {r['run']} | {r['val_loss']:.4f} | {seconds(r)} |" for r in results["text"]),
        "",
        "SFT on sonnet pairs (prompt: number and first line; response: the rest); masked response val loss over the 15 held-out sonnets:",
        "",
        "| model | response val loss | training |",
        "|---|---|---|",
        *(f"| {r['run']} | {r['val_loss']:.4f} | {seconds(r)} |" for r in results["sft"]),
        "",
    ]
    for name, text in results["samples"].items():
        lines += [f"**{name}** (temperature 0.8, seed 1337):", "", "```", text, "```", ""]
    report = "\n".join(lines)
    (out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
