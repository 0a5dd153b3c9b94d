"""How many tokens must `auto`'s probe time for its bf16 / fp32 verdict to hold at the training batch?

    python bench/probe_tokens.py                                        # the speedrun model
    python bench/probe_tokens.py --config configs/shakespeare_char.yaml # the lecture model

Times one attention sublayer (SDPA and matmul) and one MLP sublayer of the config's model, forward + backward,
in fp32 and under bf16 autocast, on b = 1, 2, 4, ... whole sequences up to the batch, with the probe's own
`_fwd_bwd` and `_seconds` (an untimed warm-up call, then the fastest of 3 timed calls), and prints each time scaled to the
batch (B / b times the measured one) with the bf16 / fp32 speed ratio of the estimated step. Where a small b
gives another ratio than the whole batch, per-call costs that do not grow with b (casts, kernel set-up) are
being multiplied up: that is what hardware.PROBE_TOKENS guards against.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from dist_gpt.config import load_config
from dist_gpt.hardware import PROBE_TOKENS, _fwd_bwd, _seconds, cpu_info
from dist_gpt.model import MLP, CausalSelfAttention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/speedrun_cpu.yaml")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [], "pretrain")
    model = dataclasses.replace(cfg.model, vocab_size=65)
    B, T, C = cfg.train.batch_size, model.block_size, model.n_embd
    print(f"# {args.config}: batch {B} x {T} tokens, n_embd {C}, {model.n_head} heads; {cpu_info().describe()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; PROBE_TOKENS = {PROBE_TOKENS}")
    print("# ms per layer for the whole batch (B / b x one call), forward + backward\n")
    print(
        "| b (tokens) | attn fp32 sdpa | attn fp32 matmul | attn bf16 sdpa | attn bf16 matmul | MLP fp32 | MLP bf16 | step bf16 / fp32 speed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    sizes = sorted({min(2**k, B) for k in range(B.bit_length() + 1)})
    for b in sizes:
        x = torch.randn(b, T, C, requires_grad=True)
        ms = {}
        for precision in ("no", "bf16"):
            for impl in ("sdpa", "matmul"):
                layer = CausalSelfAttention(dataclasses.replace(model, attn_impl=impl)).train()
                ms[precision, impl] = _seconds(_fwd_bwd(layer, x, precision), math.inf) * B / b * 1e3
            ms[precision, "mlp"] = _seconds(_fwd_bwd(MLP(model).train(), x, precision), math.inf) * B / b * 1e3
        step = {p: min(ms[p, "sdpa"], ms[p, "matmul"]) + ms[p, "mlp"] for p in ("no", "bf16")}
        cells = " | ".join(
            f"{ms[k]:.1f}"
            for k in [
                ("no", "sdpa"),
                ("no", "matmul"),
                ("bf16", "sdpa"),
                ("bf16", "matmul"),
                ("no", "mlp"),
                ("bf16", "mlp"),
            ]
        )
        print(f"| {b} ({b * T:,}) | {cells} | {step['no'] / step['bf16']:.2f}x |")


if __name__ == "__main__":
    main()
