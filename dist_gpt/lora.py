"""LoRA adapters on the GPT's projections (with `peft`), merged back into a plain GPT for saving.

    model = attach(GPT(config), rank=8, alpha=16.0, dropout=0.0)   # base weights frozen, adapters trainable
    plain = merged_state_dict(model.state_dict(), scale=16.0 / 8)    # loads into GPT(config), no peft needed

peft's `inject_adapter_in_model` swaps each targeted nn.Linear for a `lora.Linear` in place: the model
stays our `GPT` (its `generate`, `config`, ...), and its state dict gains, per targeted layer,
`<layer>.base_layer.{weight,bias}` and `<layer>.lora_{A,B}.default.weight`. The layer computes
W x + b + scale * B A x, so the merged weight is W + scale * B @ A. Merging here is a pure function of a
state dict (the training module is never changed in place), so training can go on after a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_gpt.checkpoint import save_weights
from dist_gpt.io import atomic_write_json

TARGETS = ("c_attn", "c_proj", "c_fc")  # attention q,k,v and output projections, MLP in and out
ADAPTER = "default"  # peft's name for the one adapter
BASE = ".base_layer."


def attach(model: torch.nn.Module, rank: int, alpha: float, dropout: float) -> torch.nn.Module:
    """Inject rank-`rank` adapters into every targeted Linear of `model` (in place) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft pulls in transformers (seconds)

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS), bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return model


def is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The plain GPT state dict of a LoRA model's state dict: W + scale * B @ A for each adapted layer, new tensors only."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_adapter_key(key):
            continue
        if BASE not in key:
            out[key] = value
            continue
        layer, _, leaf = key.partition(BASE)
        if leaf == "weight":
            A = state[f"{layer}.lora_A.{ADAPTER}.weight"]  # (r, in)
            B = state[f"{layer}.lora_B.{ADAPTER}.weight"]  # (out, r)
            value = (value.float() + scale * (B.float() @ A.float())).to(value.dtype)
        out[f"{layer}.{leaf}"] = value
    return out


def save_adapter(
    state: dict[str, torch.Tensor], run_dir: Path, rank: int, alpha: float, dropout: float, base: str
) -> None:
    """RUN_DIR/adapter.safetensors (the lora_* tensors alone, under the training module's names) and adapter_config.json."""
    save_weights({k: v for k, v in state.items() if is_adapter_key(k)}, run_dir / "adapter.safetensors")
    atomic_write_json(
        run_dir / "adapter_config.json",
        {
            "kind": "lora",
            "rank": rank,
            "alpha": alpha,
            "scale": alpha / rank,
            "dropout": dropout,
            "target_modules": list(TARGETS),
            "adapter_name": ADAPTER,
            "base": base,
        },
    )
