"""The optimizer and the learning-rate schedule: AdamW, or Muon for the hidden matrices with AdamW for the rest.

    optimizer = make_optimizer(model, cfg.train)               # AdamW (fused on CUDA) or MuonAdamW
    for g, base in zip(optimizer.param_groups, base_lrs): g["lr"] = base * lr_factor(step, elapsed_s, cfg.train)

Muon (Keller Jordan, 2024: "Muon: An optimizer for hidden layers in neural networks") keeps SGD's
Nesterov momentum but replaces each matrix's update by the nearest semi-orthogonal matrix (all
singular values 1), found with a few Newton-Schulz iterations. Embeddings, the LM head, biases and
norm gains keep AdamW. One object holding both kinds of param group saves and loads like any
optimizer (`state_dict`, `torch.distributed.checkpoint`'s get/set_optimizer_state_dict).

    groups = [{"params": adam_decay, "weight_decay": 0.1}, {"params": adam_rest, "weight_decay": 0.0},
              {"params": matrices, "muon": True, "lr": 0.02}]
    opt = MuonAdamW(groups, lr=1e-3, betas=(0.9, 0.99), momentum=0.95, ns_dtype=torch.float32)  # fp32 where bf16 is emulated

torch >= 2.9 ships `torch.optim.Muon`, but for 2-D parameters only: a model needs a second optimizer
beside it, which the trainer's checkpointing and LR schedule would have to handle twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from dist_gpt.config import TrainConfig, decay_steps
from dist_gpt.errors import UserError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton-Schulz coefficients (a, b, c) tuned for speed of convergence rather than exactness:
the singular values land near 1 (roughly 0.7-1.2), which is all Muon needs."""


def orthogonalize(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7
) -> torch.Tensor:
    """Approximately U V^T for the SVD g = U S V^T of a matrix g (..., rows, cols), by Newton-Schulz in `dtype`.

    bf16 where bf16 matmuls are native (GPUs from Ampere on, CPUs with AVX512-BF16/AMX); fp32 where bf16 is
    emulated, which makes it many times slower (dist_gpt/hardware.py decides). A stack of matrices
    (n, rows, cols) is done in one batch of matmuls.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix x x^T
        x = x.mT
    # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (..., rows, rows)
        x = a * x + (b * gram + c * gram @ gram) @ x  # odd polynomial a s + b s^3 + c s^5 of the singular values
    return (x if wide else x.mT).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with `muon=True` take Muon steps (2-D parameters only), the others AdamW steps.

    Muon: buf = momentum * buf + g; u = g + momentum * buf (Nesterov); p -= lr * sqrt(max(1, rows / cols)) * orthogonalize(u).
    No weight decay on Muon groups. AdamW: as torch.optim.AdamW (decoupled weight decay, bias correction).
    The learning rates are per group, so an LR scheduler scales both kinds alike. `ns_dtype` is the
    Newton-Schulz dtype, a property of the machine rather than of the run: it is not in the state dict.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps, muon=False
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon param groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                # matrices of one shape: one batched orthogonalisation
                for shape in dict.fromkeys(p.shape for p in params):
                    self._muon([p for p in params if p.shape == shape], group)
            else:
                for p in params:
                    self._adamw(p, group)
        return loss

    def _muon(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """One Muon step for same-shaped matrices."""
        mu, updates = group["momentum"], []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            state["momentum_buffer"].mul_(mu).add_(p.grad)
            updates.append(p.grad.add(state["momentum_buffer"], alpha=mu))
        rows, cols = params[0].shape
        scale = max(1.0, rows / cols) ** 0.5  # tall matrices: the same RMS per output as square ones
        for p, update in zip(
            params, orthogonalize(torch.stack(updates), group["ns_steps"], self.ns_dtype), strict=True
        ):
            p.add_(update, alpha=-group["lr"] * scale)

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["step"] += 1
        t = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


# ----------------------------------------------------------------------------- the optimizer a run uses


def make_optimizer(
    model: torch.nn.Module, t: TrainConfig, sharded: bool = False, ns_dtype: torch.dtype = torch.bfloat16
) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel, on CPU and GPU) with weight decay on 2-D weights (matmuls, embeddings) only;
    frozen parameters are left out.

    train.optimizer=muon: Muon for the weights of the Linear layers except the LM head, AdamW for the rest, in one
    optimizer; the first param group stays AdamW's, whose lr the trainer logs. Muon needs whole matrices: not `sharded`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters (everything is frozen); lower finetune.freeze")
    matrices: set[int] = set()
    if t.optimizer == "muon":
        if sharded:
            raise UserError(
                "train.optimizer=muon needs whole weight matrices on every rank; FSDP shards them: use DDP or train.optimizer=adamw"
            )
        matrices = {
            id(m.weight)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
        }
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in matrices], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    groups.append(
        {"params": [p for p in params if id(p) in matrices], "muon": True, "lr": t.muon_lr, "weight_decay": 0.0}
    )
    return MuonAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), momentum=t.muon_momentum, ns_dtype=ns_dtype)


def lr_at(step: int, elapsed: float, t: TrainConfig) -> float:
    """Linear warmup, then decay to min_lr; progress is the larger of steps and elapsed time (with a time budget)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    if t.lr_decay == "wsd":
        return wsd_lr(step, elapsed, t)
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.time_budget_s > 0:
        progress = max(progress, elapsed / t.time_budget_s)
    progress = min(progress, 1.0)
    if t.lr_decay == "constant":
        return t.lr
    if t.lr_decay == "linear":
        return t.lr - progress * (t.lr - t.min_lr)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def wsd_lr(step: int, elapsed: float, t: TrainConfig) -> float:
    """Warmup-stable-decay after warmup: train.lr, then over the last decay_steps(t) steps (or the last decay_fraction of
    the time budget) down to min_lr, reached at the last step. Until the decay starts the rate does not depend on
    max_steps, so a run still in its stable phase can be resumed with a larger train.max_steps and go on as if planned.
    """
    n = decay_steps(t)
    progress = (step + 1 - (t.max_steps - n)) / n  # <= 0 while stable, 1 at the last step
    if t.time_budget_s > 0:
        progress = max(progress, (elapsed / t.time_budget_s - (1 - t.decay_fraction)) / t.decay_fraction)
    progress = min(max(progress, 0.0), 1.0)
    drop = math.sqrt(progress) if t.decay_shape == "1-sqrt" else progress
    return t.lr - drop * (t.lr - t.min_lr)


def lr_factor(step: int, elapsed: float, t: TrainConfig) -> float:
    """The schedule as a multiple of the peak: each param group runs at its own peak lr (train.lr, train.muon_lr) times this."""
    return lr_at(step, elapsed, t) / t.lr
