"""Muon's optimizer step with the Newton-Schulz iteration in fp32 and in bf16, against AdamW's, on one model.

The speedrun model (configs/speedrun_cpu.yaml's shape) with random gradients; each optimizer steps in turn,
`--rounds` times; prints min and median milliseconds per step. Process CPU time by default (other jobs on
the cores move it far less than wall time; use --threads 1 for that), --clock wall on a quiet machine.

    python bench/muon_ns_dtype.py --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_gpt.config import GPTConfig, TrainConfig  # noqa: E402
from dist_gpt.model import GPT  # noqa: E402
from dist_gpt.optim import make_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            n_layer=4,
            n_head=4,
            n_embd=128,
            block_size=64,
            dropout=0.0,
            vocab_size=65,
            activation="relu2",
            pos_emb="rope",
            qk_norm=True,
        )
    )
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizers = {"adamw": make_optimizer(model, TrainConfig(optimizer="adamw"))}
    for name, dtype in (("muon, Newton-Schulz fp32", torch.float32), ("muon, Newton-Schulz bf16", torch.bfloat16)):
        optimizers[name] = make_optimizer(model, TrainConfig(optimizer="muon"))
        optimizers[name].ns_dtype = dtype
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, opt in optimizers.items():
            start = clock()
            opt.step()
            times[name].append(clock() - start)
    print(
        f"# torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds, {args.clock} time; speedrun model 4 x 4 x 128"
    )
    print("| optimizer | min ms | median ms |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts[1:]) * 1e3:.1f} | {statistics.median(ts[1:]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
