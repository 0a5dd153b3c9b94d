"""Sampling speed with and without the KV cache, for the lecture model (random weights), on the CPU.

    OMP_NUM_THREADS=1 python bench/sample.py                     # 500 new tokens from a 1-token prompt, 5 repeats
    python bench/sample.py --max_new_tokens 20 --repeats 1       # a quick check that it runs

Prints Markdown rows for BENCHMARKS.md (min and median over the repeats) and the thread count used.
Repeats alternate between the two modes so that background load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dist_gpt.hardware import cpu_info
from dist_gpt.model import GPT, GPTConfig

LECTURE = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)


def time_generate(model: GPT, max_new_tokens: int, use_cache: bool, seed: int) -> tuple[float, torch.Tensor]:
    idx = torch.zeros(1, 1, dtype=torch.long)  # a 1-token prompt
    start = time.perf_counter()
    out = model.generate(idx, max_new_tokens, generator=torch.Generator().manual_seed(seed), use_cache=use_cache)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per run (default: 500)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode (default: 5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(**LECTURE)).eval()
    for use_cache in (True, False):  # warm-up: allocator, kernels
        time_generate(model, min(20, args.max_new_tokens), use_cache, args.seed)

    times: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, torch.Tensor] = {}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            seconds, outputs[use_cache] = time_generate(model, args.max_new_tokens, use_cache, args.seed)
            times[use_cache].append(seconds)
    same = torch.equal(outputs[True], outputs[False])

    n = args.max_new_tokens
    print(
        f"lecture model {model.num_params(non_embedding=False):,} parameters (6 layers x 6 heads x 384, block 256, vocab 65), random weights"
    )
    print(
        f"{n} new tokens from a 1-token prompt, {args.repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_info().describe()}"
    )
    print(f"cached and recomputed samples identical: {same}")
    print()
    print("| sampling | new tokens | threads | min s | median s | tokens/s (best) | tokens/s (median) |")
    print("|---|---|---|---|---|---|---|")
    for use_cache, label in ((True, "KV cache"), (False, "no cache (recompute window)")):
        best, median = min(times[use_cache]), statistics.median(times[use_cache])
        print(
            f"| {label} | {n} | {torch.get_num_threads()} | {best:.3f} | {median:.3f} | {n / best:.1f} | {n / median:.1f} |"
        )
    speedup = statistics.median(times[False]) / statistics.median(times[True])
    print(f"\nKV cache speedup (median): {speedup:.1f}x")


if __name__ == "__main__":
    main()
