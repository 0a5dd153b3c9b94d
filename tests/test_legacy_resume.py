"""A checkpoint written before the RunDir/Checkpointer split (format 1, commit ba4193c) still resumes bit-exactly.

tests/fixtures/legacy_run/ was made by tests/fixtures/make_legacy_run.sh with that commit: a tiny model (Muon + AdamW,
dropout on) trained 8 steps with a checkpoint every 4. Only the step-4 checkpoint is kept; rerunning the same command
with today's code must end with the uninterrupted run's weights and losses, bit for bit on a CPU with the
reference's kernels (reference_kernels: within tolerances that still catch a wrong restored part elsewhere).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

import dist_gpt.hardware as hw
from dist_gpt.checkpoint import read_parts, verify_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"
ARGS = [
    "--config", "configs/smoke.yaml",
    "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=16", "--model.dropout=0.1",
    "--train.batch_size=4", "--train.max_steps=8", "--train.checkpoint_interval=4", "--train.keep_checkpoints=2", "--train.eval_interval=4",
    "--train.optimizer=muon", "--train.sample_tokens=8", "--train.threads=1",
]  # fmt: skip


def reference_kernels() -> tuple[bool, float, float]:
    """Whether this CPU computes with the kernels the reference was made with, and the tolerances for losses and
    weights where it does not.

    The reference ran on machine B (BENCHMARKS.md): torch's AVX2 kernels and bf16 emulated in fp32 (Muon's
    Newton-Schulz runs in bf16 here). There the resume must match it to the bit. A CPU with AVX-512 kernels or bf16
    instructions rounds differently: on an AVX512-BF16 EPYC the resumed run ended 1.1e-5 from the reference's losses
    and 8.1e-4 from its weights, while one wrong restored part (the data position, 16 -> 20) moved the first
    resumed loss by 1.0e-2 and the weights by 5.5e-2; the tolerances sit between the two.
    """
    same = torch.backends.cpu.get_cpu_capability() == "AVX2" and not hw.cpu_info().native_bf16
    return same, (0.0 if same else 1e-4), (0.0 if same else 5e-3)


def test_format1_checkpoint_is_read_as_parts():
    step4 = FIXTURE / "run" / "checkpoints" / "step_000004"
    assert verify_checkpoint(step4) is None
    parts = read_parts(step4)
    assert parts["train"]["step"] == 4 and parts["loader"]["position"] == 4 * 4
    assert set(parts["model"]) == set(load_file(FIXTURE / "reference" / "model.safetensors"))
    # AdamW x2, Muon
    assert (
        all(set(slots) for slots in parts["optimizer"]["state"].values())
        and len(parts["optimizer"]["param_groups"]) == 3
    )
    assert isinstance(parts["rng"]["torch"], torch.Tensor)


def test_format1_checkpoint_resumes_bit_exactly(tmp_path, shakespeare):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    # the old code ran Muon's Newton-Schulz in bf16 and the sdpa kernel on every machine: decide as it did
    out = run_script(
        "pretrain.py",
        *ARGS,
        "--model.attn_impl=sdpa",
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={run_dir}",
        env={"DIST_GPT_CPU_BF16": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "resuming from" in out.stderr and "step_000004" in out.stderr
    expected = load_file(FIXTURE / "reference" / "model.safetensors")
    got = load_file(run_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    same, loss_tol, weight_tol = reference_kernels()
    for k in expected:
        assert (
            torch.equal(expected[k], got[k]) if same else torch.allclose(expected[k], got[k], rtol=0, atol=weight_tol)
        )
    reference = {
        r["step"]: r for r in map(json.loads, (FIXTURE / "reference" / "metrics.jsonl").read_text().splitlines())
    }
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the old run kept no metrics.jsonl: only the resumed steps
    assert [r["step"] for r in resumed] == list(range(5, 9))
    for r in resumed:
        assert r["train_loss"] == pytest.approx(reference[r["step"]]["train_loss"], rel=0, abs=loss_tol)
        if "val_loss" in r:
            assert r["val_loss"] == pytest.approx(reference[r["step"]]["val_loss"], rel=0, abs=loss_tol)
    assert (run_dir / ".dist_gpt_run").is_file()  # adopted as a run with a marker
