"""Looking inside the training step: a torch profiler trace of chosen steps, and CUDA memory snapshots.

    profiler = Profiler(cfg.log, run.profile, rank, main, cuda, first_step=state.step + 1)
    with profiler.step(n):          # n: the number of the step about to run (1-based, as in metrics.jsonl)
        loss = train_step()
    profiler.close()

log.profile_steps=A-B records steps A to B with torch.profiler (one warm-up step before A when there is one) and
writes RUN_DIR/profile/steps_A-B_rank{R}.pt.trace.json (open it in https://ui.perfetto.dev, or point TensorBoard's
profiler plugin at the folder), each step under the name "step N"; the main process prints the operators that took
the most time. On CUDA the same window also records the allocator's history and writes memory_steps_A-B_rank{R}.pickle
(torch's snapshot format, for https://pytorch.org/memory_viz; dist_gpt only writes it). A step that runs out of memory
becomes one UserError; on CUDA it first writes memory_oom_step{N}_rank{R}.pickle. Outside the window nothing is
recorded: a step pays for one `with` and a comparison (about 5 microseconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from dist_gpt.config import LogConfig, step_range
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write
from dist_gpt.tracking import log

TOP_OPERATORS = 15
MEMORY_HISTORY_ENTRIES = 100_000  # allocation events the CUDA allocator keeps (the oldest are dropped)


class Profiler:
    """log.profile_steps and log.memory_history for one process; a no-op (beyond catching OOM) when both are off."""

    def __init__(self, cfg: LogConfig, folder: Path, rank: int, main: bool, cuda: bool, first_step: int):
        self.folder, self.rank, self.main, self.cuda = folder, rank, main, cuda
        self.history_always = cuda and cfg.memory_history
        self.prof: Any = None  # the torch profiler, only while the window is open
        self.window: tuple[int, int] | None = None  # the steps recorded (first, last)
        self.start_at = 0  # the step that opens the window (0: none)
        window = step_range(cfg.profile_steps)
        if window and window[1] < first_step:
            if main:
                log(
                    f"log.profile_steps={cfg.profile_steps}: this run resumes at step {first_step}, after those steps; nothing is profiled"
                )
        elif window:
            # a run resumed inside the window records the rest of it
            self.window = (
                max(window[0], first_step),
                window[1],
            )
            # one warm-up step before the window when this process runs one
            self.start_at = max(self.window[0] - 1, first_step)
        if self.history_always:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        elif cfg.memory_history and main:
            log(
                "warning: log.memory_history records the CUDA allocator's history; this run is not on a GPU, so it does nothing"
            )

    @contextmanager
    def step(self, n: int) -> Iterator[None]:
        """Around optimizer step `n`: opens and closes the profiling window, turns running out of memory into one line."""
        if n == self.start_at:
            self._open(n)
        try:
            # the trace's name for it
            with torch.profiler.record_function(f"step {n}") if self.prof is not None else nullcontext():
                yield
        except torch.OutOfMemoryError as e:
            raise self._out_of_memory(n, e) from None
        if self.prof is not None:
            self.prof.step()
            if n == self.window[1]:
                self.close()

    def close(self) -> None:
        """End an open window (a run that stopped inside it writes what it recorded)."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.stop()
        if self.cuda:
            first, last = self.window
            self._snapshot(f"memory_steps_{first}-{last}")
            if not self.history_always:
                torch.cuda.memory._record_memory_history(enabled=None)

    # --- the window ----------------------------------------------------------------------------------

    def _open(self, n: int) -> None:
        first, last = self.window
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
        )
        schedule = torch.profiler.schedule(wait=0, warmup=first - n, active=last - first + 1, repeat=1)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._write_trace,
            record_shapes=True,
            profile_memory=True,
        )
        if self.cuda and not self.history_always:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self.prof.start()

    def _write_trace(self, prof: Any) -> None:
        first, last = self.window
        path = self.folder / f"steps_{first}-{last}_rank{self.rank}.pt.trace.json"
        atomic_write(path, lambda tmp: prof.export_chrome_trace(str(tmp)))
        if self.main:
            sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
            log(
                f"profile of steps {first}-{last} (rank {self.rank}), operators by {sort}:\n{prof.key_averages().table(sort_by=sort, row_limit=TOP_OPERATORS)}"
            )
            log(
                f"profiler trace written to {path} (open it in https://ui.perfetto.dev or TensorBoard's profiler plugin)"
            )

    # --- memory --------------------------------------------------------------------------------------

    def _snapshot(self, name: str) -> Path:
        """The CUDA allocator's state (and its recorded history) as RUN_DIR/profile/NAME_rank{R}.pickle."""
        path = self.folder / f"{name}_rank{self.rank}.pickle"
        atomic_write(path, lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)))
        return path

    def _out_of_memory(self, n: int, error: BaseException) -> UserError:
        where, snapshot = "CPU", ""
        if self.cuda:
            where = "GPU"
            try:
                snapshot = f"; memory snapshot in {self._snapshot(f'memory_oom_step{n}')} (open it at https://pytorch.org/memory_viz"
                snapshot += (
                    ")"
                    if self.history_always
                    else "; rerun with --log.memory_history=true to see which code allocated what)"
                )
            except UserError as e:
                snapshot = f"; no memory snapshot ({e})"
        first_line = (str(error).splitlines() or [""])[0][:200]
        return UserError(
            f"step {n} ran out of {where} memory ({first_line}){snapshot}; lower train.batch_size (raising train.grad_accum keeps the "
            "tokens per step), set train.activation_checkpointing=full, or lower model.block_size"
        )
