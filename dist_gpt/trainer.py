"""The one training loop both stages share: Accelerate, AdamW + warmup/cosine, accumulation, eval, checkpoints.

A stage (pretrain or finetune, see stages.py) builds a `Job` (the model, the tokenizer, the prepared
data) and hands it to `Trainer`. The trainer does not know where the model came from; it owns the
Accelerator, the optimizer and schedule, evaluation on every rank, the NaN guard, signals, and the
resumable state (optimizer, scheduler, loss scaler, every rank's RNG, the data position).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate import state as accelerate_state
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from dist_gpt import checkpoint as ckpt
from dist_gpt.batches import BatchLoader, check_split_size, eval_batches, open_split
from dist_gpt.config import Config, TrainConfig, save_config
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write_json, read_json
from dist_gpt.optim import MuonAdamW
from dist_gpt.tracking import Tracker, log

# Peak dense bf16 FLOP/s per device, for MFU (matched against torch.cuda.get_device_name()).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


# ----------------------------------------------------------------------------- setup


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(choice: str, n_embd: int, cuda: bool, attn_impl: str = "sdpa") -> str:
    """`train.mixed_precision` to what Accelerate runs: bf16, fp16 or no."""
    if choice == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # bf16 autocast pays off on CPUs with bf16 instructions (AVX512-BF16/AMX) once matmuls are wide enough, or at any width with the plain-matmul
        # attention (bf16 SDPA's backward is slow on the CPU) (BENCHMARKS.md, "bf16 on CPU")
        return "bf16" if cpu_has_bf16() and (n_embd >= 256 or attn_impl == "matmul") else "no"
    if choice == "fp16" and not cuda:
        log("warning: fp16 autocast does nothing on a CPU; training in fp32 (use bf16 on CPUs with AVX512-BF16 or AMX)")
        return "no"
    if choice == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision=bf16 but this GPU has no bf16; use fp16")
    return choice


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for this process, after checking the launcher really started the processes it claims."""
    user_threads = os.environ.get("OMP_NUM_THREADS")
    if user_threads == "1" and "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        user_threads = None  # `accelerate launch` writes OMP_NUM_THREADS=1 when nobody asked; train.threads says it explicitly
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.mixed_precision, cfg.model.n_embd, cuda, cfg.model.attn_impl)
    compile_on = cfg.train.compile == "true" or (cfg.train.compile == "auto" and cuda)
    accelerator = Accelerator(
        cpu=not cuda,  # without CUDA, a multi-process launch must still form one gloo group (see README, "CPU DDP")
        mixed_precision=precision,
        log_with="wandb" if cfg.log.wandb else None,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step ourselves
        dynamo_backend="inductor" if compile_on else "no",
    )
    cfg.train.mixed_precision = precision
    cfg.train.compile = "true" if compile_on else "false"
    check_world_size(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        fallback = "DDP over gloo" if accelerator.num_processes > 1 else "a single process"
        log(f"warning: FSDP was requested (configs/accelerate/fsdp.yaml) but Accelerate's FSDP plugin needs CUDA: on this machine it fell back to {fallback}, every rank holding the whole model")
    if not cuda:  # CPU threads per process: train.threads, else OMP_NUM_THREADS, else the cores shared by this machine's processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = cfg.train.threads or (int(user_threads) if user_threads else max(1, len(os.sched_getaffinity(0)) // local))
        torch.set_num_threads(threads)
    return accelerator


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


# ----------------------------------------------------------------------------- the run directory


@dataclass
class Run:
    """An opened run directory: where to write, and the checkpoint to resume from (if any)."""

    dir: Path
    resume_from: Path | None
    lock: ckpt.RunLock | None = None

    def release(self) -> None:
        if self.lock:
            self.lock.release()


def open_run(cfg: Config, accelerator: Accelerator) -> Run:
    """Take the run directory's lock and decide between a fresh start and a resume (`run.resume`)."""
    lock = ckpt.RunLock(cfg.out_dir)  # taken and held by the main process only

    def _open() -> tuple[Path, str | None]:
        run_dir = cfg.out_dir
        exists = run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir())
        if exists and cfg.run.resume == "never" and not cfg.run.overwrite:
            raise UserError(f"run directory {run_dir} already exists and run.resume=never; pass --run.overwrite=true to replace it, or choose another --run.out_dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {run_dir}: {e.strerror}; choose a writable --run.out_dir") from None
        if not os.access(run_dir, os.W_OK):
            raise UserError(f"run directory {run_dir} is not writable; choose another --run.out_dir")
        lock.acquire(log)  # released by Run.release()
        if exists and cfg.run.resume == "never":
            log(f"run.overwrite=true: clearing {run_dir}")
            for p in run_dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        ckpt.clean_partial_checkpoints(run_dir)
        found = ckpt.find_resumable(run_dir, log) if cfg.run.resume == "auto" else None
        if exists and found is None and cfg.run.resume == "auto" and ckpt.list_checkpoints(run_dir):
            log("warning: no complete checkpoint survives in this run directory; starting from scratch")
        if found:
            log(f"resuming from {found}")
        return run_dir, (str(found) if found else None)

    run_dir, found = on_main(accelerator, _open)
    return Run(dir=run_dir, resume_from=Path(found) if found else None, lock=lock if accelerator.is_main_process else None)


# ----------------------------------------------------------------------------- the job


def plain_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state


@dataclass
class Job:
    """Everything a stage hands the loop."""

    cfg: Config
    model: torch.nn.Module  # built and initialised (parent weights loaded, adapters attached)
    tokenizer: Any
    data_dir: Path
    sft: bool = False
    # From the training module's full state dict: the plain GPT weights saved as model.safetensors,
    # and anything else to save beside them (e.g. the LoRA adapter alone).
    export_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = plain_weights
    save_extras: Callable[[dict[str, torch.Tensor], Path], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # extra summary.json entries (a finetune's parent)


def lr_at(step: int, elapsed: float, t: TrainConfig) -> float:
    """Linear warmup, then decay to min_lr; progress is the larger of steps and elapsed time (with a time budget)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.time_budget_s > 0:
        progress = max(progress, elapsed / t.time_budget_s)
    progress = min(progress, 1.0)
    if t.lr_decay == "constant":
        return t.lr
    if t.lr_decay == "linear":
        return t.lr - progress * (t.lr - t.min_lr)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; frozen parameters are left out.

    train.optimizer=muon: Muon (dist_gpt/optim.py) for the weights of the Linear layers except the LM head,
    AdamW for the rest, in one optimizer; the first param group stays AdamW's, whose lr the trainer logs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters (everything is frozen); lower finetune.freeze")
    matrices: set[int] = set()
    if t.optimizer == "muon":
        if accelerate_state.is_initialized() and accelerate_state.AcceleratorState().distributed_type == DistributedType.FSDP:
            raise UserError("train.optimizer=muon needs whole weight matrices on every rank; FSDP shards them: use DDP or train.optimizer=adamw")
        matrices = {id(m.weight) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in matrices], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    groups.append({"params": [p for p in params if id(p) in matrices], "muon": True, "lr": t.muon_lr, "weight_decay": 0.0})
    return MuonAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), momentum=t.muon_momentum)


# ----------------------------------------------------------------------------- RNG state (JSON + safetensors, never pickle)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    np_state = json_part["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the loop


class NonFiniteLoss(UserError):
    pass


class Trainer:
    def __init__(self, job: Job, accelerator: Accelerator, run: Run):
        self.job, self.cfg, self.acc, self.run = job, job.cfg, accelerator, run
        t, m = self.cfg.train, self.cfg.model
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.block_size = m.block_size
        self.stop_signal: int | None = None  # set by a signal on this rank
        self.stopping = False  # set when the ranks agree to stop (see train_step)
        self.state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val_loss": None, "last_val_loss": None, "elapsed_s": 0.0, "wandb_id": uuid.uuid4().hex[:12]}
        saved = ckpt.read_checkpoint_json(run.resume_from, "trainer.json") if run.resume_from else None
        self.configured_grad_accum = t.grad_accum
        t.grad_accum = self._grad_accum(saved)
        self.tokens_per_step = t.batch_size * self.block_size * t.grad_accum * self.world
        accelerator.gradient_accumulation_steps = t.grad_accum

        seed_everything(self.cfg.run.seed + self.rank)
        model = job.model
        if saved:
            try:
                model.load_state_dict(ckpt.read_checkpoint_tensors(run.resume_from, "model.safetensors"))
            except RuntimeError as e:
                detail = " ".join(str(e).splitlines()[1:2]).strip()[:300]
                raise UserError(
                    f"the checkpoint {run.resume_from} holds a model of another shape than the config asks for ({detail}); "
                    "keep the model section of the run you resume, or start a new one with another --run.out_dir"
                ) from None
        cuda = accelerator.device.type == "cuda"
        optimizer = make_optimizer(model, t, fused=cuda)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, self.state["elapsed_s"], t) / t.lr)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.raw_model = accelerator.unwrap_model(self.model)
        self.flops_per_token = self.raw_model.estimate_flops_per_token() if hasattr(self.raw_model, "estimate_flops_per_token") else None

        self.train_split = open_split(job.data_dir, "train")
        self.val_split = open_split(job.data_dir, "val")
        for name, split in (("train", self.train_split), ("val", self.val_split)):
            check_split_size(name, len(split.tokens), self.block_size)
        self.loader = BatchLoader(self.train_split, self.block_size, t.batch_size, seed=self.cfg.run.seed, rank=self.rank, world_size=self.world, mode=self.cfg.data.loader)
        if saved:
            self._restore(saved)
        self._clock = time.perf_counter
        self._t0, self._elapsed_base = self._clock(), 0.0
        self.lr = t.lr

    # --- configuration that depends on the world size -------------------------------------------

    def _grad_accum(self, saved: dict | None) -> int:
        t = self.cfg.train
        per_micro = t.batch_size * self.block_size * self.world
        if t.tokens_per_step:
            target = t.tokens_per_step
        elif saved:
            target = saved["tokens_per_step"]  # a resumed run keeps its tokens per step, also when the process count changed
        else:
            return t.grad_accum
        if target % per_micro:
            raise UserError(
                f"{target} tokens per step cannot be split into micro-batches of {t.batch_size} x {self.block_size} tokens on {self.world} processes; "
                "change train.batch_size or train.tokens_per_step so they divide evenly"
            )
        return target // per_micro

    # --- state -----------------------------------------------------------------------------------

    def _restore(self, saved: dict) -> None:
        path = self.run.resume_from
        t = self.cfg.train
        if saved["world_size"] != self.world and self.acc.is_main_process:
            log(
                f"resuming a checkpoint written by {saved['world_size']} process(es) on {self.world}: grad_accum {saved['grad_accum']} -> {t.grad_accum} "
                f"keeps {self.tokens_per_step:,} tokens per optimizer step; the data stream continues where it stopped, "
                "but the result is not bit-identical to a run that kept one process count"
            )
        elif t.grad_accum != self.configured_grad_accum and self.acc.is_main_process:
            log(f"keeping the checkpoint's {self.tokens_per_step:,} tokens per optimizer step: grad_accum {t.grad_accum} instead of the configured {self.configured_grad_accum} (set train.tokens_per_step to change it)")
        self.state.update({k: saved[k] for k in ("step", "tokens_seen", "best_val_loss", "last_val_loss", "elapsed_s", "wandb_id")})
        flat = ckpt.read_checkpoint_tensors(path, "optimizer.safetensors")
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            name, _, slot = key.rpartition("/")
            opt_state.setdefault(name, {})[slot] = tensor
        osd = {"state": opt_state, "param_groups": saved["param_groups"]}
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.optimizer.param_groups]
        sched = self.scheduler.scheduler
        base_lrs = list(sched.base_lrs)
        set_optimizer_state_dict(self.raw_model, self.optimizer.optimizer, osd, options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(saved["scheduler"])
        # The hyperparameters follow the current config (a changed train.lr, betas or weight decay takes effect);
        # the moments, step counts and schedule position come from the checkpoint. Same config: same values.
        # (Loading replaced the param-group dicts, so they are looked up again here.)
        sched.base_lrs = base_lrs
        groups = self.optimizer.optimizer.param_groups
        for g, hyper, base, fn in zip(groups, configured, base_lrs, sched.lr_lambdas, strict=True):
            g.update(hyper)
            g["lr"] = base * fn(sched.last_epoch)
        if saved.get("scaler") and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(saved["scaler"])
        self.loader.load_state_dict(saved["loader"])
        rank_json = path / f"rng_rank{self.rank}.json"
        if rank_json.is_file():
            set_rng_state(ckpt.read_checkpoint_json(path, rank_json.name), ckpt.read_checkpoint_tensors(path, f"rng_rank{self.rank}.safetensors"))
        else:
            seed_everything(self.cfg.run.seed + self.rank + 7919 * saved["step"])

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG; the main process writes the folder atomically and refreshes model.safetensors."""
        opt_sd = get_optimizer_state_dict(self.raw_model, self.optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        model_sd = self.acc.get_state_dict(self.model)  # gathered in full on the main process, whatever the wrapper
        if self.acc.is_main_process:
            step = self.state["step"]
            flat = {f"{name}/{slot}": v for name, slots in opt_sd["state"].items() for slot, v in slots.items()}
            sched = self.scheduler.scheduler.state_dict()  # lr_lambdas is [None]: the function is rebuilt from the config
            trainer_json = {
                **self.state,
                "world_size": self.world,
                "batch_size": self.cfg.train.batch_size,
                "grad_accum": self.cfg.train.grad_accum,
                "block_size": self.block_size,
                "tokens_per_step": self.tokens_per_step,
                "loader": self.loader.state_dict(),
                "scheduler": sched,
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                "param_groups": opt_sd["param_groups"],
            }
            tensors = {"model.safetensors": model_sd, "optimizer.safetensors": flat}
            jsons = {"trainer.json": trainer_json}
            for r, state in enumerate(rng):
                tensors[f"rng_rank{r}.safetensors"] = {"torch": state["torch"], **{f"cuda.{i}": s for i, s in enumerate(state["cuda"])}}
                jsons[f"rng_rank{r}.json"] = {"python": state["python"], "numpy": state["numpy"]}
            ckpt.write_checkpoint(self.run.dir, step, tensors, jsons, keep=self.cfg.train.keep_checkpoints)
            self.export(model_sd)
        self.acc.wait_for_everyone()

    def export(self, model_sd: dict[str, torch.Tensor]) -> None:
        """The plain model a user samples, finetunes or exports: RUN_DIR/model.safetensors (+ extras) and summary.json."""
        ckpt.save_weights(self.job.export_weights(model_sd), self.run.dir / "model.safetensors")
        if self.job.save_extras:
            self.job.save_extras(model_sd, self.run.dir)
        s = self.state
        wall = s["elapsed_s"]
        atomic_write_json(
            self.run.dir / "summary.json",
            {
                "best_val_loss": s["best_val_loss"],
                "final_val_loss": s["last_val_loss"],
                "steps": s["step"],
                "tokens_seen": s["tokens_seen"],
                "wall_s": round(wall, 3),
                "tokens_per_s": round(s["tokens_seen"] / wall, 1) if wall else None,
                "world_size": self.world,
                "tokens_per_step": self.tokens_per_step,
                **self.job.info,
            },
        )

    # --- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over a fixed set of `eval_iters` batches per split, spread over the ranks."""
        t = self.cfg.train
        self.model.eval()
        out = {}
        for name, split in (("eval_train_loss", self.train_split), ("val_loss", self.val_split)):
            total = torch.zeros(2, device=self.acc.device)
            for x, y in eval_batches(split, self.block_size, t.batch_size, t.eval_iters, seed=self.cfg.run.seed, rank=self.rank, world_size=self.world):
                _, loss = self.model(x.to(self.acc.device), y.to(self.acc.device))
                total += torch.stack([loss.float(), torch.ones((), device=self.acc.device)])
            total = self.acc.reduce(total, "sum")
            out[name] = (total[0] / total[1]).item()
        self.model.train()
        return out

    def sample(self) -> str:
        t = self.cfg.train
        try:
            ids = self.job.tokenizer.encode(t.sample_prompt)
        except UserError as e:
            return f"(no sample: {e})"
        idx = torch.tensor([ids or [0]], device=self.acc.device)
        gen = torch.Generator(device=self.acc.device).manual_seed(self.cfg.run.seed)
        with self.acc.autocast():
            out = self.raw_model.generate(idx, t.sample_tokens, temperature=1.0, top_k=None, generator=gen)
        return self.job.tokenizer.decode(out[0, len(ids) :].tolist())

    # --- training --------------------------------------------------------------------------------

    def train_step(self) -> float | None:
        """One optimizer step over grad_accum micro-batches; the loss averaged over micro-batches and ranks."""
        t = self.cfg.train
        total = torch.zeros((), device=self.acc.device)
        for _ in range(t.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.acc.device, non_blocking=True), y.to(self.acc.device, non_blocking=True)
            with self.acc.accumulate(self.model):
                _, loss = self.model(x, y)
                self.acc.backward(loss)
            total += loss.detach()
        # One small all-reduce agrees on the loss, a pending stop signal and the elapsed time (which drives
        # the time budget and its LR schedule), so every rank takes the same decisions.
        flags = [float(self.stop_signal is not None), self._elapsed_base + self._clock() - self._t0]
        stats = self.acc.reduce(torch.tensor([total.item() / t.grad_accum, *flags], device=self.acc.device, dtype=torch.float64), "sum").tolist()
        # Every rank acts on this agreed flag, never on its own: a signal landing after the reduce counts at the next step.
        self.stopping = stats[1] > 0
        self.state["elapsed_s"] = stats[2] / self.world
        loss = stats[0] / self.world
        norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip) if t.grad_clip > 0 and math.isfinite(loss) else None
        # a finite loss can still give non-finite gradients; with fp16 the loss scaler handles those itself
        bad_grad = norm is not None and self.acc.scaler is None and not math.isfinite(float(norm))
        if not math.isfinite(loss) or bad_grad:
            what = f"the gradient norm became {float(norm)}" if bad_grad else f"the loss became {loss}"
            step = self.state["step"] + 1
            self.optimizer.zero_grad(set_to_none=True)
            if t.on_nan == "stop":
                raise NonFiniteLoss(
                    f"{what} at step {step}; stopping without saving. The last good checkpoint is untouched: "
                    "lower train.lr, raise train.warmup_steps or use train.mixed_precision=no, or pass train.on_nan=skip to skip such steps"
                )
            if self.acc.is_main_process:
                log(f"warning: {what} at step {step}; skipped this optimizer step (train.on_nan=skip)")
            return None
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:
            os._exit(128 + signum)  # second signal: leave at once
        self.stop_signal = signum
        if self.acc.is_main_process:
            log(f"\nreceived {signal.Signals(signum).name}: writing a checkpoint at the end of this step, then exiting (signal again to exit at once)")

    def fit(self) -> dict[str, Any]:
        cfg, t, s = self.cfg, self.cfg.train, self.state
        if self.acc.is_main_process:
            save_config(cfg, self.run.dir / "config.yaml")
            self.job.tokenizer.save(self.run.dir / "tokenizer.json")
            if self.job.info:
                atomic_write_json(self.run.dir / "parent.json", self.job.info)
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        n_train = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        wrapper = type(self.model).__name__
        log_main = log if self.acc.is_main_process else (lambda _m: None)
        log_main(
            f"world size {self.world} ({self.acc.distributed_type.value}, {wrapper}) on {self.acc.device}, {torch.get_num_threads()} threads/process, "
            f"precision {t.mixed_precision}, compile {t.compile}\n"
            f"model: {n_params / 1e6:.3f}M parameters ({n_train / 1e6:.3f}M trainable)\n"
            f"tokens per optimizer step: {t.batch_size} (micro-batch) x {self.block_size} (block) x {t.grad_accum} (accumulation) x {self.world} (processes) = {self.tokens_per_step:,}\n"
            f"run directory: {self.run.dir}"
        )
        if s["step"] >= t.max_steps or (t.time_budget_s > 0 and s["elapsed_s"] >= t.time_budget_s):
            log_main(
                f"run already complete at step {s['step']} (train.max_steps={t.max_steps}, train.time_budget_s={t.time_budget_s:g}, {s['elapsed_s']:.0f} s trained); "
                "nothing to do. Raise --train.max_steps (or the time budget) to continue it."
            )
            return s
        tracker = Tracker(self.acc, self.run.dir, cfg, s["step"], s["elapsed_s"], s["wandb_id"])
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._t0, self._elapsed_base = self._clock(), s["elapsed_s"]
        try:
            if s["step"] == 0 and t.eval_at_start:
                self._eval_and_log(tracker, {"step": 0, "tokens": 0, "elapsed_s": 0.0})
            last_time, last_tokens = time.perf_counter(), s["tokens_seen"]
            while True:
                loss = self.train_step()
                s["step"] += 1
                s["tokens_seen"] += self.tokens_per_step
                done = s["step"] >= t.max_steps or (t.time_budget_s > 0 and s["elapsed_s"] >= t.time_budget_s)
                stopping = self.stopping
                eval_due = (s["step"] % t.eval_interval == 0 or done) and not stopping
                if s["step"] % t.log_interval == 0 or eval_due or done:
                    now = time.perf_counter()
                    tok_s = (s["tokens_seen"] - last_tokens) / max(now - last_time, 1e-9)
                    record = {"step": s["step"], "train_loss": loss, "lr": self.lr, "tokens": s["tokens_seen"], "tokens_per_s": round(tok_s, 1), "elapsed_s": round(s["elapsed_s"], 3)}
                    mfu = self._mfu(tok_s)
                    if mfu is not None:
                        record["mfu"] = round(mfu, 4)
                    if eval_due:
                        self._eval_and_log(tracker, record)
                    else:
                        tracker.metrics(record)
                    tracker.progress(s["step"], s["elapsed_s"], loss=f"{loss:.4f}" if loss is not None else "skipped", tok_s=f"{tok_s:,.0f}")
                    last_time, last_tokens = time.perf_counter(), s["tokens_seen"]
                if s["step"] % t.checkpoint_interval == 0 or done or stopping:
                    self.save_checkpoint()
                if stopping:
                    name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another process"
                    log_main(f"stopped by {name} at step {s['step']}; checkpoint written to {self.run.dir}; rerun the same command to resume")
                    self.close()  # every rank is here
                    raise SystemExit(128 + (self.stop_signal or signal.SIGTERM))
                if done:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            tracker.close()
        log_main(f"done: {s['step']} steps, val loss {s['last_val_loss']:.4f} (best {s['best_val_loss']:.4f}), {s['elapsed_s']:.1f} s; model in {self.run.dir / 'model.safetensors'}")
        if self.acc.device.type == "cuda":
            log_main(f"peak GPU memory (process 0): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
        self._check_replicas_agree()
        self.close()
        return s

    def close(self) -> None:
        """Leave the process group cleanly (one run per process): drop the DDP wrapper, which holds the group's
        buffers, then the group, while Python is fully alive. Left to interpreter exit, a gloo thread that frees a
        tensor then aborts the whole process now and then (SIGABRT, "terminate called without an active exception")."""
        self.model = self.optimizer = self.scheduler = None
        self.acc.free_memory()
        self.acc.state.destroy_process_group()

    def _check_replicas_agree(self) -> None:
        """With replicated weights (DDP), every rank must end with the same bytes; say so, or warn loudly."""
        if self.world == 1 or self.acc.distributed_type == DistributedType.FSDP:
            return  # FSDP ranks hold different shards by design
        h = hashlib.sha256()
        for p in self.raw_model.parameters():
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        digests = gather_object([h.hexdigest()])
        if self.acc.is_main_process:
            if len(set(digests)) == 1:
                log(f"weights identical on all {self.world} ranks (sha256 {digests[0][:16]})")
            else:
                log(f"warning: the ranks ended with different weights ({', '.join(d[:16] for d in digests)}); please report this")

    def _eval_and_log(self, tracker: Tracker, record: dict[str, Any]) -> None:
        losses = self.evaluate()
        s = self.state
        s["last_val_loss"] = losses["val_loss"]
        if s["best_val_loss"] is None or losses["val_loss"] < s["best_val_loss"]:
            s["best_val_loss"] = losses["val_loss"]
        tracker.metrics({**record, **losses})
        tracker.write(f"step {s['step']}: train {losses['eval_train_loss']:.4f}, val {losses['val_loss']:.4f}")
        # FSDP shards the weights, so every rank must take part in generation; otherwise the main process alone samples
        if self.cfg.train.sample_tokens and (self.acc.is_main_process or self.acc.distributed_type == DistributedType.FSDP):
            tracker.sample(s["step"], self.cfg.train.sample_prompt, self.sample())

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.acc.device.type != "cuda" or not self.flops_per_token:
            return None
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        return self.flops_per_token * tokens_per_s / (peak * self.world) if peak else None


def read_summary(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / "summary.json", "run summary")
