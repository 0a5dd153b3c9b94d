"""Attention on the CPU: SDPA against plain matmuls, in fp32 and under bf16 autocast, forward + backward.

One causal self-attention layer as the model runs it (fused q,k,v projection, attention, output
projection) at the speedrun shape, or with --layers N the whole GPT of dist_gpt.model (N blocks,
char vocabulary, `model.attn_impl` sdpa or matmul). Every variant runs once per round, in turn, so
background load hits all alike; prints ms per forward+backward (min and median over the rounds) as a
Markdown table.

    python bench/attention_bf16.py                                   # one layer, B=32 T=64 C=128 H=4, 1 and 2 threads
    python bench/attention_bf16.py --layers 4                        # the speedrun model (4 x 4 x 128)
    python bench/attention_bf16.py --layers 6 --B 16 --T 256 --C 384 --H 6 --dropout 0.2 --iters 2   # the lecture model
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gpt.model import GPT, GPTConfig


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return att @ v


class Layer(nn.Module):
    def __init__(self, C: int, H: int, attend):
        super().__init__()
        self.H, self.attend = H, attend
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        return self.c_proj(self.attend(q, k, v).transpose(1, 2).reshape(B, T, C))


def build(args: argparse.Namespace, impl: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The module to time and a function running its forward pass to a scalar loss."""
    torch.manual_seed(0)
    if not args.layers:
        layer = Layer(args.C, args.H, attend_sdpa if impl == "sdpa" else attend_matmul)
        x = torch.randn(args.B, args.T, args.C, requires_grad=True)
        return layer, lambda: layer(x).float().square().mean()
    model = GPT(
        GPTConfig(
            vocab_size=65,
            block_size=args.T,
            n_layer=args.layers,
            n_head=args.H,
            n_embd=args.C,
            dropout=args.dropout,
            attn_impl=impl,
        )
    )
    idx = torch.randint(0, 65, (args.B, args.T + 1))
    return model, lambda: model(idx[:, :-1], idx[:, 1:])[1]


def step_ms(forward: Callable[[], torch.Tensor], bf16: bool, iters: int) -> float:
    """Mean ms of `iters` forward + backward passes."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    for _ in range(iters):
        with ctx:
            loss = forward()
        loss.backward()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--C", type=int, default=128)
    p.add_argument("--H", type=int, default=4)
    p.add_argument(
        "--layers", type=int, default=0, help="time the whole GPT with this many blocks instead of one attention layer"
    )
    p.add_argument(
        "--dropout", type=float, default=0.0, help="the GPT's dropout (--layers only; the lecture model has 0.2)"
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (default: 7)")
    p.add_argument("--iters", type=int, default=10, help="forward+backward passes per round (default: 10)")
    args = p.parse_args()

    forwards = {impl: build(args, impl) for impl in ("sdpa", "matmul")}  # the same seed: the same weights and inputs
    with torch.no_grad():  # both implementations compute the same thing (in eval mode: no dropout)
        for module, _ in forwards.values():
            module.eval()
        err = (forwards["sdpa"][1]() - forwards["matmul"][1]()).abs().item()
        for module, _ in forwards.values():
            module.train()
    variants = [(threads, impl, bf16) for threads in args.threads for impl in forwards for bf16 in (False, True)]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for threads, impl, bf16 in variants:  # warm-up (oneDNN primitive caches, allocator)
        torch.set_num_threads(threads)
        step_ms(forwards[impl][1], bf16, 2)
    for _ in range(args.rounds):
        for threads, impl, bf16 in variants:
            torch.set_num_threads(threads)
            times[(threads, impl, bf16)].append(step_ms(forwards[impl][1], bf16, args.iters))

    what = (
        f"GPT {args.layers} x {args.H} x {args.C}, dropout {args.dropout}"
        if args.layers
        else f"one attention layer C={args.C} H={args.H}"
    )
    print(
        f"torch {torch.__version__}, {what}, B={args.B} T={args.T}, {args.rounds} rounds x {args.iters} fwd+bwd, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.2f}"
    )
    print(f"|loss(sdpa) - loss(matmul)| (fp32): {err:.1e}\n")
    print("| threads | attention | precision | min ms | median ms | vs fp32 sdpa (min) |")
    print("|---|---|---|---|---|---|")
    for threads, impl, bf16 in variants:
        ts, base = times[(threads, impl, bf16)], min(times[(threads, "sdpa", False)])
        print(
            f"| {threads} | {impl} | {'bf16' if bf16 else 'fp32'} | {min(ts):.2f} | {statistics.median(ts):.2f} | {base / min(ts):.2f}x |"
        )


if __name__ == "__main__":
    main()
