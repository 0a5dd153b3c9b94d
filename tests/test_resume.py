"""Fault tolerance of a training run (docs/fault_tolerance.md).

Every run here is `launch/pretrain.py` with configs/smoke.yaml (dropout on, a checkpoint every 4 steps)
started as a user starts it. A run killed with SIGKILL at a step drawn from a seeded RNG, then rerun
with the same command, must end with the same `train_loss`/`val_loss` at every step and the same
model.safetensors tensors as an uninterrupted run, bit for bit. The faults a test cannot time (a kill
in the middle of a save, a NaN loss) are injected by a wrapper that patches one function in the real
launch path and otherwise runs `dist_gpt.cli.main(pretrain)` unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, SHAKESPEARE, run_script
from safetensors.torch import load_file

from dist_gpt.checkpoint import find_resumable, list_checkpoints, verify_checkpoint
from dist_gpt.rundir import is_locked

KILL_SEED = 20240611  # fixes every "random" kill step, so a failure reproduces
STEPS = 30
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(REPO / "configs/accelerate/cpu.yaml"),
]

# Runs pretrain exactly as launch/pretrain.py does, after applying one fault from the environment:
#   DIST_GPT_TEST_DIE_WRITING=step_dir/file  SIGKILL this process just before that checkpoint file is written
#   DIST_GPT_TEST_NAN_AT=N                   make the training loss NaN at the N-th training forward pass
FAULTY_PRETRAIN = """
import os, signal, sys
from dist_gpt import checkpoint, model
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

die = os.environ.get("DIST_GPT_TEST_DIE_WRITING")
if die:
    write = checkpoint._write_durable
    def dying_write(path, fn):
        if f"{path.parent.name}/{path.name}" == die:
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, fn)
    checkpoint._write_durable = dying_write

nan_at = int(os.environ.get("DIST_GPT_TEST_NAN_AT", "0"))
if nan_at:
    forward, calls = model.GPT.forward, [0]
    def nan_forward(self, idx, targets=None, return_logits=True):
        logits, loss = forward(self, idx, targets, return_logits)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] == nan_at:
                loss = loss * float("nan")
        return logits, loss
    model.GPT.forward = nan_forward

main(pretrain, sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare) -> Path:
    d = tmp_path_factory.mktemp("data") / "shakespeare_char"
    out = run_script("prepare.py", "--config", "configs/smoke.yaml", f"--data.source={shakespeare}", f"--data.dir={d}")
    assert out.returncode == 0, out.stderr
    return d


def pretrain_cmd(run_dir: Path, data_dir: Path, nproc: int = 1, *extra: str, faulty: bool = False) -> list[str]:
    """The command a user types, with the smoke config made resumable: dropout on, a checkpoint every 4 steps, 5 kept."""
    args = [
        "--config", "configs/smoke.yaml", f"--data.source={SHAKESPEARE}", f"--data.dir={data_dir}", f"--run.out_dir={run_dir}",
        "--model.dropout=0.1", "--train.checkpoint_interval=4", "--train.keep_checkpoints=5", *extra,
    ]  # fmt: skip
    if faulty:
        return [sys.executable, "-c", FAULTY_PRETRAIN, *args]
    script = str(REPO / "launch" / "pretrain.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    return [*ACCELERATE, "--num_processes", str(nproc), "--main_process_port", str(free_port()), script, *args]


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


class Running:
    """A run in the background (its own session; output to files, so no pipe can fill up) that a test kills or signals."""

    def __init__(self, cmd: list[str], log_dir: Path, env: dict | None = None):
        self.stderr_path = log_dir / f"stderr_{time.monotonic_ns()}.txt"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.002)

    def wait_for_step(self, run_dir: Path, step: int) -> None:
        self.wait_for(lambda: last_logged_step(run_dir) >= step, f"step {step} in metrics.jsonl")

    def signal(self, sig: int, tree: bool = False) -> None:
        """Signal the process, or the process and every process it started (a node that dies takes all of them)."""
        procs = [psutil.Process(self.proc.pid)]
        if tree:
            procs += procs[0].children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return -1
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit-identical: every logged loss and every tensor of the final model."""
    assert losses(run_dir) == losses(reference)
    # each step once, nothing duplicated by the resume
    assert [s for s, _, _ in losses(run_dir)] == list(range(STEPS + 1))
    got, want = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not is_locked(run_dir)  # a finished run releases its lock


def assert_clean_exit(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted single-process run every 1-process test must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref1") / "run"
    assert_clean_exit(run(pretrain_cmd(run_dir, data_dir)))
    return run_dir


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted 2-process (gloo DDP) run, with W&B (offline) on: its end must not end the process group early."""
    run_dir = tmp_path_factory.mktemp("ref2") / "run"
    out = run(pretrain_cmd(run_dir, data_dir, 2, "--log.wandb=true"), env={"WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    assert "world size 2 (MULTI_CPU, DistributedDataParallel)" in out.stderr
    assert "weights identical on all 2 ranks" in out.stderr and (run_dir / "wandb").is_dir()
    return run_dir


# ----------------------------------------------------------------------------- SIGKILL, then the same command


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_sigkill_at_random_steps_then_rerun_is_bit_identical(tmp_path, data_dir, reference):
    rng = random.Random(KILL_SEED)
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(run_dir, data_dir)

    # killed (SIGKILL) while writing its first checkpoint, so none exists: the rerun starts over, and
    # metrics.jsonl, which already held steps 0-4, ends up with each step once
    first = run(
        pretrain_cmd(run_dir, data_dir, faulty=True),
        env={"DIST_GPT_TEST_DIE_WRITING": ".tmp_step_000004/model.safetensors"},
    )
    assert first.returncode == -signal.SIGKILL
    assert list_checkpoints(run_dir / "checkpoints") == [] and last_logged_step(run_dir) == 4

    # killed at a random later step: resumes from the newest checkpoint
    second = Running(cmd, tmp_path)
    kill_step = rng.randint(5, 22)
    second.wait_for_step(run_dir, kill_step)
    second.signal(signal.SIGKILL)
    assert second.wait() == -signal.SIGKILL
    killed_at = last_logged_step(run_dir)
    assert kill_step <= killed_at < STEPS
    newest = find_resumable(run_dir / "checkpoints", pytest.fail)
    # (the save of `killed_at` may have been cut short)
    assert newest is not None and killed_at - 4 <= int(newest.name[5:]) <= killed_at

    out = run(cmd)
    assert_clean_exit(out)
    assert f"resuming from {newest}" in out.stderr
    assert "in use by a live run" not in out.stderr  # the killed run's lock died with it (a flock, never stale)
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_two_processes_sigterm_then_sigkill_then_rerun_is_bit_identical(tmp_path, data_dir, reference2):
    rng = random.Random(KILL_SEED + 2)
    run_dir = tmp_path / "run"

    # SIGTERM to the launcher (what a scheduler sends before preemption): it forwards it to both workers,
    # which finish the step, write a checkpoint at that step and exit
    first = Running(pretrain_cmd(run_dir, data_dir, 2), tmp_path)
    first.wait_for_step(run_dir, rng.randint(2, 9))
    first.signal(signal.SIGTERM)
    assert first.wait() != 0
    stopped_at = last_logged_step(run_dir)
    assert f"stopped by SIGTERM at step {stopped_at}; checkpoint written" in first.stderr
    assert find_resumable(run_dir / "checkpoints", pytest.fail) == run_dir / "checkpoints" / f"step_{stopped_at:06d}"

    # SIGKILL to every process (a lost node) at a random later step
    second = Running(pretrain_cmd(run_dir, data_dir, 2), tmp_path)
    second.wait_for_step(run_dir, stopped_at + rng.randint(6, 12))
    second.signal(signal.SIGKILL, tree=True)
    second.wait()
    assert last_logged_step(run_dir) < STEPS

    out = run(pretrain_cmd(run_dir, data_dir, 2))
    assert out.returncode == 0, out.stderr
    assert "resuming from" in out.stderr
    assert_same_run(run_dir, reference2)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, data_dir, reference2):
    """SIGTERM to rank 1 alone (a node's own scheduler, an OOM killer's warning): the per-step all-reduce carries the
    stop to rank 0, both save the same step and exit, and the rerun is bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "run"
    first = Running(pretrain_cmd(run_dir, data_dir, 2), tmp_path)
    first.wait_for_step(run_dir, random.Random(KILL_SEED + 5).randint(3, 9))
    workers = [
        p for p in psutil.Process(first.proc.pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())
    ]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    first.wait()
    stopped_at = last_logged_step(run_dir)
    # said by rank 0
    assert f"stopped by a signal to another process at step {stopped_at}; checkpoint written" in first.stderr
    assert find_resumable(run_dir / "checkpoints", pytest.fail) == run_dir / "checkpoints" / f"step_{stopped_at:06d}"
    out = run(pretrain_cmd(run_dir, data_dir, 2))
    assert out.returncode == 0, out.stderr
    assert_same_run(run_dir, reference2)


@pytest.mark.slow
def test_resume_with_another_process_count_keeps_tokens_per_step(tmp_path, data_dir, reference2):
    """2 processes -> 1 -> 2: the same tokens per step and data; the loss continues smoothly (not bit-exact)."""
    rng = random.Random(KILL_SEED + 3)
    run_dir = tmp_path / "run"
    outputs = []
    kill_step = 0
    for nproc in (2, 1):
        kill_step = max(kill_step, last_logged_step(run_dir)) + rng.randint(5, 8)
        running = Running(pretrain_cmd(run_dir, data_dir, nproc), tmp_path)
        running.wait_for_step(run_dir, kill_step)
        running.signal(signal.SIGKILL, tree=True)
        running.wait()
        outputs.append(running.stderr)
    final = run(pretrain_cmd(run_dir, data_dir, 2))
    assert final.returncode == 0, final.stderr

    assert (
        "resuming a checkpoint written by 2 process(es) on 1: grad_accum 1 -> 2 keeps 512 tokens per optimizer step"
        in outputs[1]
    )
    assert "8 (micro-batch) x 32 (block) x 2 (accumulation) x 1 (processes) = 512" in outputs[1]
    assert (
        "resuming a checkpoint written by 1 process(es) on 2: grad_accum 2 -> 1 keeps 512 tokens per optimizer step"
        in final.stderr
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert [r["tokens"] for r in rows[1:]] == [512 * s for s in range(1, STEPS + 1)]
    first_resume = int(re.search(r"resuming from \S+step_(\d+)", outputs[1]).group(1))
    # before the switch: the 2-process run itself
    assert losses(run_dir)[: first_resume + 1] == losses(reference2)[: first_resume + 1]
    # after it: the same curve up to dropout masks and summation order
    for got, want in zip(rows[1:], ref_rows[1:], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=0.15), got["step"]
        if "val_loss" in want:
            assert got["val_loss"] == pytest.approx(want["val_loss"], abs=0.1), got["step"]
    assert json.loads((run_dir / "summary.json").read_text())["tokens_seen"] == 512 * STEPS


def test_resume_takes_a_changed_learning_rate_from_the_config(tmp_path, data_dir):
    """Moments and schedule position come from the checkpoint, the hyperparameters from the current command (and
    model.dropout, which the weights do not depend on)."""
    run_dir = tmp_path / "run"
    first = run(
        pretrain_cmd(
            run_dir, data_dir, 1, "--train.max_steps=8", "--train.lr_decay=constant", "--train.weight_decay=0.0"
        )
    )
    assert first.returncode == 0, first.stderr
    more = run(
        pretrain_cmd(
            run_dir,
            data_dir,
            1,
            "--train.max_steps=12",
            "--train.lr_decay=constant",
            "--train.lr=1e-3",
            "--train.weight_decay=0.0",
            "--model.dropout=0.1",
        )
    )
    assert more.returncode == 0, more.stderr
    assert "resuming from" in more.stderr
    lrs = {
        r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r
    }
    assert [lrs[s] for s in range(6, 9)] == [3e-3] * 3 and [lrs[s] for s in range(9, 13)] == [1e-3] * 4


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_signal_writes_a_checkpoint_and_exits(tmp_path, data_dir, reference, sig):
    run_dir = tmp_path / "run"
    running = Running(pretrain_cmd(run_dir, data_dir), tmp_path)
    running.wait_for_step(run_dir, random.Random(KILL_SEED + sig).randint(5, 22))
    running.signal(sig)
    assert running.wait() == 128 + sig
    stopped_at = last_logged_step(run_dir)
    name = signal.Signals(sig).name
    assert f"received {name}: writing a checkpoint at the end of this step" in running.stderr
    assert (
        f"stopped by {name} at step {stopped_at}; checkpoint written to {run_dir}; rerun the same command to resume"
        in running.stderr
    )
    assert "Traceback" not in running.stderr
    assert find_resumable(run_dir / "checkpoints", pytest.fail) == run_dir / "checkpoints" / f"step_{stopped_at:06d}"
    assert not is_locked(run_dir)
    # resuming from a checkpoint at any step (not only a multiple of the interval) is exact too
    if sig == signal.SIGTERM:
        out = run(pretrain_cmd(run_dir, data_dir))
        assert_clean_exit(out)
        assert_same_run(run_dir, reference)


def test_second_signal_exits_at_once(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # long steps (400 micro-batches), so that the second signal lands before the first step ends
    running = Running(pretrain_cmd(run_dir, data_dir, 1, "--train.grad_accum=400", "--train.eval_iters=1"), tmp_path)
    running.wait_for(lambda: "step 0:" in running.stderr, "the first evaluation")
    running.signal(signal.SIGTERM)
    running.wait_for(lambda: "received SIGTERM" in running.stderr, "the first signal's message")
    running.signal(signal.SIGTERM)
    assert running.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopped by" not in running.stderr
    assert last_logged_step(run_dir) == 0  # the step under way was abandoned, nothing was saved
    assert list_checkpoints(run_dir / "checkpoints") == []


# ----------------------------------------------------------------------------- broken checkpoints


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, data_dir, reference):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # killed while writing the first file of step 12, then (resumed from 8) while writing the manifest, the last file, of step 16
    for dying_file, newest in (
        (".tmp_step_000012/model.safetensors", "step_000008"),
        (".tmp_step_000016/MANIFEST.json", "step_000012"),
    ):
        dying = run(pretrain_cmd(run_dir, data_dir, faulty=True), env={"DIST_GPT_TEST_DIE_WRITING": dying_file})
        assert dying.returncode == -signal.SIGKILL, dying.stderr
        assert (ckpts / dying_file).parent.is_dir()  # the half-written folder ...
        assert list_checkpoints(run_dir / "checkpoints")[0].name == newest  # ... never counts

    out = run(pretrain_cmd(run_dir, data_dir))
    assert_clean_exit(out)
    assert f"resuming from {ckpts / 'step_000012'}" in out.stderr
    assert not list(ckpts.glob(".tmp*"))
    assert_same_run(run_dir, reference)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_checkpoints_are_skipped_down_to_a_complete_one(tmp_path, data_dir, reference):
    """The reference keeps 5 checkpoints: break the newest 4, each differently; the same command resumes from the 5th."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    shutil.copytree(reference, run_dir)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [
        "step_000030",
        "step_000028",
        "step_000024",
        "step_000020",
        "step_000016",
    ]
    damage = {
        "step_000030/model.safetensors": (_truncate, "is truncated or altered"),
        "step_000028/optimizer.safetensors": (_flip_a_byte, "is corrupt (SHA-256 does not match the manifest)"),
        "step_000024/trainer.json": (lambda p: p.write_text('{"step": 3'), "is truncated or altered"),
        "step_000020/MANIFEST.json": (lambda p: p.unlink(), "is missing (the save did not finish)"),
    }
    for file, (corrupt, problem) in damage.items():
        corrupt(ckpts / file)
        assert verify_checkpoint((ckpts / file).parent).startswith(f"{ckpts / file} {problem}")

    out = run(pretrain_cmd(run_dir, data_dir))
    assert_clean_exit(out)
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 4
    for warning, (file, (_, problem)) in zip(warnings, damage.items(), strict=True):
        step_dir = file.split("/")[0]
        assert warning.startswith(f"warning: skipping checkpoint {step_dir}: {ckpts / file} {problem}")
        assert warning.endswith(f"; moved it to broken_{step_dir} and falling back to an older one")
        assert (ckpts / f"broken_{step_dir}").is_dir()
    assert f"resuming from {ckpts / 'step_000016'}" in out.stderr
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [
        "step_000030",
        "step_000028",
        "step_000024",
        "step_000020",
        "step_000016",
    ]
    # written again, complete
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(run_dir / "checkpoints"))
    assert_same_run(run_dir, reference)


def test_checkpoints_sort_by_step_number(tmp_path):
    for step in (999_999, 1_000_000, 8):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step_1000000",
        "step_999999",
        "step_000008",
    ]


# ----------------------------------------------------------------------------- NaN / inf


def test_nan_loss_stops_without_touching_the_last_checkpoint(tmp_path, data_dir, reference):
    run_dir = tmp_path / "run"
    out = run(pretrain_cmd(run_dir, data_dir, faulty=True), env={"DIST_GPT_TEST_NAN_AT": "10"})
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].startswith("error: the loss became nan at step 10; stopping without saving")
    assert "Traceback" not in out.stderr
    assert list_checkpoints(run_dir / "checkpoints")[0].name == "step_000008"
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000008") is None
    assert (run_dir / "model.safetensors").read_bytes() == (
        run_dir / "checkpoints" / "step_000008" / "model.safetensors"
    ).read_bytes()
    assert last_logged_step(run_dir) == 9

    out = run(pretrain_cmd(run_dir, data_dir))  # the NaN was transient: the same command carries on from step 8
    assert_clean_exit(out)
    assert_same_run(run_dir, reference)


def test_nan_loss_skip_leaves_the_weights_unchanged(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    extra = ("--train.on_nan=skip", "--train.checkpoint_interval=1", "--train.max_steps=11")
    out = run([*pretrain_cmd(run_dir, data_dir, faulty=True), *extra], env={"DIST_GPT_TEST_NAN_AT": "10"})
    assert_clean_exit(out)
    assert "warning: the loss became nan at step 10; skipped this optimizer step (train.on_nan=skip)" in out.stderr
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert rows[10]["train_loss"] is None and rows[9]["train_loss"] is not None and rows[11]["train_loss"] is not None
    ckpts = run_dir / "checkpoints"
    before, after = (
        load_file(ckpts / "step_000009" / "model.safetensors"),
        load_file(ckpts / "step_000010" / "model.safetensors"),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "model.safetensors").values())


def test_diverging_run_stops_on_the_first_non_finite_loss(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    out = run(pretrain_cmd(run_dir, data_dir, 1, "--train.lr=1e30", "--train.min_lr=0", "--train.warmup_steps=0"))
    assert out.returncode == 2
    assert re.match(
        r"error: the (loss|gradient norm) became (nan|inf) at step 2; stopping without saving",
        out.stderr.splitlines()[-1],
    )
    assert not (run_dir / "model.safetensors").exists() and list_checkpoints(run_dir / "checkpoints") == []


# ----------------------------------------------------------------------------- nothing is unpickled


def test_checkpoints_hold_only_safetensors_and_json(reference):
    for folder in list_checkpoints(reference / "checkpoints"):
        names = sorted(p.name for p in folder.iterdir())
        assert names == [
            "MANIFEST.json",
            "model.safetensors",
            "optimizer.safetensors",
            "rng_rank0.json",
            "rng_rank0.safetensors",
            "trainer.json",
        ]
        for p in folder.glob("*.json"):
            json.loads(p.read_text())
        for p in folder.glob("*.safetensors"):
            load_file(p)
    assert sorted(p.name for p in reference.iterdir() if p.is_file()) == [
        ".dist_gpt_run", ".lock", "config.yaml", "metrics.jsonl", "model.safetensors", "samples.jsonl", "summary.json", "tokenizer.json",
    ]  # fmt: skip
    json.loads((reference / ".dist_gpt_run").read_text())  # the marker is JSON too


def test_no_pickle_loading_or_remote_code_in_the_source():
    unsafe = re.compile(
        r"torch\.load\(|import pickle|from pickle|pickle\.loads?\(|weights_only\s*=\s*False|trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True|load_state\("
    )
    sources = [*(REPO / "dist_gpt").rglob("*.py"), *(REPO / "launch").glob("*.py"), *(REPO / "data").glob("*.py")]
    assert len(sources) > 10
    hits = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert hits == []


# ----------------------------------------------------------------------------- the manifest is checked, not trusted


def _copy_checkpoint(reference: Path, tmp_path: Path) -> Path:
    newest = list_checkpoints(reference / "checkpoints")[0]
    return Path(shutil.copytree(newest, tmp_path / "checkpoints" / newest.name))


def _manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "MANIFEST.json").read_text())


def test_manifest_must_list_every_file_and_only_files_inside(reference, tmp_path):
    ckpt = _copy_checkpoint(reference, tmp_path)
    assert verify_checkpoint(ckpt) is None
    # the manifest forgets model.safetensors and other weights of the same size are swapped in: not resumable
    m = _manifest(ckpt)
    del m["files"]["model.safetensors"]
    (ckpt / "MANIFEST.json").write_text(json.dumps(m))
    assert "holds files its manifest does not list (model.safetensors)" in verify_checkpoint(ckpt)
    # names outside the folder are never followed
    m = _manifest(ckpt)
    m["files"]["../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    (ckpt / "MANIFEST.json").write_text(json.dumps(m))
    assert "names a file outside the checkpoint" in verify_checkpoint(ckpt)


@pytest.mark.parametrize(
    "manifest", ["{not json", "[]", '{"files": []}', '{"files": {"model.safetensors": 3}}', '{"step": 1}', "\xff\xfe"]
)
def test_a_malformed_manifest_skips_the_checkpoint_with_a_warning(reference, tmp_path, manifest):
    ckpt = _copy_checkpoint(reference, tmp_path)
    (ckpt / "MANIFEST.json").write_bytes(manifest.encode("latin-1"))
    assert verify_checkpoint(ckpt).endswith("MANIFEST.json is corrupt")
    warnings: list[str] = []
    assert find_resumable(tmp_path / "checkpoints", warnings.append) is None
    assert (
        len(warnings) == 1
        and "skipping checkpoint" in warnings[0]
        and (tmp_path / "checkpoints" / f"broken_{ckpt.name}").is_dir()
    )
