"""Training steps with glibc's default allocator against `dist_gpt.runtime.keep_freed_memory()`, in fresh processes.

Each setting runs in its own process (the allocator setting lasts for the process), alternating, `--rounds` times:
dist_gpt's model and optimizer, random batches, `--steps` steps of which the first is not counted. Prints wall ms per
step (min, median), minor page faults, system and user CPU seconds per step, and the peak resident memory.

    python bench/allocator.py --model lecture --batch 32 --steps 5 --rounds 2     # 6 x 6 x 384, block 256, dropout 0.2
    python bench/allocator.py --model cpu --batch 32 --steps 20 --rounds 2        # configs/shakespeare_char_cpu.yaml's model
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(model: str, batch: int, steps: int, keep: bool) -> dict:
    """Runs inside the child process: the allocator setting first, then the steps."""
    from dist_gpt.runtime import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    import torch
    from lecture_throughput import LECTURE, train_step  # the same training step as the lecture-model benchmark

    from dist_gpt.config import GPTConfig, TrainConfig
    from dist_gpt.model import GPT
    from dist_gpt.optim import make_optimizer

    torch.manual_seed(0)
    if model == "lecture":  # configs/shakespeare_char.yaml
        cfg = GPTConfig(**LECTURE, bias=False, activation="gelu_exact", attn_impl="sdpa")
        train = TrainConfig(lr=1e-3, beta2=0.99, weight_decay=0.1)
    else:  # configs/shakespeare_char_cpu.yaml, fp32
        shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, activation="relu2")
        cfg = GPTConfig(vocab_size=65, attn_impl="sdpa", **shape)
        train = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.02)
    net = GPT(cfg)
    opt = make_optimizer(net, train, ns_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    times, start_usage = [], None
    for i in range(steps):
        x, y = (torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen) for _ in range(2))
        if i == 1:
            start_usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        train_step(net, opt, x, y)
        times.append(time.perf_counter() - start)
    end = resource.getrusage(resource.RUSAGE_SELF)
    n = steps - 1
    return {
        "kept": kept,
        "ms": [t * 1e3 for t in times[1:]],
        "faults": (end.ru_minflt - start_usage.ru_minflt) / n,
        "sys": (end.ru_stime - start_usage.ru_stime) / n,
        "user": (end.ru_utime - start_usage.ru_utime) / n,
        "rss_mb": end.ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("lecture", "cpu"), default="lecture")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="steps per process; the first is warm-up")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first is not counted)")
    if args.child:
        print(json.dumps(one_run(args.model, args.batch, args.steps, args.child == "keep")))
        return

    rows = []
    for _ in range(args.rounds):
        for mode in ("default", "keep"):
            cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch)]
            out = subprocess.run(
                [*cmd, "--steps", str(args.steps), "--child", mode], capture_output=True, text=True, cwd=REPO
            )
            if out.returncode != 0:
                sys.exit(f"error: the {mode} run failed:\n{out.stderr[-2000:]}")
            rows.append((mode, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"# {args.model} model, batch {args.batch}, steps 2-{args.steps} of each process, {args.rounds} rounds")
    print("| allocator | min ms/step | median ms/step | page faults/step | system s/step | user s/step | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows:
        name = "glibc default" if mode == "default" else f"keep_freed_memory() (took: {r['kept']})"
        print(
            f"| {name} | {min(r['ms']):,.0f} | {statistics.median(r['ms']):,.0f} | {r['faults']:,.0f} | "
            f"{r['sys']:.2f} | {r['user']:.2f} | {r['rss_mb']:,.0f} |"
        )


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    main()
