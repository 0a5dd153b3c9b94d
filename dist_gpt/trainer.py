"""The training loop both stages share: build, train step, evaluate, sample, fit.

A stage (stages.py) resolves the process setup (runtime.py), opens the run directory (rundir.py), prepares the
data and builds a `Job`: the model, the tokenizer, the prepared data. `Trainer(job, accelerator, run).fit()` trains
it. What a checkpoint holds is the `parts` dict: adding a piece of resumable state is one entry there.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from dist_gpt.batches import BatchLoader, DeviceBatches, check_split_size, eval_batches, open_split
from dist_gpt.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState, TrainState
from dist_gpt.config import Config, TrainConfig
from dist_gpt.errors import UserError
from dist_gpt.optim import lr_factor, make_optimizer
from dist_gpt.profiling import Profiler
from dist_gpt.rundir import RunDir
from dist_gpt.runtime import check_replicas_agree, checkpoint_blocks, is_sharded, peak_flops, seed_everything, teardown
from dist_gpt.tracking import Tracker, log

# with a time budget, all the run's evaluations together (both splits) may take at most this share of it
EVAL_SHARE = 0.08


@dataclass
class Job:
    """Everything a stage hands the loop."""

    cfg: Config
    model: torch.nn.Module  # built and initialised (parent weights loaded, adapters attached)
    tokenizer: Any
    data_dir: Path
    data_fingerprint: str | None = None  # the prepared data's, recorded in the run directory
    # The plain GPT weights saved as model.safetensors, from the training module's full state dict (LoRA: merged),
    # and anything else to save beside them (LoRA: the adapter alone).
    export_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    save_extras: Callable[[dict[str, torch.Tensor], Path], None] | None = None
    parent: dict[str, Any] | None = None  # a finetune's lineage: parent.json and a summary.json entry


class NonFiniteLoss(UserError):
    pass


def affordable_eval_iters(per_batch_s: float, t: TrainConfig, world: int) -> tuple[int, int]:
    """(eval batches per split, evaluations expected) so that a time-budgeted run's evaluations take at most EVAL_SHARE of it.

    The evaluations expected are the one at the end, the one at step 0 (train.eval_at_start) and one per eval_interval
    steps, the steps estimated high from the budget: a micro-step (forward + backward) costs at least two forward passes.
    """
    steps = min(t.max_steps, t.time_budget_s / (2 * per_batch_s * t.grad_accum))
    evaluations = 1 + int(t.eval_at_start) + int(steps // t.eval_interval)
    # two splits; the ranks share the batches
    affordable = int(EVAL_SHARE * t.time_budget_s / (evaluations * 2 * per_batch_s)) * world
    return min(t.eval_iters, max(affordable, 1)), evaluations


class Trainer:
    def __init__(self, job: Job, accelerator: Accelerator, run: RunDir):
        self.job, self.cfg, self.acc, self.run = job, job.cfg, accelerator, run
        t, m = self.cfg.train, self.cfg.model
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.block_size = m.block_size
        self.stop_signal: int | None = None  # set by a signal on this rank
        self.stopping = False  # set when the ranks agree to stop (see train_step)
        self.tokens_per_step = t.batch_size * self.block_size * t.grad_accum * self.world
        self.state = TrainState(
            world_size=self.world,
            tokens_per_step=self.tokens_per_step,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            block_size=self.block_size,
        )
        accelerator.gradient_accumulation_steps = t.grad_accum

        seed_everything(self.cfg.run.seed + self.rank)
        cuda = accelerator.device.type == "cuda"
        # before DDP/FSDP/compile wrap it
        self.recomputed_blocks = checkpoint_blocks(job.model, t.activation_checkpointing)
        self.model = accelerator.prepare(job.model)
        self.sharded = is_sharded(self.model)
        ns_dtype = getattr(accelerator, "ns_dtype", torch.bfloat16)
        self.optimizer = accelerator.prepare(make_optimizer(self.model, t, sharded=self.sharded, ns_dtype=ns_dtype))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # each group's peak; the schedule scales them
        # never rewires a compiled wrapper
        self.raw_model = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.flops_per_token = (
            self.raw_model.estimate_flops_per_token() if hasattr(self.raw_model, "estimate_flops_per_token") else 0
        )
        self.peak = peak_flops(torch.cuda.get_device_name(accelerator.device)) if cuda else None

        self.train_split, self.val_split = (
            open_split(job.data_dir, "train", self.cfg.data),
            open_split(job.data_dir, "val", self.cfg.data),
        )
        for name, split in (("train", self.train_split), ("val", self.val_split)):
            check_split_size(name, len(split.tokens), self.block_size)
        loader = BatchLoader(
            self.train_split,
            self.block_size,
            t.batch_size,
            seed=self.cfg.run.seed,
            rank=self.rank,
            world_size=self.world,
            mode=self.cfg.data.loader,
        )
        self.batches = DeviceBatches(loader, accelerator.device)

        self.checkpointer = Checkpointer(run.checkpoints, accelerator, keep=t.keep_checkpoints)
        self.parts: dict[str, Any] = {
            "train": self.state,
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer.optimizer),
        }
        if accelerator.scaler is not None:
            self.parts["scaler"] = accelerator.scaler
        self.parts |= {"loader": self.batches, "rng": RNGState()}  # the RNG last: nothing may draw after it is restored
        if run.resume_from:
            self._restore()
        self.lr = self.base_lrs[0]
        self._clock = time.perf_counter
        self._t0, self._elapsed_base = self._clock(), 0.0

    def _restore(self) -> None:
        s, t = self.state, self.cfg.train
        restored = self.checkpointer.restore(self.run.resume_from, self.parts)
        if "rng" not in restored:  # a rank the checkpoint did not have (more processes now)
            seed_everything(self.cfg.run.seed + self.rank + 7919 * s.step)
        if self.acc.is_main_process:
            if s.world_size != self.world:
                log(
                    f"resuming a checkpoint written by {s.world_size} process(es) on {self.world}: grad_accum {s.grad_accum} -> {t.grad_accum} "
                    f"keeps {self.tokens_per_step:,} tokens per optimizer step; the data stream continues where it stopped, "
                    "but the result is not bit-identical to a run that kept one process count"
                )
            elif s.grad_accum != t.grad_accum:
                log(
                    f"train.grad_accum {t.grad_accum} instead of the checkpoint's {s.grad_accum}: {self.tokens_per_step:,} tokens per optimizer step"
                )
        s.world_size, s.tokens_per_step, s.batch_size, s.grad_accum, s.block_size = (
            self.world,
            self.tokens_per_step,
            t.batch_size,
            t.grad_accum,
            self.block_size,
        )

    # --- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Every rank takes part (sharded weights are gathered); the main process writes the folder atomically, then
        refreshes the run's model.safetensors and summary.json."""
        if self.sharded:
            self.model.reshard()  # an eval or a sample leaves the root unsharded; gather from a clean state
        states = self.checkpointer.save(self.state.step, self.parts)
        if states is not None:
            self.export(states["model"])
        self.acc.wait_for_everyone()

    def export(self, model_sd: dict[str, torch.Tensor]) -> None:
        """The plain model a user samples, finetunes or exports (+ extras), and summary.json."""
        self.run.write_model(self.job.export_weights(model_sd) if self.job.export_weights else model_sd)
        if self.job.save_extras:
            self.job.save_extras(model_sd, self.run.path)
        s = self.state
        summary = {
            "best_val_loss": s.best_val_loss,
            "final_val_loss": s.last_val_loss,
            "steps": s.step,
            "tokens_seen": s.tokens_seen,
            "wall_s": round(s.elapsed_s, 3),
            "tokens_per_s": round(s.tokens_seen / s.elapsed_s, 1) if s.elapsed_s else None,
            "world_size": self.world,
            "tokens_per_step": self.tokens_per_step,
        }
        self.run.write_summary(summary | ({"parent": self.job.parent} if self.job.parent else {}))

    # --- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over a fixed set of `eval_iters` batches per split, spread over the ranks."""
        self.model.eval()
        if not self.state.eval_iters:
            self.state.eval_iters = self._eval_iters_within_budget()
        out = {
            name: self._eval_split(split)
            for name, split in (("eval_train_loss", self.train_split), ("val_loss", self.val_split))
        }
        self.model.train()
        return out

    def _eval_iters_within_budget(self) -> int:
        """train.eval_iters, or fewer when a time budget is set and the run's evaluations would cost more than EVAL_SHARE of it.

        Decided once per run from the slowest rank's time for one batch (the faster of a second and a third forward:
        the first pays for warm-up, and the second may still be growing the process's memory) and kept in the
        checkpoint, so every evaluation of the run, resumed or not, uses the same batches."""
        t = self.cfg.train
        if t.time_budget_s <= 0:
            return t.eval_iters
        x, y = next(eval_batches(self.val_split, self.block_size, t.batch_size, 1, seed=self.cfg.run.seed))
        x, y = x.to(self.acc.device), y.to(self.acc.device)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            self.model(x, y, return_logits=False)[1].item()
            times.append(time.perf_counter() - start)
        per_batch = self.acc.reduce(torch.tensor(min(times[1:]), device=self.acc.device), "max").item()
        n, evaluations = affordable_eval_iters(per_batch, t, self.world)
        if n < t.eval_iters and self.acc.is_main_process:
            log(
                f"warning: {evaluations} evaluation{'s' * (evaluations > 1)} of train.eval_iters={t.eval_iters} batches per split would take about "
                f"{evaluations * 2 * t.eval_iters * per_batch / self.world:.0f} s here, over {EVAL_SHARE:.0%} of train.time_budget_s={t.time_budget_s:g}; "
                f"evaluating {n} batches per split in this run instead"
            )
        return n

    def _eval_split(self, split: Any) -> float:
        t, device, n = self.cfg.train, self.acc.device, self.state.eval_iters
        mine = len(range(self.rank, n, self.world))
        # With sharded weights every forward is a collective: every rank runs as many as the busiest one, padding with
        # batches that count for nothing.
        rounds = -(-n // self.world) if self.sharded else mine
        batches = eval_batches(
            split, self.block_size, t.batch_size, n, seed=self.cfg.run.seed, rank=self.rank, world_size=self.world
        )
        pad = None
        total = torch.zeros(2, device=device, dtype=torch.float32)
        for i in range(rounds):
            if i < mine:
                x, y = next(batches)
            else:
                pad = pad or next(eval_batches(split, self.block_size, t.batch_size, 1, seed=self.cfg.run.seed))
                x, y = pad
            _, loss = self.model(x.to(device), y.to(device), return_logits=False)
            total += torch.stack([loss.float(), torch.ones((), device=device)]) * float(i < mine)
        total = self.acc.reduce(total, "sum")
        return (total[0] / total[1]).item()

    def sample(self) -> str:
        t = self.cfg.train
        try:
            ids = self.job.tokenizer.encode(t.sample_prompt)
        except UserError as e:
            return f"(no sample: {e})"
        idx = torch.tensor([ids or [0]], device=self.acc.device)
        gen = torch.Generator(device=self.acc.device).manual_seed(self.cfg.run.seed)
        if self.sharded:
            self.model.unshard()  # generation calls the root's submodules directly, past FSDP's root hooks
        try:
            with self.acc.autocast():
                out = self.raw_model.generate(idx, t.sample_tokens, temperature=1.0, top_k=None, generator=gen)
        finally:
            if self.sharded:
                self.model.reshard()
        return self.job.tokenizer.decode(out[0, len(ids) :].tolist())

    # --- training -----------------------------------------------------------------------------------

    def train_step(self) -> float | None:
        """One optimizer step over grad_accum micro-batches; the loss averaged over micro-batches and ranks.

        One host sync per step: a single all-reduce agrees on the loss, the gradient norm, a pending stop signal and
        the elapsed time (which drives the time budget and its LR schedule), so every rank takes the same decisions.
        """
        t, s, device = self.cfg.train, self.state, self.acc.device
        factor = lr_factor(s.step, s.elapsed_s, t)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        total = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            x, y = self.batches.next()
            with self.acc.accumulate(self.model):
                _, loss = self.model(x, y, return_logits=False)
                self.acc.backward(loss)
            total += loss.detach().float()
        clip = t.grad_clip > 0
        norm = (
            self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip) if clip else torch.zeros((), device=device)
        )
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients give a DTensor norm
        host = torch.tensor(
            [float(self.stop_signal is not None), self._elapsed_base + self._clock() - self._t0], dtype=torch.float32
        )
        stats = torch.cat([torch.stack([total / t.grad_accum, norm.float().to(device)]), host.to(device)])
        loss, norm_sum, stop, elapsed = self.acc.reduce(stats, "sum").tolist()
        # Every rank acts on this agreed flag, never on its own: a signal landing after the reduce counts at the next step.
        self.stopping = stop > 0
        s.elapsed_s = elapsed / self.world
        loss /= self.world
        # fp16's scaler skips such steps itself
        bad_grad = clip and self.acc.scaler is None and not math.isfinite(norm_sum)
        if not math.isfinite(loss) or bad_grad:
            what = (
                f"the loss became {loss}"
                if not math.isfinite(loss)
                else f"the gradient norm became {norm_sum / self.world}"
            )
            if t.on_nan == "stop":
                raise NonFiniteLoss(
                    f"{what} at step {s.step + 1}; stopping without saving. The last good checkpoint is untouched: "
                    "lower train.lr, raise train.warmup_steps or use train.mixed_precision=no, or pass train.on_nan=skip to skip such steps"
                )
            if self.acc.is_main_process:
                log(f"warning: {what} at step {s.step + 1}; skipped this optimizer step (train.on_nan=skip)")
            if self.acc.scaler is None:
                self.optimizer.zero_grad(set_to_none=True)
                return None
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss if math.isfinite(loss) else None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            os._exit(128 + signum)  # second signal: leave at once
        self.stop_signal = signum
        if self.acc.is_main_process:
            log(
                f"\nreceived {signal.Signals(signum).name}: writing a checkpoint at the end of this step, then exiting (signal again to exit at once)"
            )

    def fit(self) -> TrainState:
        cfg, t, s = self.cfg, self.cfg.train, self.state
        log_main = log if self.acc.is_main_process else (lambda _m: None)
        if self.acc.is_main_process:
            self.run.begin(cfg, self.job.tokenizer, self.job.data_fingerprint, self.job.parent)
        self.acc.wait_for_everyone()
        log_main(self._describe())
        tracker = Tracker(self.acc, self.run, cfg, s.step, s.elapsed_s, s.wandb_id)
        profiler = Profiler(
            cfg.log,
            self.run.profile,
            self.rank,
            self.acc.is_main_process,
            self.acc.device.type == "cuda",
            first_step=s.step + 1,
        )
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._t0, self._elapsed_base = self._clock(), s.elapsed_s
        try:
            if s.step == 0 and t.eval_at_start:
                self._eval_and_log(tracker, {"step": 0, "tokens": 0, "elapsed_s": 0.0})
            last_time, last_tokens = time.perf_counter(), s.tokens_seen
            while True:
                with profiler.step(s.step + 1):  # log.profile_steps; running out of memory becomes one line
                    loss = self.train_step()
                s.step += 1
                s.tokens_seen += self.tokens_per_step
                done, stopping = s.finished(t), self.stopping
                # also when stopping: the metrics stay those of an uninterrupted run
                eval_due = s.step % t.eval_interval == 0 or done
                if s.step % t.log_interval == 0 or eval_due or done:
                    now = time.perf_counter()
                    tok_s = (s.tokens_seen - last_tokens) / max(now - last_time, 1e-9)
                    record = {
                        "step": s.step,
                        "train_loss": loss,
                        "lr": self.lr,
                        "tokens": s.tokens_seen,
                        "tokens_per_s": round(tok_s, 1),
                        "elapsed_s": round(s.elapsed_s, 3),
                    }
                    if self.peak:
                        record["mfu"] = round(self.flops_per_token * tok_s / (self.peak[0] * self.world), 4)
                    self._eval_and_log(tracker, record) if eval_due else tracker.metrics(record)
                    tracker.progress(
                        s.step,
                        s.elapsed_s,
                        loss=f"{loss:.4f}" if loss is not None else "skipped",
                        tok_s=f"{tok_s:,.0f}",
                    )
                    last_time, last_tokens = time.perf_counter(), s.tokens_seen
                if s.step % t.checkpoint_interval == 0 or done or stopping:
                    self.save_checkpoint()
                if stopping:
                    name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another process"
                    log_main(
                        f"stopped by {name} at step {s.step}; checkpoint written to {self.run.path}; rerun the same command to resume"
                    )
                    self.close()  # every rank is here
                    raise SystemExit(128 + (self.stop_signal or signal.SIGTERM))
                if done:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            profiler.close()
            tracker.close()
        log_main(
            f"done: {s.step} steps, val loss {s.last_val_loss:.4f} (best {s.best_val_loss:.4f}), {s.elapsed_s:.1f} s; model in {self.run.path / 'model.safetensors'}"
        )
        if self.acc.device.type == "cuda":
            log_main(
                f"peak GPU memory (process 0): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved"
            )
        if not self.sharded:
            check_replicas_agree(self.acc, self.raw_model)
        self.close()
        return s

    def _describe(self) -> str:
        t = self.cfg.train
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        n_train = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        lines = [
            f"world size {self.world} ({self.acc.distributed_type.value}, {type(self.model).__name__}) on {self.acc.device}, "
            f"{torch.get_num_threads()} threads/process, precision {t.mixed_precision}, compile {t.compile}",
            f"model: {n_params / 1e6:.3f}M parameters ({n_train / 1e6:.3f}M trainable); optimizer {self._optimizer_name()}",
            f"tokens per optimizer step: {t.batch_size} (micro-batch) x {self.block_size} (block) x {t.grad_accum} (accumulation) x {self.world} (processes) = {self.tokens_per_step:,}",
            f"run directory: {self.run.path}",
        ]
        if self.recomputed_blocks:
            n, of = self.recomputed_blocks, self.cfg.model.n_layer
            lines.append(
                f"activation checkpointing ({t.activation_checkpointing}): {n} of {of} Blocks recompute their activations in the backward pass"
            )
        if self.peak:
            lines.append(
                f"MFU is quoted against the {self.peak[1]} datasheet's dense bf16 peak, {self.peak[0] / 1e12:.0f} TFLOP/s per GPU"
            )
        return "\n".join(lines)

    def _optimizer_name(self) -> str:
        opt = self.optimizer.optimizer
        if isinstance(opt, torch.optim.AdamW):
            return "fused AdamW" if opt.defaults.get("fused") else "AdamW"
        return f"Muon (Newton-Schulz in {str(opt.ns_dtype).removeprefix('torch.')}) + AdamW"

    def close(self) -> None:
        """Leave the process group cleanly: drop the wrappers (DDP holds the group's buffers), then the group."""
        self.model = self.optimizer = self.parts = None
        teardown(self.acc)

    def _eval_and_log(self, tracker: Tracker, record: dict[str, Any]) -> None:
        losses = self.evaluate()
        s = self.state
        s.record_val(losses["val_loss"])
        tracker.metrics({**record, **losses})
        tracker.write(f"step {s.step}: train {losses['eval_train_loss']:.4f}, val {losses['val_loss']:.4f}")
        # sharded weights: every rank must take part in generation; otherwise the main process alone samples
        if self.cfg.train.sample_tokens and (self.acc.is_main_process or self.sharded):
            tracker.sample(s.step, self.cfg.train.sample_prompt, self.sample())
