"""The checks behind bench/gpu.sh: the GPU path proved in two short commands, each check with its own time limit.

    python bench/gpu_checks.py prepare --data DIR [--source input.txt] [--dry-run]    # here: tokenized arrays to carry
    python bench/gpu_checks.py part1|part2 --data DIR --out DIR --work DIR [--dry-run] [--budget S]

part1: env, compile_smoke, lecture (configs/shakespeare_char.yaml, 5000 steps, bf16 + compile), lecture_load,
       lecture_sample, lecture_evaluate (all three on the lecture run), resume_compile
part2: env, compile_smoke, gpt2_compile, gpt2_eager (configs/gpt2_124m.yaml, 2^19 tokens/step), fsdp, fp16_vs_bf16

Every check ends PASS, FAIL, TIMEOUT or SKIP with its numbers in OUT/gpu_results.json and OUT/gpu_results.md.
Both are rewritten when a check starts (its row reads RUNNING) and ends, so the table is there whatever happens to
the command; rows of the other part already in OUT are kept. A failing check never stops the rest. A part stops
starting checks when its budget (--budget, about 6 minutes on a GPU) runs out: those rows read SKIP. This file
imports only the standard library; everything that touches torch runs in its own process (launch/*.py and
bench/gpu_probe.py), in its own session, so a time limit kills a launcher together with its workers.

--dry-run: the same checks at tiny sizes on the CPU (CUDA hidden, compile off, FSDP falls back), with `datasets`
and `wandb` made unimportable in the run stages as they are on the GPU machine (bench/gpu_nodeps/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LECTURE = "configs/shakespeare_char.yaml"
GPT2 = "configs/gpt2_124m.yaml"
RESULTS = "gpu_results"
MIN_START_S = 20  # a check is not started with less of the part's budget left


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU run and the dry run: sizes, time limits and tolerances."""

    lecture: tuple[str, ...]  # overrides of configs/shakespeare_char.yaml for the lecture run
    short: tuple[str, ...]  # the few-hundred-step lecture-model runs (resume, fp16, FSDP)
    gpt2: tuple[str, ...]  # overrides of configs/gpt2_124m.yaml
    gpt2_steps: dict[str, int]  # steps logged before the throughput runs are stopped, per compile setting
    gpt2_skip: int  # first steps left out of the throughput (compile, warm-up)
    sample_tokens: int
    lecture_best_max: float | None  # the lecture run must reach this best val (None: its val must fall)
    eval_tol: float  # launch/evaluate.py's full-split loss vs the trainer's final val
    resume_tol: float  # floor of the resume tolerance (3 x the noise of two uninterrupted runs)
    fsdp_tol: float  # floor of the FSDP tolerance (3 x the difference of two seeds)
    fp16_tol: float
    random_chars: int  # size of the random-token corpus
    budget_s: float  # per part
    timeouts: dict[str, float]


# Dry runs train in fp32 (a later key wins): bf16 autocast on a CPU without bf16 instructions is emulated (20 s a GPT-2 step)
TINY = (
    "--model.n_layer=2",
    "--model.n_head=2",
    "--model.n_embd=64",
    "--model.block_size=64",
    "--train.batch_size=8",
    "--train.mixed_precision=no",
)
GPU_SIZES = Sizes(
    lecture=(),
    short=(
        "--train.max_steps=300",
        "--train.eval_interval=100",
        "--train.eval_iters=50",
        "--train.checkpoint_interval=100",
        "--train.sample_tokens=0",
    ),
    gpt2=(),
    gpt2_steps={"true": 12, "false": 6},
    gpt2_skip=2,
    sample_tokens=500,
    lecture_best_max=1.50,
    eval_tol=0.03,
    resume_tol=0.01,
    fsdp_tol=0.03,
    fp16_tol=0.03,
    random_chars=2_000_000,
    budget_s=350,
    timeouts={
        "env": 60,
        "compile_smoke": 60,
        "lecture": 240,
        "lecture_load": 60,
        "lecture_sample": 90,
        "lecture_evaluate": 60,
        "resume_compile": 150,
        "gpt2_compile": 180,
        "gpt2_eager": 75,
        "fsdp": 180,
        "fp16_vs_bf16": 90,
    },
)
DRY_SIZES = Sizes(
    lecture=(
        *TINY,
        "--train.max_steps=20",
        "--train.eval_interval=10",
        "--train.eval_iters=4",
        "--train.checkpoint_interval=10",
        "--train.sample_tokens=16",
        "--train.log_interval=5",
    ),
    short=(
        *TINY,
        "--train.max_steps=30",
        "--train.warmup_steps=5",
        "--train.eval_interval=10",
        "--train.eval_iters=4",
        "--train.checkpoint_interval=10",
        "--train.sample_tokens=0",
    ),
    gpt2=(
        "--model.n_layer=2",
        "--model.n_head=2",
        "--model.n_embd=64",
        "--model.block_size=128",
        "--train.batch_size=2",
        "--train.tokens_per_step=512",
        "--train.mixed_precision=no",
    ),
    gpt2_steps={"true": 3, "false": 3},
    gpt2_skip=1,
    sample_tokens=32,
    lecture_best_max=None,
    eval_tol=0.15,
    resume_tol=0.01,
    fsdp_tol=0.03,
    fp16_tol=0.1,
    random_chars=300_000,
    budget_s=900,
    timeouts=dict.fromkeys(GPU_SIZES.timeouts, 300),
)


# ----------------------------------------------------------------------------- rows and outcomes


@dataclass
class Row:
    part: str
    check: str
    title: str
    status: str = "NOT RUN"  # PASS | FAIL | TIMEOUT | SKIP | RUNNING (the command died during it) | NOT RUN
    target: str = ""
    summary: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    logs: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.summary = f"{self.summary}; {text}" if self.summary else text


class Failed(Exception):
    """The check's FAIL, with the reason."""


class Skipped(Exception):
    """The check cannot run here; the reason goes into the table."""


class CheckTimeout(Exception):
    """The check ran out of its time limit (its processes are killed)."""


class Stopped(Exception):
    """The command itself got SIGTERM/SIGINT."""


# ----------------------------------------------------------------------------- processes


@dataclass
class Ctx:
    """What every check shares."""

    data: Path
    out: Path
    work: Path
    dry: bool
    sizes: Sizes
    env: dict[str, str]
    part: str = ""
    compile: str = "true"  # "false" after a failed compile smoke test, and in a dry run (see main)
    compile_note: str = ""
    peak_flops: float | None = None
    deadline: float = 0.0  # the running check's
    procs: list[Proc] = field(default_factory=list)
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def lecture_data(self) -> tuple[str, ...]:
        return (f"--data.source={self.data / 'input.txt'}", f"--data.dir={self.data / 'shakespeare_char'}")

    def random_data(self) -> tuple[str, ...]:
        """The random-token corpus as a data section; prepare uses the same keys, so the arrays are found up to date."""
        return (
            "--data.name=random_tokens",
            "--data.tokenizer=char",
            f"--data.source={self.data / 'random.txt'}",
            f"--data.dir={self.data / 'random_tokens'}",
            "--data.val_fraction=0.02",
        )


class Proc:
    """A command in its own session (a kill reaches a launcher and every worker it started): stdout to
    logs/PART/NAME.out, stderr to logs/PART/NAME.log."""

    def __init__(self, ctx: Ctx, name: str, cmd: list[str]):
        self.name = name
        logs = ctx.out / "logs" / ctx.part
        logs.mkdir(parents=True, exist_ok=True)
        self.log, self.stdout = logs / f"{name}.log", logs / f"{name}.out"
        with open(self.log, "w") as err, open(self.stdout, "w") as out:
            err.write("$ " + " ".join(cmd) + "\n")
            err.flush()
            self.p = subprocess.Popen(cmd, cwd=REPO, env=ctx.env, stdout=out, stderr=err, start_new_session=True)
        self.start = time.monotonic()
        self.seconds: float | None = None
        ctx.procs.append(self)

    def poll(self) -> int | None:
        rc = self.p.poll()
        if rc is not None and self.seconds is None:
            self.seconds = time.monotonic() - self.start
        return rc

    def wait(self, ctx: Ctx) -> int:
        """Its exit code; CheckTimeout (after killing it) at the check's deadline."""
        while (rc := self.poll()) is None:
            if time.monotonic() > ctx.deadline:
                self.kill()
                raise CheckTimeout(f"{self.name} still running at the check's time limit, killed")
            time.sleep(0.05)
        return rc

    def kill(self) -> None:
        """SIGKILL it and every process below it (torchrun starts its workers in sessions of their own), and wait
        until they are gone, as when a machine dies."""
        tree = [self.p.pid, *descendants(self.p.pid)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.p.wait()
        self.poll()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in tree[1:]) and time.monotonic() < deadline:
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout.read_text(errors="replace")

    def error_line(self) -> str:
        """The last `error: ...` line (dist_gpt's one-line errors), else the last exception line, else the last line."""
        lines = [line.strip() for line in self.text().splitlines() if line.strip()]
        ours = [line for line in lines if line.startswith("error:")]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Failed)\b", line)]
        return (ours or raised or lines or ["(no output)"])[-1][:400]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, killed and waiting to be reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(ctx: Ctx, proc: Proc, ready: Callable[[], bool], what: str) -> bool:
    """Poll `ready` until it holds (True) or `proc` ends first (False); CheckTimeout at the deadline."""
    while not ready():
        if proc.poll() is not None:
            return ready()
        if time.monotonic() > ctx.deadline:
            proc.kill()
            raise CheckTimeout(f"{proc.name}: no {what} within the check's time limit, killed")
        time.sleep(0.01)
    return True


def probe(ctx: Ctx, name: str, *args: str) -> dict[str, Any]:
    """bench/gpu_probe.py ARGS in its own process; its JSON answer, or Failed."""
    p = Proc(ctx, name, [sys.executable, "bench/gpu_probe.py", *args])
    rc = p.wait(ctx)
    answer = [line for line in p.output().splitlines() if line.startswith("{")]
    if rc != 0 or not answer:
        raise Failed(f"{name} exited {rc}: {p.error_line()}")
    return json.loads(answer[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(
    ctx: Ctx, run: str, config: str, *args: str, log: str = "", fresh: bool = True, launcher: tuple[str, ...] = ()
) -> Proc:
    """launch/pretrain.py (or through `launcher`) into WORK/run; `fresh` deletes an old run directory first."""
    run_dir = ctx.work / run
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        *(launcher or (sys.executable,)),
        "launch/pretrain.py",
        "--config",
        config,
        *args,
        f"--run.out_dir={run_dir}",
        "--log.wandb=false",
        "--log.progress=false",
    ]
    return Proc(ctx, log or run, cmd)


def fsdp_launcher() -> tuple[str, ...]:
    accelerate = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml")
    return (*accelerate, "--num_processes", "1", "--main_process_port", str(free_port()))


# ----------------------------------------------------------------------------- reading a run


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill
            rows.append(json.loads(line))
    return rows


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in metrics(run_dir)), default=-1)


def summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (a folder appears only when its save finished), oldest first."""
    return sorted(
        (p for p in run_dir.glob("checkpoints/step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )


def final_val(run_dir: Path) -> float:
    """The run's last evaluation (its summary, else the last val in metrics.jsonl)."""
    value = summary(run_dir).get("final_val_loss")
    if value is None:
        evals = [r["val_loss"] for r in metrics(run_dir) if r.get("val_loss") is not None]
        if not evals:
            raise Failed(f"{run_dir.name} logged no val loss")
        value = evals[-1]
    return value


def resumed_from(log_text: str) -> int | None:
    m = re.search(r"resuming from \S*step_(\d+)", log_text)
    return int(m[1]) if m else None


def tokens_per_step(log_text: str) -> int | None:
    m = re.search(r"tokens per optimizer step: .* = ([\d,]+)", log_text)
    return int(m[1].replace(",", "")) if m else None


def header(log_text: str) -> str:
    return next((line for line in log_text.splitlines() if line.startswith("world size")), "(no 'world size' line)")


def keep_run_files(ctx: Ctx, run: str) -> None:
    """The run's small files under OUT/runs/RUN (the weights stay in WORK)."""
    dest = ctx.out / "runs" / run
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "samples.jsonl"):
        if (ctx.work / run / name).is_file():
            shutil.copy2(ctx.work / run / name, dest / name)


def finish(ctx: Ctx, proc: Proc, run: str, row: Row) -> None:
    """Wait for a training run; Failed unless it exits 0."""
    rc = proc.wait(ctx)
    keep_run_files(ctx, run)
    row.logs.append(proc.log.name)
    if rc != 0:
        raise Failed(f"{proc.name} exited {rc}: {proc.error_line()}")


def kill_after_first_checkpoint(ctx: Ctx, proc: Proc, run: str, row: Row) -> str:
    """SIGKILL `proc` and its workers once its first checkpoint is complete; that checkpoint's name."""
    run_dir = ctx.work / run
    row.logs.append(proc.log.name)
    if not wait_until(ctx, proc, lambda: bool(checkpoints(run_dir)), "first checkpoint"):
        raise Failed(f"{proc.name} exited {proc.poll()} before its first checkpoint: {proc.error_line()}")
    finished = proc.poll()
    proc.kill()
    if finished is not None:
        raise Failed(f"{proc.name} finished (exit {finished}) before it could be killed after its first checkpoint")
    return checkpoints(run_dir)[0].name


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"


# ----------------------------------------------------------------------------- the checks


def check_env(ctx: Ctx, row: Row) -> None:
    info = probe(ctx, "env", "env")
    row.numbers = info
    ctx.peak_flops = info.get("peak_bf16_flops")
    missing = ", ".join(info["missing"]) or "none"
    versions = f"torch {info['torch']} (CUDA {info['cuda_runtime']}), accelerate {info['accelerate']}, python {info['python']}, {info['cpus']} CPUs"
    if info["cuda"]:
        gpu = f"{info['devices']} x {info['device']} ({info['memory_gib']} GiB, sm {info['capability']}, driver {info.get('driver')}, bf16 {info['bf16']})"
    else:
        gpu = "no CUDA device (dry run: CPU)" if ctx.dry else "no CUDA device"
    row.summary = f"{gpu}; {versions}; not installed: {missing}; checkout {git_describe()}"
    if not info["cuda"] and not ctx.dry:
        raise Failed("CUDA is not available to torch")


def check_compile_smoke(ctx: Ctx, row: Row) -> None:
    """torch.compile within 20 s; on failure every later check trains eager, and says so."""
    backend = "eager" if ctx.dry else "inductor"
    try:
        info = probe(ctx, "compile_smoke", "compile", "--device", ctx.device, "--backend", backend, "--limit", "20")
        if not info["matches_eager"]:
            raise Failed(
                f"the compiled MLP differs from eager (loss diff {info['loss_diff']:.2e}, grad diff {info['grad_diff']:.2e})"
            )
    except (Failed, CheckTimeout):
        if not ctx.dry:
            ctx.compile, ctx.compile_note = "false", "eager: the compile smoke test failed"
            row.add("falling back to eager: the training checks below run with train.compile=false")
        raise
    row.numbers = info
    row.summary = f"torch.compile(backend={backend}) of an MLP, forward + backward: {info['seconds']:.1f} s, matches eager (grad diff {info['grad_diff']:.1e})"
    if ctx.dry:
        ctx.compile = "false"
        row.add("dry run: the eager backend; the training checks run with compile off")


def check_lecture(ctx: Ctx, row: Row) -> None:
    """The lecture model, 5000 steps, bf16 + compile: one run that lecture_load/_sample/_evaluate use too.

    Times: the trainer's clock (elapsed_s: compile, evaluations and samples included) and the training steps alone
    (step x the steady time per step, from the logged tokens/s); the 60 s target is judged on the steps alone.
    A run that fails or times out still reports what its metrics.jsonl holds."""
    s = ctx.sizes
    p = pretrain(
        ctx,
        "lecture",
        LECTURE,
        *ctx.lecture_data(),
        "--train.mixed_precision=bf16",
        f"--train.compile={ctx.compile}",
        *s.lecture,
    )
    try:
        finish(ctx, p, "lecture", row)
    finally:
        keep_run_files(ctx, "lecture")
        report_lecture(ctx, row, p)
    n = row.numbers
    if s.lecture_best_max is None:
        row.target = "n/a (dry run)"
        if not n["final_val"] < n["first_val"]:
            raise Failed("the val loss did not fall")
        return
    hit = n["val<=1.47"]
    met = hit is not None and hit["steps_only_s"] is not None and hit["steps_only_s"] <= 60
    row.target = f"{'met' if met else 'missed'}: val <= 1.47 within 60 s of training steps" + (
        f" ({hit['steps_only_s']:.1f} s)" if hit else ""
    )
    if n["steps"] != 5000 or n["best_val"] > s.lecture_best_max:
        raise Failed(f"expected 5000 steps and best val <= {s.lecture_best_max}")


def report_lecture(ctx: Ctx, row: Row, p: Proc) -> None:
    """The lecture row's numbers and summary, from the run's metrics.jsonl and log (complete or not)."""
    rows, log = metrics(ctx.work / "lecture"), p.text()
    evals = [r for r in rows if r.get("val_loss") is not None]
    train = [r for r in rows if r.get("train_loss") is not None and r.get("val_loss") is None]
    per_step = tokens_per_step(log)
    step_s = statistics.median(per_step / r["tokens_per_s"] for r in train) if train and per_step else None
    if not evals:
        return
    steps = rows[-1]["step"]
    hits = {thr: next((r for r in evals if r["val_loss"] <= thr), None) for thr in (1.48, 1.47)}
    peak = re.search(r"peak GPU memory \(process 0\): ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", log)
    row.numbers = {
        "steps": steps,
        "first_val": evals[0]["val_loss"],
        "best_val": min(r["val_loss"] for r in evals),
        "final_val": evals[-1]["val_loss"],
        "process_s": round(p.seconds, 1) if p.seconds else None,
        "loop_s": rows[-1]["elapsed_s"],
        "ms_per_step": 1000 * step_s if step_s else None,
        "steps_only_s": steps * step_s if step_s else None,
        "peak_alloc_gib": float(peak[1]) if peak else None,
        "peak_reserved_gib": float(peak[2]) if peak else None,
        **{
            f"val<={thr}": {
                "step": r["step"],
                "elapsed_s": r["elapsed_s"],
                "steps_only_s": r["step"] * step_s if step_s else None,
            }
            if r
            else None
            for thr, r in hits.items()
        },
    }

    def reached(thr: float) -> str:
        r = row.numbers[f"val<={thr}"]
        if not r:
            return f"val <= {thr} not reached"
        return f"val <= {thr} at step {r['step']} ({fmt_s(r['steps_only_s'])} of steps, {r['elapsed_s']:.1f} s on the trainer's clock)"

    n = row.numbers
    row.add(
        f"{steps} steps, best val {n['best_val']:.4f} (final {n['final_val']:.4f}); {reached(1.48)}; {reached(1.47)}; "
        f"training steps {fmt_s(n['steps_only_s'])} ({n['ms_per_step'] or 0:.1f} ms/step); the trainer's clock {n['loop_s']:.1f} s "
        f"(with compile, evaluations and samples); the process {fmt_s(n['process_s'])}; peak memory "
        + (f"{peak[1]} GiB allocated, {peak[2]} GiB reserved" if peak else "n/a (CPU, or the run did not end)")
        + f"; {header(log)}"
    )
    if ctx.compile_note:
        row.add(ctx.compile_note)


def lecture_run(ctx: Ctx, row: Row) -> Path:
    """The lecture check's run directory; when that check did not pass, its last checkpoint's model still serves (GPU
    time is scarce), and the row says so."""
    run_dir = ctx.work / "lecture"
    if not (run_dir / "model.safetensors").is_file():
        raise Failed("no lecture run to use: the lecture check wrote no model.safetensors")
    lecture = ctx.rows.get(("part1", "lecture"))
    if lecture and lecture.status != "PASS":
        row.add(
            f"on the model of the lecture run's last checkpoint (step {summary(run_dir).get('steps')}; the lecture check ended {lecture.status})"
        )
    return run_dir


def check_lecture_load(ctx: Ctx, row: Row) -> None:
    info = probe(ctx, "lecture_load", "load", str(lecture_run(ctx, row)), "--device", ctx.device)
    row.numbers = info
    bad = {name: f for name, f in info["files"].items() if not f["strict"] or f["wrapper_keys"]}
    names = " and ".join(info["files"])
    if bad:
        raise Failed(
            "; ".join(
                f"{name}: {f.get('error', '')} wrapper keys {f['wrapper_keys']}, missing {f['missing']}, unexpected {f['unexpected']}"
                for name, f in bad.items()
            )
        )
    row.add(
        f"{names} load strictly into a plain GPT ({info['params'] / 1e6:.2f}M parameters, no compile/DDP key prefixes); "
        f"load_run on {info['device']} + a forward pass: finite {info['forward_finite']}"
    )
    if not info["forward_finite"]:
        raise Failed("the forward pass gave non-finite logits")


def check_lecture_sample(ctx: Ctx, row: Row) -> None:
    run_dir, n = lecture_run(ctx, row), ctx.sizes.sample_tokens
    texts, rates = {}, {}
    for cache in ("on", "off"):
        flags = [] if cache == "on" else ["--no_kv_cache"]
        p = Proc(
            ctx,
            f"sample_cache_{cache}",
            [
                sys.executable,
                "launch/sample.py",
                "--run",
                str(run_dir),
                "--device",
                ctx.device,
                "--prompt",
                "\n",
                "--max_new_tokens",
                str(n),
                *flags,
            ],
        )
        row.logs.append(p.log.name)
        if (rc := p.wait(ctx)) != 0:
            raise Failed(f"sample.py (KV cache {cache}) exited {rc}: {p.error_line()}")
        m = re.search(r"(\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s \(KV cache (on|off)", p.text())
        if not m or int(m[1]) != n or m[4] != cache:
            raise Failed(f"sample.py (KV cache {cache}) did not report {n} tokens with the cache {cache}")
        texts[cache], rates[cache] = p.output(), float(m[3])
    row.numbers = {
        "tokens": n,
        "tokens_per_s_cache": rates["on"],
        "tokens_per_s_no_cache": rates["off"],
        "same_text": texts["on"] == texts["off"],
    }
    row.add(
        f"--device {ctx.device}, {n} tokens: {rates['on']:,.0f} tokens/s with the KV cache, {rates['off']:,.0f} without "
        f"({rates['on'] / rates['off']:.1f}x); same text both ways: {texts['on'] == texts['off']}"
    )


def check_lecture_evaluate(ctx: Ctx, row: Row) -> None:
    run_dir = lecture_run(ctx, row)
    p = Proc(
        ctx, "evaluate", [sys.executable, "launch/evaluate.py", "--run", str(run_dir), "--device", ctx.device, "--json"]
    )
    row.logs.append(p.log.name)
    if (rc := p.wait(ctx)) != 0:
        raise Failed(f"evaluate.py exited {rc}: {p.error_line()}")
    result = json.loads([line for line in p.output().splitlines() if line.startswith("{")][-1])
    trainer = final_val(run_dir)
    diff = result["loss"] - trainer
    row.numbers = {
        "loss": result["loss"],
        "trainer_final_val": trainer,
        "diff": diff,
        "tolerance": ctx.sizes.eval_tol,
        "tokens": result["tokens"],
        "bits_per_char": result["bits_per_char"],
    }
    row.add(
        f"--device {ctx.device}: every val token once ({result['tokens']:,} in {result['windows']} windows): loss {result['loss']:.4f}, "
        f"{result['bits_per_char']:.3f} bits/char; the trainer's final val (eval_iters random batches, autocast) {trainer:.4f}: diff {diff:+.4f} "
        f"(tolerance {ctx.sizes.eval_tol}); {p.seconds:.1f} s"
    )
    if abs(diff) > ctx.sizes.eval_tol:
        raise Failed(f"|diff| {abs(diff):.4f} > {ctx.sizes.eval_tol}")


def check_resume_compile(ctx: Ctx, row: Row) -> None:
    """Two uninterrupted runs (their difference is the noise) and one killed after its first checkpoint and rerun."""
    args = (*ctx.lecture_data(), "--train.mixed_precision=bf16", f"--train.compile={ctx.compile}", *ctx.sizes.short)
    a, b = (pretrain(ctx, name, LECTURE, *args) for name in ("resume_a", "resume_b"))
    c = pretrain(ctx, "resume_c", LECTURE, *args, log="resume_c_killed")
    killed_at = kill_after_first_checkpoint(ctx, c, "resume_c", row)
    c2 = pretrain(ctx, "resume_c", LECTURE, *args, log="resume_c_rerun", fresh=False)
    for proc, run in ((a, "resume_a"), (b, "resume_b"), (c2, "resume_c")):
        finish(ctx, proc, run, row)
    start = resumed_from(c2.text())
    if start is None:
        raise Failed(f"the rerun did not resume (no 'resuming from' line; the kill came after {killed_at})")
    val = {name: final_val(ctx.work / f"resume_{name}") for name in "abc"}
    noise, diff = abs(val["b"] - val["a"]), abs(val["c"] - val["a"])
    tol = max(3 * noise, ctx.sizes.resume_tol)
    train = {
        name: {
            r["step"]: r["train_loss"] for r in metrics(ctx.work / f"resume_{name}") if r.get("train_loss") is not None
        }
        for name in "abc"
    }
    after = [step for step in train["a"] if step > start and step in train["b"] and step in train["c"]]
    c_steps = [r["step"] for r in metrics(ctx.work / "resume_c")]
    row.numbers = {"killed_after": killed_at, "resumed_from": start, "val": val, "noise": noise, "diff": diff, "tolerance": tol,
                   "max_train_diff_c_a": max((abs(train["c"][s] - train["a"][s]) for s in after), default=None),
                   "max_train_diff_b_a": max((abs(train["b"][s] - train["a"][s]) for s in after), default=None)}  # fmt: skip
    n = row.numbers
    row.summary = (
        f"compile {ctx.compile}: SIGKILL after {killed_at}, the rerun resumed from step {start}; final val: uninterrupted A {val['a']:.4f}, "
        f"B {val['b']:.4f} (noise |A-B| {noise:.4f}), resumed C {val['c']:.4f} (|C-A| {diff:.4f}, tolerance {tol:.4f}); "
        f"train loss after the resume: max |C-A| {n['max_train_diff_c_a'] or 0:.4f}, max |B-A| {n['max_train_diff_b_a'] or 0:.4f}; "
        f"C bit-identical to A: {val['c'] == val['a']}"
    )
    if ctx.compile_note:
        row.add(ctx.compile_note)
    if len(c_steps) != len(set(c_steps)):
        raise Failed("the resumed run's metrics.jsonl repeats steps")
    if diff > tol:
        raise Failed(f"|C-A| {diff:.4f} > tolerance {tol:.4f}")


def check_gpt2(ctx: Ctx, row: Row, compile: str) -> None:
    """GPT-2 124M on random tokens at 2^19 tokens per step; stopped once enough steps are logged (no final eval/save)."""
    if compile == "true" and ctx.compile == "false" and not ctx.dry:
        raise Skipped("the compile smoke test failed; gpt2_eager measures the eager model")
    flag = "false" if ctx.dry else compile
    run, steps, skip = (
        f"gpt2_{'compile' if compile == 'true' else 'eager'}",
        ctx.sizes.gpt2_steps[compile],
        ctx.sizes.gpt2_skip,
    )
    p = pretrain(ctx, run, GPT2, *ctx.random_data(), "--train.mixed_precision=bf16", f"--train.compile={flag}", "--train.eval_at_start=false",
                 "--train.eval_iters=1", "--train.log_interval=1", "--train.checkpoint_interval=1000000", "--train.sample_tokens=0",
                 "--train.max_steps=100000", *ctx.sizes.gpt2)  # fmt: skip
    row.logs.append(p.log.name)
    if not wait_until(ctx, p, lambda: last_step(ctx.work / run) >= steps, f"step {steps}"):
        raise Failed(f"{run} exited {p.poll()} before step {steps}: {p.error_line()}")
    p.kill()  # the throughput is measured; the final eval and checkpoint are not part of this check
    keep_run_files(ctx, run)
    rows = [r for r in metrics(ctx.work / run) if r.get("train_loss") is not None]
    measured = [r for r in rows if r["step"] > skip]
    tok = statistics.median(r["tokens_per_s"] for r in measured)
    mfu = [r["mfu"] for r in measured if "mfu" in r]
    head = header(p.text())
    per_step = tokens_per_step(p.text())
    row.numbers = {"compile": flag, "steps_measured": [measured[0]["step"], measured[-1]["step"]], "tokens_per_s_median": tok,
                   "tokens_per_s_min": min(r["tokens_per_s"] for r in measured), "mfu_median": statistics.median(mfu) if mfu else None,
                   "peak_flops": ctx.peak_flops, "first_step_s": rows[0]["elapsed_s"], "tokens_per_step": per_step}  # fmt: skip
    n = row.numbers
    peak = (
        f"{ctx.peak_flops / 1e12:.0f} TFLOP/s (dense bf16 datasheet peak, trainer.PEAK_BF16_FLOPS)"
        if ctx.peak_flops
        else "the peak trainer.PEAK_BF16_FLOPS gives this GPU"
    )
    row.summary = (
        f"compile {flag}, steps {measured[0]['step']}-{measured[-1]['step']}: {tok:,.0f} tokens/s median (min {n['tokens_per_s_min']:,.0f}), "
        + (f"{1000 * per_step / tok:,.0f} ms/step, " if per_step else "")
        + (f"MFU {n['mfu_median']:.1%} of {peak}" if mfu else "MFU n/a (no CUDA)")
        + f"; step 1 done {rows[0]['elapsed_s']:.1f} s into the loop; {head}"
    )
    if ctx.dry:
        row.add("dry run: compile off, tiny model")
    if compile == "true" and not ctx.dry:
        row.target = f"{'met' if n['mfu_median'] and n['mfu_median'] >= 0.45 else 'missed'}: MFU >= 45%"
    other = ctx.rows.get(("part2", "gpt2_compile"))
    if compile == "false" and other and other.numbers.get("tokens_per_s_median"):
        n["compile_speedup"] = other.numbers["tokens_per_s_median"] / tok
        row.add(f"compile on is {n['compile_speedup']:.2f}x this")


def check_fsdp(ctx: Ctx, row: Row) -> None:
    """FSDP2 through accelerate launch (1 process): past its first checkpoint, killed, resumed; its weights load into a
    plain GPT; its val within the difference of two plain runs of different seeds."""
    args = (*ctx.lecture_data(), "--train.mixed_precision=bf16", *ctx.sizes.short)
    plain = pretrain(ctx, "fsdp_plain", LECTURE, *args, f"--train.compile={ctx.compile}")
    seed2 = pretrain(ctx, "fsdp_plain_seed2", LECTURE, *args, f"--train.compile={ctx.compile}", "--run.seed=1338")
    compile, compile_failed = ctx.compile, False
    while True:
        first = pretrain(
            ctx,
            "fsdp",
            LECTURE,
            *args,
            f"--train.compile={compile}",
            log=f"fsdp_killed_compile_{compile}",
            launcher=fsdp_launcher(),
        )
        try:
            killed_at = kill_after_first_checkpoint(ctx, first, "fsdp", row)
            break
        except Failed as e:
            if compile == "false":
                raise
            row.add(f"with compile on: {e}; retried eager")  # FSDP itself may still work: worth the time on a GPU
            compile, compile_failed = "false", True
    second = pretrain(
        ctx,
        "fsdp",
        LECTURE,
        *args,
        f"--train.compile={compile}",
        log=f"fsdp_rerun_compile_{compile}",
        fresh=False,
        launcher=fsdp_launcher(),
    )
    for proc, run in ((plain, "fsdp_plain"), (seed2, "fsdp_plain_seed2"), (second, "fsdp")):
        finish(ctx, proc, run, row)
    start = resumed_from(second.text())
    head = header(second.text())
    loaded = probe(ctx, "fsdp_load", "load", str(ctx.work / "fsdp"), "--device", ctx.device)
    val = {
        "fsdp": final_val(ctx.work / "fsdp"),
        "plain": final_val(ctx.work / "fsdp_plain"),
        "seed2": final_val(ctx.work / "fsdp_plain_seed2"),
    }
    noise, diff = abs(val["seed2"] - val["plain"]), abs(val["fsdp"] - val["plain"])
    tol = max(3 * noise, ctx.sizes.fsdp_tol)
    strict = all(f["strict"] and not f["wrapper_keys"] for f in loaded["files"].values())
    row.numbers = {
        "compile": compile,
        "killed_after": killed_at,
        "resumed_from": start,
        "val": val,
        "seed_noise": noise,
        "diff": diff,
        "tolerance": tol,
        "strict_load": strict,
    }
    row.add(
        f"compile {compile}: SIGKILL after {killed_at}, rerun resumed from step {start}; {' and '.join(loaded['files'])} load strictly into a plain GPT: {strict}; "
        f"final val FSDP {val['fsdp']:.4f}, plain {val['plain']:.4f} (|diff| {diff:.4f}; another seed {val['seed2']:.4f}, tolerance {tol:.4f}); {head}"
    )
    fell_back = "FSDP was requested" in second.text()
    if ctx.dry:
        row.add(
            "dry run: Accelerate's FSDP needs CUDA; the trainer warned that it fell back" if fell_back else "dry run"
        )
    elif "(FSDP," not in head:
        raise Failed("the run did not train under FSDP (see its 'world size' line)")
    if start is None:
        raise Failed("the rerun did not resume (no 'resuming from' line)")
    if not strict:
        raise Failed(f"the FSDP run's weights do not load strictly into a plain GPT: {loaded['files']}")
    if diff > tol:
        raise Failed(f"|FSDP - plain| {diff:.4f} > tolerance {tol:.4f}")
    if compile_failed:
        raise Failed("FSDP with compile on failed (eager passed)")


def check_fp16_vs_bf16(ctx: Ctx, row: Row) -> None:
    """fp16 autocast with loss scaling against bf16, eager (compile is covered by the other checks), side by side."""
    args = (*ctx.lecture_data(), "--train.compile=false", *ctx.sizes.short)
    procs = {
        prec: pretrain(ctx, f"precision_{prec}", LECTURE, *args, f"--train.mixed_precision={prec}")
        for prec in ("bf16", "fp16")
    }
    for prec, proc in procs.items():
        finish(ctx, proc, f"precision_{prec}", row)
    val = {prec: final_val(ctx.work / f"precision_{prec}") for prec in procs}
    scaler = None
    saved = checkpoints(ctx.work / "precision_fp16")
    if saved and (saved[-1] / "trainer.json").is_file():
        scaler = json.loads((saved[-1] / "trainer.json").read_text()).get("scaler")
    diff = abs(val["fp16"] - val["bf16"])
    row.numbers = {"val": val, "diff": diff, "tolerance": ctx.sizes.fp16_tol, "fp16_scaler": scaler}
    row.summary = (
        f"{header(procs['fp16'].text())}: no NaN stop; final val fp16 {val['fp16']:.4f}, bf16 {val['bf16']:.4f} (|diff| {diff:.4f}, tolerance {ctx.sizes.fp16_tol}); "
        f"loss scale at the end {scaler.get('scale') if scaler else 'n/a'}"
    )
    if ctx.dry:
        row.add("dry run: fp16 autocast is a no-op on the CPU (the trainer says so), so no loss scaler")
    elif "precision fp16" not in procs["fp16"].text() or not scaler:
        raise Failed("the fp16 run did not train in fp16 with a loss scaler")
    if diff > ctx.sizes.fp16_tol:
        raise Failed(f"|fp16 - bf16| {diff:.4f} > {ctx.sizes.fp16_tol}")


CHECKS: dict[str, list[tuple[str, str, Callable[[Ctx, Row], None]]]] = {
    "part1": [
        ("env", "environment", check_env),
        ("compile_smoke", "torch.compile smoke test (20 s)", check_compile_smoke),
        ("lecture", "lecture model, 5000 steps, bf16 + compile", check_lecture),
        ("lecture_load", "the lecture run: strict load", check_lecture_load),
        ("lecture_sample", "the lecture run: sample.py, KV cache on/off", check_lecture_sample),
        ("lecture_evaluate", "the lecture run: evaluate.py vs the trainer's val", check_lecture_evaluate),
        ("resume_compile", "kill + resume with compile, vs uninterrupted runs", check_resume_compile),
    ],
    "part2": [
        ("env", "environment", check_env),
        ("compile_smoke", "torch.compile smoke test (20 s)", check_compile_smoke),
        (
            "gpt2_compile",
            "GPT-2 124M, bf16, 2^19 tokens/step, compile on",
            lambda ctx, row: check_gpt2(ctx, row, "true"),
        ),
        (
            "gpt2_eager",
            "GPT-2 124M, bf16, 2^19 tokens/step, compile off",
            lambda ctx, row: check_gpt2(ctx, row, "false"),
        ),
        ("fsdp", "FSDP2 (accelerate, 1 process): checkpoint, resume, plain load", check_fsdp),
        ("fp16_vs_bf16", "fp16 + loss scaling vs bf16 (lecture model)", check_fp16_vs_bf16),
    ],
}


# ----------------------------------------------------------------------------- the results table


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "n/a (no git)"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a (no git)"


def write_results(ctx: Ctx) -> None:
    """OUT/gpu_results.json and .md from every row (this part's and any other part's already there), atomically."""
    rows = sorted(ctx.rows.values(), key=order)
    doc = {
        "mode": "dry-run" if ctx.dry else "gpu",
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": [asdict(r) for r in rows],
    }
    atomic_write(ctx.out / f"{RESULTS}.json", json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write(ctx.out / f"{RESULTS}.md", markdown(doc))


def order(row: Row) -> tuple[int, int]:
    names = [name for name, _, _ in CHECKS[row.part]] if row.part in CHECKS else []
    return (
        sorted(CHECKS).index(row.part) if row.part in CHECKS else 9,
        names.index(row.check) if row.check in names else 99,
    )


def markdown(doc: dict[str, Any]) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        f"## dist_gpt GPU verification ({doc['mode']}), {doc['written']}",
        "",
        "Targets on one H200: the lecture model to best val <= 1.47 in <= 60 s of training (nanoGPT: 1.4697 in about 3 minutes "
        "on an A100); GPT-2 124M at >= 45% MFU against the dense bf16 datasheet peak.",
        "",
        "| part | check | status | target | result | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(
            f"| {r['part']} | {r['check']} ({cell(r['title'])}) | **{r['status']}** | {cell(r['target'])} | {cell(r['summary'])} | {seconds} |"
        )
    lines += [
        "",
        "RUNNING: the command ended during that check (killed or out of time); NOT RUN: it never started. Logs: logs/PART/NAME.log "
        "(stderr, with the command line) and logs/PART/NAME.out (stdout); each run's metrics.jsonl, summary.json and config.yaml: runs/NAME/.",
    ]
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_rows(ctx: Ctx, part: str, only: list[str]) -> None:
    """The rows already in OUT (other parts, and with `only` this part's other checks), then a new row (NOT RUN) for
    each check to run."""
    path = ctx.out / f"{RESULTS}.json"
    if path.is_file():
        try:
            for r in json.loads(path.read_text())["rows"]:
                ctx.rows[(r["part"], r["check"])] = Row(**r)
        except (json.JSONDecodeError, KeyError, TypeError):
            ctx.rows.clear()  # a results file of another version: start a new one
    for name, title, _ in CHECKS[part]:
        if not only or name in only or (part, name) not in ctx.rows:
            ctx.rows[(part, name)] = Row(part, name, title)


# ----------------------------------------------------------------------------- running a part


def run_check(ctx: Ctx, row: Row, fn: Callable[[Ctx, Row], None], part_deadline: float, budget: float) -> None:
    left = part_deadline - time.monotonic()
    if left < MIN_START_S:
        row.status, row.summary = "SKIP", f"not started: {max(left, 0):.0f} s left of the part's {budget:.0f} s budget"
        write_results(ctx)
        return
    limit = min(ctx.sizes.timeouts[row.check], left)
    ctx.deadline = time.monotonic() + limit
    row.status = "RUNNING"
    write_results(ctx)
    start = time.monotonic()
    try:
        fn(ctx, row)
        row.status = "PASS"
    except Skipped as e:
        row.status, row.summary = "SKIP", str(e)
    except CheckTimeout as e:
        row.status = "TIMEOUT"
        row.add(f"{e} (limit {limit:.0f} s)")
    except Failed as e:
        row.status = "FAIL"
        row.add(str(e))
    except Stopped:
        row.status = "FAIL"
        row.add("the command was stopped (SIGTERM/SIGINT) during this check")
        raise
    except (
        Exception
    ) as e:  # a bug in the check itself, or output it did not expect: still a row, and the next check runs
        row.status = "FAIL"
        row.add(f"the check itself failed: {type(e).__name__}: {e}")
        (ctx.out / "logs" / row.part).mkdir(parents=True, exist_ok=True)
        (ctx.out / "logs" / row.part / f"{row.check}_traceback.txt").write_text(traceback.format_exc())
    finally:
        for p in ctx.procs:
            if p.poll() is None:
                p.kill()
        ctx.procs.clear()
        row.seconds = round(time.monotonic() - start, 1)
        write_results(ctx)


def run_part(ctx: Ctx, part: str, budget: float, only: list[str]) -> int:
    """Every check of the part in order (or those in `only`); 0 when none failed."""
    names = [name for name, _, _ in CHECKS[part]]
    if unknown := [name for name in only if name not in names]:
        print(f"error: {part} has no check {', '.join(unknown)}; its checks: {', '.join(names)}", file=sys.stderr)
        return 2
    load_rows(ctx, part, only)
    write_results(ctx)
    missing = [d for d in ("shakespeare_char", "random_tokens") if not (ctx.data / d / "meta.json").is_file()]
    if missing or not (ctx.data / "input.txt").is_file():
        for name in only or names:
            row = ctx.rows[(part, name)]
            row.status, row.summary = (
                "FAIL",
                f"{ctx.data} is not prepared: run `bench/gpu.sh prepare` where `datasets` is installed, and carry {ctx.data}",
            )
        write_results(ctx)
        return 2

    def stop(signum, frame):
        raise Stopped

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    part_deadline = time.monotonic() + budget
    try:
        for name, _, fn in CHECKS[part]:
            if only and name not in only:
                continue
            run_check(ctx, ctx.rows[(part, name)], fn, part_deadline, budget)
            print(f"{part} {name}: {ctx.rows[(part, name)].status}", file=sys.stderr, flush=True)
    except Stopped:
        write_results(ctx)
        return 143
    print((ctx.out / f"{RESULTS}.md").read_text())
    return 0 if all(ctx.rows[(part, name)].status in ("PASS", "SKIP") for name in only or names) else 1


# ----------------------------------------------------------------------------- prepare (here, with `datasets`)


def write_random_corpus(path: Path, n: int) -> None:
    """n characters drawn uniformly from 50,257 CJK characters (lines of 1023): the char tokenizer gives GPT-2-sized ids."""
    letters = [*range(0x4E00, 0xA000), *range(0x20000, 0x20000 + 50257 - (0xA000 - 0x4E00))]
    text = "".join(map(chr, random.Random(0).choices(letters, k=n)))
    atomic_write(path, "\n".join(text[i : i + 1023] for i in range(0, n, 1023)) + "\n")


def prepare(ctx: Ctx, source: Path) -> int:
    ctx.data.mkdir(parents=True, exist_ok=True)
    if not source.is_file():
        print(f"error: {source} not found: pass --source PATH to Tiny Shakespeare's input.txt", file=sys.stderr)
        return 2
    atomic_write(ctx.data / "input.txt", source.read_text(encoding="utf-8"))
    write_random_corpus(ctx.data / "random.txt", ctx.sizes.random_chars)
    for config, data in ((LECTURE, ctx.lecture_data()), (GPT2, ctx.random_data())):
        cmd = [sys.executable, "launch/prepare.py", "--config", config, *data]
        # needs `datasets`: no blocker here
        if subprocess.run(cmd, cwd=REPO, env=subprocess_env(dry=False)).returncode != 0:
            print(f"error: {' '.join(cmd)} failed (see above)", file=sys.stderr)
            return 1
    size = sum(
        f.stat().st_size
        for f in ctx.data.rglob("*")
        if f.is_file() and ctx.out not in f.parents and ctx.work not in f.parents
    )
    print(f"prepared {ctx.data}: {size / 2**20:.1f} MiB to carry", file=sys.stderr)
    return 0


def subprocess_env(dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    # dry run: `datasets` and `wandb` unimportable, as on the GPU machine
    path = [str(REPO / "bench" / "gpu_nodeps")] if dry else []
    env.update(
        PYTHONPATH=os.pathsep.join([*path, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_checks.py", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("prepare", "part1", "part2"))
    p.add_argument(
        "--data", type=Path, required=True, help="the prepared folder (prepare writes it; the parts read it)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where the results table, logs and run files go (default DATA/results)"
    )
    p.add_argument("--work", type=Path, default=None, help="run directories (default DATA/work)")
    shared = Path(os.environ.get("DIST_GPT_SHARED", REPO.parent / "shared"))
    p.add_argument(
        "--source",
        type=Path,
        default=shared / "data" / "tinyshakespeare" / "input.txt",
        help="Tiny Shakespeare's input.txt (prepare)",
    )
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds a part may take (default: 350 on a GPU, 900 in a dry run)"
    )
    p.add_argument(
        "--only",
        default="",
        metavar="CHECK,...",
        help="run only these checks of the part (e.g. to rerun one); other rows stay",
    )
    args = p.parse_args(argv)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    out, work = (args.out or args.data / "results").resolve(), (args.work or args.data / "work").resolve()
    ctx = Ctx(
        data=args.data.resolve(), out=out, work=work, dry=args.dry_run, sizes=sizes, env=subprocess_env(args.dry_run)
    )
    # GPU_COMPILE=false: every check eager
    ctx.compile = "false" if args.dry_run else os.environ.get("GPU_COMPILE", "true")
    if args.stage == "prepare":
        return prepare(ctx, args.source)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ctx.part = args.stage
    budget = sizes.budget_s if args.budget is None else args.budget
    return run_part(ctx, args.stage, budget, [name for name in args.only.split(",") if name])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
