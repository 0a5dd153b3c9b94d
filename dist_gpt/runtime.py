"""Process setup, decided once before a Trainer exists: the Accelerator, precision, compile, threads, batching.

    accelerator = make_accelerator(cfg)          # resolves train.mixed_precision, train.compile, threads; checks the launch
    resolve_batching(cfg, accelerator.num_processes, resumed_tokens_per_step)   # fills train.grad_accum
    ...
    teardown(accelerator)

Nothing here knows the model's internals; `model.py` knows nothing of what is here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from dist_gpt import hardware
from dist_gpt.config import Config, checkpoint_every
from dist_gpt.errors import UserError
from dist_gpt.tracking import log

# Dense bf16 tensor-core peak FLOP/s from the vendors' datasheets (no sparsity), for MFU. Matched as whole words against
# torch.cuda.get_device_name(), longest name first, so "L40S" never counts as "L4" and "H100 PCIe" not as "H100 SXM".
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores (V100 has no bf16)
    "T4": 65e12,  # fp16 tensor cores (T4 has no bf16)
}


def peak_flops(device_name: str) -> tuple[float, str] | None:
    """(peak FLOP/s, the table entry) for a GPU name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name):
            return PEAK_BF16_FLOPS[key], key
    return None


# ----------------------------------------------------------------------------- the accelerator


def use_cuda() -> bool:
    """Train on the GPU: CUDA is there and the launch did not ask for the CPU (ACCELERATE_USE_CPU, configs/accelerate/cpu.yaml)."""
    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the kernel; True if it took.

    A CPU training step allocates and frees the same large activation buffers every step. By default glibc serves
    each large one with a fresh mmap and unmaps it on free, so every step page-faults and zeroes all of it again
    (the lecture model at batch 32: ~400,000 page faults and ~2 s of system time per step; BENCHMARKS.md, "The lecture
    model side by side"). With no mmap'd chunks and no trimming, the heap grows to the peak once and is reused.
    The process then holds its peak memory until it exits, as a caching allocator would. Elsewhere than glibc: False.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), or no such handle (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for this process, after checking the launcher really started the processes it claims.

    Resolves, in `cfg`: train.mixed_precision (auto -> bf16/fp16/no), train.compile (auto -> true/false) and
    model.attn_impl (auto -> sdpa/matmul), printing each automatic choice with its reason.
    """
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    user_threads = os.environ.get("OMP_NUM_THREADS")
    if user_threads == "1" and launched_by_accelerate:
        # `accelerate launch` writes OMP_NUM_THREADS=1 when nobody asked; train.threads says it explicitly
        user_threads = None
    cuda = use_cuda()
    if not cuda:  # threads first: the hardware probe below measures with them
        keep_freed_memory()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(
            cfg.train.threads or (int(user_threads) if user_threads else max(1, len(os.sched_getaffinity(0)) // local))
        )
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (mixed_precision=no) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    # The process group first (Accelerator() joins the same one), so the main process alone probes the hardware and
    # every rank runs what it decided.
    state = PartialState(cpu=not cuda)
    decisions = None
    if state.is_main_process:
        decisions = hardware.decide(cfg.model, cfg.train, state.device)
        for line in decisions.reasons:
            log(line)
        for line in decisions.warnings:
            log(f"warning: {line}")
    if state.num_processes > 1:
        box = [decisions.to_dict() if decisions else None]
        broadcast_object_list(box, from_process=0)
        decisions = hardware.Decisions.from_dict(box[0])
    cfg.train.mixed_precision, cfg.model.attn_impl = decisions.precision, decisions.attn_impl
    compile_on = cfg.train.compile == "true" or (cfg.train.compile == "auto" and cuda)
    cfg.train.compile = "true" if compile_on else "false"
    check_recompute_backend(cfg)
    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    kwargs: dict[str, Any] = {}
    if fsdp_requested and cuda:
        kwargs["fsdp_plugin"] = fsdp_plugin(cfg.train.mixed_precision)
    accelerator = Accelerator(
        cpu=not cuda,  # without CUDA, a multi-process launch must still form one gloo group (see README, "CPU DDP")
        mixed_precision=cfg.train.mixed_precision,
        log_with="wandb" if cfg.log.wandb else None,
        step_scheduler_with_optimizer=False,
        # "no": eager (tests, debugging)
        dynamo_backend=os.environ.get("DIST_GPT_COMPILE_BACKEND", "inductor") if compile_on else "no",
        **kwargs,
    )
    accelerator.ns_dtype = decisions.ns_dtype  # Muon's Newton-Schulz dtype, read by make_optimizer
    check_world_size(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        fallback = "DDP over gloo" if accelerator.num_processes > 1 else "a single process"
        log(
            "warning: FSDP was requested (configs/accelerate/fsdp.yaml) but Accelerate's FSDP plugin needs CUDA: "
            f"on this machine it fell back to {fallback}, every rank holding the whole model"
        )
    return accelerator


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP2's policy: compute in `precision`, reduce gradients in fp32, and leave outputs alone (Accelerate's own policy
    casts every module's output to the compute dtype, which rounds the loss to bf16; the model computes it in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, output_dtype=None)


def fsdp_plugin(precision: str) -> Any:
    """Accelerate's FSDP plugin as the launcher configured it (FSDP_* variables), with our mixed-precision policy."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    plugin.mixed_precision_policy = fsdp_mixed_precision(precision)
    return plugin


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the weights are split over ranks (FSDP2's fully_shard), so every rank must join any forward pass."""
    from torch.distributed.fsdp import FSDPModule

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return isinstance(model, FSDPModule)


def check_world_size(launched: int, joined: int) -> None:
    """The launcher's WORLD_SIZE must be the group Accelerate formed (a GPU-less MULTI_GPU launch silently gives N lone trainings)."""
    if joined != launched:
        raise UserError(
            f"the launcher started {launched} processes but they did not join one group (Accelerate sees {joined}); "
            "on a machine without CUDA launch with `accelerate launch --config_file configs/accelerate/cpu.yaml` or set ACCELERATE_USE_CPU=1"
        )


def on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only; every process gets its result, or raises its UserError."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        box = [(result, error)]
        broadcast_object_list(box, from_process=0)
        result, error = box[0]
    if error:
        raise UserError(error)
    return result


def check_replicas_agree(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """With replicated weights (DDP), every rank must end with the same bytes: say so, or warn loudly."""
    if accelerator.num_processes == 1:
        return
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digests = gather_object([h.hexdigest()])
    if accelerator.is_main_process:
        if len(set(digests)) == 1:
            log(f"weights identical on all {accelerator.num_processes} ranks (sha256 {digests[0][:16]})")
        else:
            log(
                f"warning: the ranks ended with different weights ({', '.join(d[:16] for d in digests)}); please report this"
            )


def teardown(accelerator: Accelerator) -> None:
    """Leave the process group cleanly while Python is fully alive (left to interpreter exit, a gloo thread that frees a
    tensor aborts the process now and then: SIGABRT, "terminate called without an active exception")."""
    accelerator.free_memory()
    accelerator.state.destroy_process_group()


# ----------------------------------------------------------------------------- activation checkpointing


def check_recompute_backend(cfg: Config) -> None:
    """torch.compile's `eager` debugging backend recomputes a checkpointed Block's dropout with other masks than its
    forward pass used (torch 2.13; inductor and aot_eager keep them): wrong gradients, so refuse the combination."""
    backend = os.environ.get("DIST_GPT_COMPILE_BACKEND", "inductor")
    if (
        backend == "eager"
        and cfg.train.compile == "true"
        and checkpoint_every(cfg.train.activation_checkpointing)
        and cfg.model.dropout > 0
    ):
        raise UserError(
            "DIST_GPT_COMPILE_BACKEND=eager recomputes checkpointed Blocks with other dropout masks (wrong gradients): with "
            "train.activation_checkpointing use the default backend or aot_eager, model.dropout=0, or train.compile=false"
        )


def checkpoint_blocks(model: torch.nn.Module, spec: str) -> int:
    """train.activation_checkpointing: wrap Blocks 0, N, 2N, ... of `model` (every Block for `full`) in torch's
    checkpoint_wrapper (non-reentrant torch.utils.checkpoint), in place; returns how many. Call it before
    `accelerator.prepare`, so DDP, FSDP and torch.compile all see the wrapped Blocks.

    A wrapped Block keeps only its input for the backward pass and runs its forward again there (dropout gets the same
    masks: the RNG state is saved and restored). The weights keep plain GPT names in every state dict: the wrapper's
    hooks and torch.distributed.checkpoint's helpers both drop its `_checkpoint_wrapped_module.` prefix.
    """
    every = checkpoint_every(spec)
    if not every:
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from dist_gpt.model import Block

    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise UserError(
            "activation checkpointing is on twice: in the Accelerate config (fsdp_activation_checkpointing: true) and in "
            f"train.activation_checkpointing={spec}; set fsdp_activation_checkpointing: false and keep train.activation_checkpointing"
        )
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise UserError(
            f"train.activation_checkpointing={spec}: this model has no Transformer Blocks to recompute (model.kind=bigram); use none"
        )
    chosen = set(blocks[::every])
    apply_activation_checkpointing(model, check_fn=lambda m: m in chosen)
    return len(chosen)


# ----------------------------------------------------------------------------- what depends on the process count


def resolve_batching(cfg: Config, world: int, resumed_tokens_per_step: int | None = None) -> int:
    """Fill train.grad_accum: from train.tokens_per_step when set, else keep a resumed run's tokens per step; returns tokens per step."""
    t = cfg.train
    per_micro = t.batch_size * cfg.model.block_size * world
    target = t.tokens_per_step or resumed_tokens_per_step
    if target:
        if target % per_micro:
            raise UserError(
                f"{target} tokens per step cannot be split into micro-batches of {t.batch_size} x {cfg.model.block_size} tokens on {world} processes; "
                "change train.batch_size or train.tokens_per_step so they divide evenly"
            )
        t.grad_accum = target // per_micro
    return per_micro * t.grad_accum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_memory(cfg: Config, device: torch.device) -> None:
    """Refuse a model and micro-batch that cannot fit, before anything is allocated (one line instead of an OOM kill).

    Estimate: weights, gradients and two AdamW moments in fp32 (16 bytes per parameter, counted on the meta device),
    plus the activations autograd keeps, about B*T*(34*C + 5*H*T) bytes per layer in 16-bit (Korthikanti et al.
    2022), doubled for fp32, plus the logits.
    """
    import psutil

    from dist_gpt.model import GPT

    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(m).parameters())
    act_bytes = 2 if t.mixed_precision in ("bf16", "fp16") else 4
    activations = (
        m.n_layer * t.batch_size * m.block_size * (34 * m.n_embd + 5 * m.n_head * m.block_size) * act_bytes // 2
    )
    logits = t.batch_size * m.block_size * max(m.vocab_size, 1) * 4 * 2  # fp32 logits and their gradient
    need = 16 * n_params + activations + logits
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        free = psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        where = "this machine's free RAM (per process)"
    if need > free:
        raise UserError(
            f"the model ({n_params / 1e6:,.1f}M parameters) with train.batch_size={t.batch_size} x model.block_size={m.block_size} needs about "
            f"{need / 2**30:,.1f} GiB but {where} has {free / 2**30:,.1f} GiB free: lower train.batch_size (raise train.grad_accum to keep "
            "the tokens per step), model.block_size or the model's size"
        )
