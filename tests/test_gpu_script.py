"""bench/gpu.sh, the GPU verification: its whole dry run (tiny sizes, CPU) so that it cannot rot, and its results
table, which must exist whatever happens (unprepared data, an exhausted time budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CHECKS = {
    "part1": [
        "env",
        "compile_smoke",
        "lecture",
        "lecture_load",
        "lecture_sample",
        "lecture_evaluate",
        "resume_compile",
    ],
    "part2": ["env", "compile_smoke", "gpt2_compile", "gpt2_eager", "fsdp", "fp16_vs_bf16"],
}


def checks(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/gpu_checks.py", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def results(out: Path) -> tuple[list[dict], list[str]]:
    """The JSON rows and the Markdown table's rows."""
    rows = json.loads((out / "gpu_results.json").read_text())["rows"]
    table = [
        line
        for line in (out / "gpu_results.md").read_text().splitlines()
        if line.startswith(("| part1 |", "| part2 |"))
    ]
    return rows, table


def fake_prepared(data: Path) -> None:
    """What the run stages look for before they start (the checks themselves would need the real arrays)."""
    for name in ("shakespeare_char", "random_tokens"):
        (data / name).mkdir(parents=True)
        (data / name / "meta.json").write_text("{}")
    (data / "input.txt").write_text("")


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path, shakespeare):
    """prepare + part1 + part2 at tiny sizes on the CPU, `datasets` and `wandb` unimportable in the run stages."""
    env = {
        "GPU_DATA": str(tmp_path / "data"),
        "OUT": str(tmp_path / "out"),
        "GPU_WORK": str(tmp_path / "work"),
        "SOURCE": str(shakespeare),
    }
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    rows, table = results(tmp_path / "out")
    assert [(r["part"], r["check"]) for r in rows] == [(part, name) for part, names in CHECKS.items() for name in names]
    assert len(table) == len(rows)
    for r, line in zip(rows, table, strict=True):
        assert f"| {r['part']} | {r['check']} (" in line and f"**{r['status']}**" in line
        assert r["status"] == "PASS" or (r["status"] == "SKIP" and r["summary"]), (
            f"{r['part']} {r['check']}: {r['status']}: {r['summary']}"
        )
        assert r["seconds"] is not None and r["summary"]
    assert result.returncode == 0, result.stderr[-3000:]
    env_rows = [r for r in rows if r["check"] == "env"]
    assert all(r["numbers"]["missing"] == ["datasets", "wandb"] and not r["numbers"]["cuda"] for r in env_rows)
    lecture = next(r for r in rows if r["check"] == "lecture")
    assert lecture["numbers"]["steps"] == 20 and lecture["numbers"]["best_val"] < 4.17  # below ln(65): it learned
    resume = next(r for r in rows if r["check"] == "resume_compile")["numbers"]
    # CPU: bit-identical
    assert resume["killed_after"] == "step_000010" and resume["resumed_from"] == 10 and resume["diff"] == 0.0
    assert (tmp_path / "out" / "runs" / "lecture" / "metrics.jsonl").is_file() and (
        tmp_path / "out" / "logs" / "part1" / "lecture.log"
    ).is_file()


def test_unprepared_data_still_writes_the_table(tmp_path):
    out = tmp_path / "out"
    result = checks(
        "part1", "--data", str(tmp_path / "nothing"), "--out", str(out), "--work", str(tmp_path / "work"), "--dry-run"
    )
    assert result.returncode == 2
    rows, table = results(out)
    assert [r["check"] for r in rows] == CHECKS["part1"] and len(table) == len(CHECKS["part1"])
    assert all(r["status"] == "FAIL" and "is not prepared: run `bench/gpu.sh prepare`" in r["summary"] for r in rows)


def test_out_of_budget_checks_are_skipped_and_other_parts_kept(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    fake_prepared(data)
    assert (
        checks(
            "part1", "--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "0"
        ).returncode
        == 0
    )
    assert (
        checks(
            "part2", "--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "5"
        ).returncode
        == 0
    )
    rows, table = results(out)
    assert [(r["part"], r["check"]) for r in rows] == [(part, name) for part, names in CHECKS.items() for name in names]
    assert len(table) == len(rows)
    assert all(r["status"] == "SKIP" and r["summary"].startswith("not started: ") for r in rows)
    assert (
        "0 s left of the part's 0 s budget" in rows[0]["summary"] and "of the part's 5 s budget" in rows[-1]["summary"]
    )


def test_only_names_checks_of_the_part(tmp_path):
    result = checks("part2", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--only", "lecture")
    assert result.returncode == 2
    assert "error: part2 has no check lecture; its checks: env, compile_smoke, gpt2_compile" in result.stderr
