"""Expected training time of a config per GPU count, computed from FLOPs (no GPU needed, none measured).

    python bench/expected_time.py configs/gpt2_124m_fineweb.yaml configs/gpt2_124m_speedrun.yaml [--mfu 0.4]

time = (training FLOPs + evaluation FLOPs) / (GPUs x peak bf16 FLOP/s x MFU), where training FLOPs = max_steps x
tokens_per_step x GPT.estimate_flops_per_token() (6N + attention) and an evaluation is eval_iters x batch_size x
block_size tokens per split (train and val), forward only (a third of a training token). The MFU is an assumption:
0.4 is what llm.c's 45 minutes for ~10B tokens of GPT-2 small on 8 x H100 implies (printed below). Checkpoints,
compile time and data loading are not counted, and more GPUs are assumed to scale perfectly.
"""

from __future__ import annotations

import argparse

import torch

from dist_gpt.config import load_config
from dist_gpt.model import GPT
from dist_gpt.runtime import PEAK_BF16_FLOPS

GPUS = (1, 8, 16)  # 2^19 tokens per step at batch_size 32 x 1024 needs grad_accum >= 1: 16 GPUs at most
DEVICES = ("H100", "A100")


def flops_per_token(config_file: str) -> tuple[int, object]:
    cfg = load_config(config_file, [], "pretrain")
    with torch.device("meta"):  # the shape alone: no memory, no init
        model = GPT(cfg.model)
    return model.estimate_flops_per_token(), cfg


def hours(config_file: str, gpus: int, device: str, mfu: float) -> tuple[float, int]:
    per_token, cfg = flops_per_token(config_file)
    t = cfg.train
    tokens = t.max_steps * t.tokens_per_step
    evals = t.max_steps // t.eval_interval + 1
    eval_tokens = evals * 2 * t.eval_iters * t.batch_size * cfg.model.block_size
    flops = per_token * (tokens + eval_tokens / 3)
    return flops / (gpus * PEAK_BF16_FLOPS[device] * mfu) / 3600, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    args = parser.parse_args()
    per_token, _ = flops_per_token(args.configs[0])
    implied = 10e9 * per_token / (45 * 60 * 8 * PEAK_BF16_FLOPS["H100"])
    print(
        f"llm.c's 45 min for 10B tokens on 8 x H100 implies MFU {implied:.2f} at {per_token / 1e6:.0f} MFLOPs per token ({args.configs[0]})\n"
    )
    print(f"| config | tokens | FLOPs/token | {' | '.join(f'{n} x {d}' for d in DEVICES for n in GPUS)} |")
    print("|---|---:|---:|" + "---:|" * (len(GPUS) * len(DEVICES)))
    for config in args.configs:
        per_token, _ = flops_per_token(config)
        cells = []
        for device in DEVICES:
            for n in GPUS:
                h, tokens = hours(config, n, device, args.mfu)
                cells.append(f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min")
        print(f"| `{config}` | {tokens / 1e9:.2f}B | {per_token / 1e6:.0f}M | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
