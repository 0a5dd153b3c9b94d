"""Peak memory and step time of a training step with train.activation_checkpointing = none, every_2 and full.

    python bench/activation_checkpointing.py                          # the lecture model's shape, batch 8, on CPU
    python bench/activation_checkpointing.py --device cuda --batch 64 --steps 10

Each setting runs in a fresh process (peak memory is a high-water mark): the GPT of the given shape, wrapped by
`runtime.checkpoint_blocks` as the trainer wraps it, AdamW from `optim.make_optimizer`, random tokens, fp32.
Memory: on CPU the process's peak RSS (getrusage) and that peak above the RSS once the weights, gradients and AdamW
moments exist, i.e. what the steps' activations added; on CUDA torch's max_memory_allocated (and the same difference).
Step time: min and median of --steps timed steps after one warm-up step (on a shared, loaded machine the min is the
better estimate). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("none", "every_2", "full")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace) -> dict:
    """One setting, in this process: {"peak", "base", "times"}."""
    import torch

    from dist_gpt.config import TrainConfig
    from dist_gpt.model import GPT, GPTConfig
    from dist_gpt.optim import make_optimizer
    from dist_gpt.runtime import checkpoint_blocks

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = GPTConfig(
        vocab_size=65, block_size=args.block, n_layer=args.layers, n_head=args.heads, n_embd=args.embd, dropout=0.0
    )
    model = GPT(cfg).to(device)
    checkpoint_blocks(model, args.child)
    opt = make_optimizer(model, TrainConfig())
    for p in model.parameters():  # gradients and AdamW moments exist before the first measured step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    x = torch.randint(0, 65, (args.batch, args.block), device=device)
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        _, loss = model(x, x, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "base": base, "times": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    shape = f"{args.layers} x {args.heads} x {args.embd}, block {args.block}, batch {args.batch}"
    print(
        f"# activation checkpointing {time.strftime('%Y-%m-%d %H:%M')}: {shape}, {args.device}, fp32, threads {os.environ.get('OMP_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for setting in SETTINGS:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", setting],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append((setting, json.loads(out.stdout.strip().splitlines()[-1])))
    none_act = rows[0][1]["peak"] - rows[0][1]["base"]
    what = "max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"\n| train.activation_checkpointing | {what} MiB | above weights + grads + AdamW, MiB | vs none | step s (min) | step s (median) |"
    )
    print("|---|---|---|---|---|---|")
    for setting, r in rows:
        act = r["peak"] - r["base"]
        print(
            f"| {setting} | {r['peak'] / 2**20:,.0f} | {act / 2**20:,.0f} | {act / none_act:.2f}x | "
            f"{min(r['times']):.2f} | {statistics.median(r['times']):.2f} |"
        )


if __name__ == "__main__":
    main()
