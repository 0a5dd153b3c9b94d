"""Training throughput: the pretrain loop (launch/pretrain.py, Accelerate) against a plain PyTorch loop.

Both train the same GPT on the same prepared data with the same micro-batch, precision, optimizer and
thread count; the plain loop is the lecture's: get_batch, forward, backward, clip, AdamW step. They
alternate (pretrain, plain, pretrain, plain, ...) so drift hits both alike; tokens/s are taken after
warm-up steps, eval excluded. Prints a Markdown table with min and median.

    OMP_NUM_THREADS=2 python bench/train_throughput.py --config configs/shakespeare_char_cpu.yaml \
        --data.source=../shared/data/tinyshakespeare/input.txt --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_gpt.config import load_config  # noqa: E402
from dist_gpt.hardware import decide  # noqa: E402
from dist_gpt.model import GPT  # noqa: E402
from dist_gpt.optim import make_optimizer  # noqa: E402
from dist_gpt.prepare import prepare  # noqa: E402
from dist_gpt.tokenizers import load_tokenizer  # noqa: E402


def pretrain_tokens_per_s(args: argparse.Namespace, overrides: list[str], out: Path) -> float:
    """Run launch/pretrain.py for --steps steps; the median tokens/s of its logged intervals after warm-up."""
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", args.config, *overrides]
    cmd += [
        f"--run.out_dir={out}",
        "--run.resume=never",
        "--run.overwrite=true",
        f"--train.max_steps={args.steps}",
        "--train.time_budget_s=0",
    ]
    cmd += [
        f"--train.eval_interval={args.steps}",
        "--train.eval_iters=1",
        "--train.sample_tokens=0",
        "--train.log_interval=1",
        f"--train.checkpoint_interval={args.steps}",
        "--log.wandb=false",
        "--log.progress=false",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "train_loss" in r and r["step"] > args.warmup]
    return statistics.median(rates)


def plain_tokens_per_s(args: argparse.Namespace, cfg, data: np.ndarray) -> float:
    """The lecture's loop, no Accelerate: median tokens/s per step after warm-up."""
    torch.manual_seed(0)
    model = GPT(cfg.model)
    t = cfg.train
    opt = make_optimizer(model, t)
    precision = decide(cfg.model, t, torch.device("cpu")).precision
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    B, T = t.batch_size, cfg.model.block_size
    gen = torch.Generator().manual_seed(0)
    rates = []
    for step in range(args.steps):
        start = time.perf_counter()
        for _ in range(t.grad_accum):
            ix = torch.randint(len(data) - T - 1, (B,), generator=gen).numpy()
            x = torch.from_numpy(np.stack([data[i : i + T] for i in ix]).astype(np.int64))
            y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + T] for i in ix]).astype(np.int64))
            with autocast:
                _, loss = model(x, y)
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            rates.append(B * T * t.grad_accum / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shakespeare_char_cpu.yaml")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements of each loop")
    args, overrides = p.parse_known_args()
    cfg = load_config(args.config, overrides, "pretrain")
    prepare(cfg.data, data_dir=cfg.data_dir, log=lambda m: None)
    cfg.model.vocab_size = cfg.model.vocab_size or load_tokenizer(cfg.data_dir / "tokenizer.json").vocab_size
    data = np.memmap(
        cfg.data_dir / "train.bin", dtype=json.loads((cfg.data_dir / "meta.json").read_text())["dtype"], mode="r"
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            ours.append(pretrain_tokens_per_s(args, overrides, Path(tmp) / f"run{i}"))
            plain.append(plain_tokens_per_s(args, cfg, data))
            print(f"repeat {i}: pretrain {ours[-1]:,.0f} tok/s, plain {plain[-1]:,.0f} tok/s", file=sys.stderr)
    m = cfg.model
    print(
        f"\n{args.config}: {m.n_layer}x{m.n_head}x{m.n_embd}, block {m.block_size}, micro-batch {cfg.train.batch_size} x {cfg.train.grad_accum}, "
        f"precision {decide(m, cfg.train, torch.device('cpu')).precision}, {torch.get_num_threads()} threads, {args.steps} steps ({args.warmup} warm-up), {args.repeats} repeats\n"
    )
    print("| loop | tokens/s min | tokens/s median |\n|---|---|---|")
    print(f"| launch/pretrain.py (Accelerate) | {min(ours):,.0f} | {statistics.median(ours):,.0f} |")
    print(f"| plain PyTorch | {min(plain):,.0f} | {statistics.median(plain):,.0f} |")
    print(f"| ratio (median) | | {statistics.median(ours) / statistics.median(plain):.3f} |")


if __name__ == "__main__":
    main()
