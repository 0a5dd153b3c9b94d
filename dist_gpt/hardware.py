"""Placeholder until the measured decisions land: today's capability rules behind the `decide` interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_gpt.config import GPTConfig, TrainConfig
from dist_gpt.errors import UserError


@dataclass
class Decisions:
    precision: str
    attn_impl: str
    ns_dtype: torch.dtype
    reasons: list[str] = field(default_factory=list)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def decide(model: GPTConfig, train: TrainConfig, device: torch.device) -> Decisions:
    cuda = device.type == "cuda"
    choice = train.mixed_precision
    if choice == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() and (model.n_embd >= 256 or model.attn_impl == "matmul") else "no"
    elif choice == "fp16" and not cuda:
        precision = "no"
    elif choice == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision=bf16 but this GPU has no bf16; use fp16")
    else:
        precision = choice
    attn = "sdpa" if model.attn_impl == "auto" else model.attn_impl
    return Decisions(precision, attn, torch.bfloat16)
