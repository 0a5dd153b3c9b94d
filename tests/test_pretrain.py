"""The pretrain stage end to end, launched as a user launches it: python, accelerate (1 process), 2-process gloo DDP."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

from dist_gpt.batches import eval_batches, open_split
from dist_gpt.errors import UserError
from dist_gpt.model import GPT
from dist_gpt.optim import lr_at
from dist_gpt.rundir import load_run
from dist_gpt.runtime import check_world_size
from dist_gpt.trainer import EVAL_SHARE, affordable_eval_iters

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_args(tmp_path: Path, shakespeare: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/smoke.yaml",
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / name}",
        *extra,
    ]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_finished_run(run_dir: Path, world_size: int) -> None:
    """Loss falls, the run's files exist, and model.safetensors reproduces the logged final val loss."""
    for name in (
        "config.yaml",
        "tokenizer.json",
        "model.safetensors",
        "summary.json",
        "metrics.jsonl",
        "samples.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    rows = metrics(run_dir)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # from ln(65) = 4.17 to well below
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["world_size"] == world_size
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["tokens_seen"] == 30 * 8 * 32 * world_size

    run = load_run(run_dir)
    assert set(load_file(run_dir / "model.safetensors")) == set(run.model.state_dict())
    cfg = run.config
    val = open_split(cfg.data_dir, "val")
    total = count = 0.0
    with torch.no_grad():
        for x, y in eval_batches(
            val, cfg.model.block_size, cfg.train.batch_size, cfg.train.eval_iters, seed=cfg.run.seed
        ):
            total += run.model(x, y)[1].item()
            count += 1
    assert total / count == pytest.approx(evals[-1]["val_loss"], rel=1e-5, abs=1e-6)


def test_python_launch(tmp_path, shakespeare):
    out = run_script(
        "pretrain.py", *smoke_args(tmp_path, shakespeare, "run", "--train.threads=1"), env={"OMP_NUM_THREADS": "2"}
    )
    assert out.returncode == 0, out.stderr
    assert "1 threads/process" in out.stderr  # train.threads wins over OMP_NUM_THREADS
    assert (
        "world size 1" in out.stderr
        and "tokens per optimizer step: 8 (micro-batch) x 32 (block) x 1 (accumulation) x 1 (processes) = 256"
        in out.stderr
    )
    check_finished_run(tmp_path / "run", world_size=1)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 10, 20, 30] and all(len(s["text"]) == 32 for s in samples)
    # the same command again: already complete, nothing trained, the model untouched
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    again = run_script("pretrain.py", *smoke_args(tmp_path, shakespeare, "run"))
    assert again.returncode == 0 and "run already complete at step 30" in again.stderr
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    # nothing to do: the data is not even checked
    assert "prepared" not in again.stderr and "tokenizing" not in again.stderr


def test_accelerate_launch_one_process(tmp_path, shakespeare):
    launcher = [
        *ACCELERATE,
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    out = run_script(
        "pretrain.py", *smoke_args(tmp_path, shakespeare, "run"), launcher=launcher, env={"OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr
    # accelerate launch passes OMP_NUM_THREADS=1 on when nobody chose a thread count: one process gets every core
    assert f"{len(os.sched_getaffinity(0))} threads/process" in out.stderr
    check_finished_run(tmp_path / "run", world_size=1)


def test_two_process_ddp_on_cpu(tmp_path, shakespeare):
    launcher = [*ACCELERATE, "--config_file", "configs/accelerate/cpu.yaml", "--main_process_port", str(free_port())]
    out = run_script(
        "pretrain.py", *smoke_args(tmp_path, shakespeare, "run"), launcher=launcher, env={"OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr
    assert "world size 2 (MULTI_CPU, DistributedDataParallel)" in out.stderr
    assert "weights identical on all 2 ranks" in out.stderr
    check_finished_run(tmp_path / "run", world_size=2)


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_gradient_accumulation_is_exact(tmp_path, shakespeare):
    """One optimizer step over the same 8 sequences: 8 x 1, 4 x 2 (accumulation) and 2 processes x 4 give the same weights."""
    common = [
        "--train.max_steps=1",
        "--train.eval_iters=1",
        "--train.sample_tokens=0",
        "--model.dropout=0",
        "--train.warmup_steps=0",
    ]
    runs = {
        "b8": (["--train.batch_size=8", "--train.grad_accum=1"], None),
        "b4x2": (["--train.batch_size=4", "--train.grad_accum=2"], None),
        "ddp2xb4": (
            ["--train.batch_size=4", "--train.grad_accum=1"],
            [*ACCELERATE, "--config_file", "configs/accelerate/cpu.yaml", "--main_process_port", str(free_port())],
        ),
    }
    weights = {}
    for name, (extra, launcher) in runs.items():
        out = run_script("pretrain.py", *smoke_args(tmp_path, shakespeare, name, *common, *extra), launcher=launcher)
        assert out.returncode == 0, out.stderr
        assert "= 256" in out.stderr  # 256 tokens per optimizer step each time
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    for name in ("b4x2", "ddp2xb4"):
        for key, w in weights["b8"].items():
            torch.testing.assert_close(weights[name][key], w, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    # sanity: the one step moved every weight matrix away from the initial weights (the trainer seeds run.seed, then builds)
    torch.manual_seed(1337)
    init = GPT(load_run(tmp_path / "b8").config.model).state_dict()
    moved = {k: (weights["b8"][k] - init[k]).abs().max().item() for k in init}
    assert all(moved[k] > 1e-4 for k in init if k.endswith("weight") and init[k].dim() == 2), moved


def test_wandb_offline_leaves_an_offline_run(tmp_path, shakespeare):
    out = run_script(
        "pretrain.py",
        *smoke_args(tmp_path, shakespeare, "run", "--log.wandb=true", "--train.max_steps=5"),
        env={"WANDB_MODE": "offline"},
    )
    assert out.returncode == 0, out.stderr
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))


def test_tokens_per_step_derives_accumulation(tmp_path, shakespeare):
    out = run_script(
        "pretrain.py", *smoke_args(tmp_path, shakespeare, "run", "--train.tokens_per_step=1024", "--train.max_steps=2")
    )
    assert out.returncode == 0, out.stderr
    assert "8 (micro-batch) x 32 (block) x 4 (accumulation) x 1 (processes) = 1,024" in out.stderr
    bad = run_script("pretrain.py", *smoke_args(tmp_path, shakespeare, "bad", "--train.tokens_per_step=1000"))
    assert bad.returncode == 2 and "cannot be split into micro-batches" in bad.stderr


def test_world_size_mismatch_is_an_error():
    check_world_size(2, 2)
    with pytest.raises(UserError, match="did not join one group"):
        check_world_size(2, 1)


def test_evaluations_of_a_time_budgeted_run_take_a_small_share_of_it():
    from dist_gpt.config import TrainConfig

    # the 5-minute CPU model on a CPU without bf16: 0.155 s per eval batch, so at most ~900 steps in 280 s
    t = TrainConfig(
        time_budget_s=280, max_steps=10**6, eval_iters=100, eval_interval=500, eval_at_start=True, batch_size=32
    )
    n, evaluations = affordable_eval_iters(0.155, t, world=1)
    assert evaluations == 3  # step 0, step 500, the end
    assert n == 24 and evaluations * 2 * n * 0.155 <= EVAL_SHARE * 280 < evaluations * 2 * (n + 1) * 0.155
    # two ranks share the batches: twice as many in the same time
    assert affordable_eval_iters(0.155, t, world=2) == (
        48,
        3,
    )
    assert affordable_eval_iters(0.001, t, world=1) == (39, 282)  # a fast machine does more steps, so more evaluations
    rare = TrainConfig(
        time_budget_s=280, max_steps=10**6, eval_iters=100, eval_interval=10**6, eval_at_start=True, batch_size=32
    )
    # a fast machine with few evaluations keeps train.eval_iters
    assert affordable_eval_iters(0.001, rare, world=1) == (
        100,
        2,
    )
    assert affordable_eval_iters(100.0, t, world=1)[0] == 1  # never fewer than one batch
    short = TrainConfig(
        time_budget_s=280, max_steps=400, eval_iters=100, eval_interval=500, eval_at_start=False, batch_size=32
    )
    # max_steps ends it before step 500: only the final evaluation
    assert affordable_eval_iters(0.155, short, world=1) == (
        72,
        1,
    )


def test_time_budget_caps_the_evaluation(tmp_path, shakespeare):
    extra = [
        "--train.time_budget_s=3",
        "--train.max_steps=1000000",
        "--train.eval_iters=100000",
        "--train.eval_interval=1000000",
        "--train.eval_at_start=false",
    ]
    out = run_script("pretrain.py", *smoke_args(tmp_path, shakespeare, "run", *extra))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stderr.splitlines() if "evaluation of train.eval_iters=100000" in line)
    n = int(line.split("evaluating ")[1].split()[0])
    assert 1 <= n < 100000 and line.startswith("warning: 1 evaluation of")
    assert [r["step"] for r in metrics(tmp_path / "run") if "val_loss" in r] == [
        json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]
    ]


def test_lr_schedule_warmup_then_cosine():
    from dist_gpt.config import TrainConfig

    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, 0.0, t) == pytest.approx(1 / 11)
    assert lr_at(9, 0.0, t) == pytest.approx(10 / 11)
    assert lr_at(10, 0.0, t) == pytest.approx(1.0)
    assert lr_at(60, 0.0, t) == pytest.approx(0.55)
    assert lr_at(110, 0.0, t) == pytest.approx(0.1)
    timed = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10**9, time_budget_s=100.0)
    assert lr_at(5, 50.0, timed) == pytest.approx(0.5)  # half the time budget: half-way down the cosine
