"""launch/plot.py: loss curves from metrics.jsonl alone (no W&B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script

from dist_gpt.errors import UserError
from dist_gpt.plot import plot_runs, read_metrics


def write_metrics(run_dir: Path, rows: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


def rows(scale: float, tokens_per_step: int) -> list[dict]:
    """What the trainer writes: an eval row at step 0, train rows, eval rows with train_loss too."""
    out = [{"step": 0, "tokens": 0, "elapsed_s": 0.0, "eval_train_loss": 4.2 * scale, "val_loss": 4.1 * scale}]
    for step in range(1, 7):
        row = {
            "step": step,
            "train_loss": scale * (4 - step / 4),
            "lr": 1e-3,
            "tokens": step * tokens_per_step,
            "tokens_per_s": 10.0,
            "elapsed_s": step / 10,
        }
        if step % 3 == 0:
            row |= {"eval_train_loss": scale * (3.9 - step / 4), "val_loss": scale * (4 - step / 5)}
        out.append(row)
    out[4]["train_loss"] = None  # a step skipped for a NaN loss (train.on_nan=skip)
    return out


def test_two_runs_two_panels(tmp_path):
    a = write_metrics(tmp_path / "a", rows(1.0, 256), tail='{"step": 7, "train_lo')  # a line cut short by a crash
    b = write_metrics(tmp_path / "b", rows(0.5, 1024))
    fig = plot_runs([read_metrics(a), read_metrics(b)], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_steps, by_tokens = fig.axes
    lines = {line.get_label(): line for line in by_steps.lines}
    assert list(lines) == ["a train", "a val", "b train", "b val"]
    assert list(lines["a train"].get_xdata()) == [1, 2, 3, 5, 6]  # step 4 had no loss
    assert list(lines["a val"].get_xdata()) == [0, 3, 6] and list(lines["a val"].get_ydata()) == [
        4.1,
        4 - 3 / 5,
        4 - 6 / 5,
    ]
    assert list(by_tokens.lines[2].get_xdata()) == [1024, 2048, 3072, 5120, 6144]  # b train, against tokens
    assert list(by_tokens.lines[2].get_ydata()) == list(lines["b train"].get_ydata())
    assert by_steps.get_yscale() == by_tokens.get_yscale() == "linear"
    assert plot_runs([read_metrics(a)], log_y=True).axes[1].get_yscale() == "log"


def test_errors(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)
    write_metrics(tmp_path / "empty", [], tail="")
    with pytest.raises(UserError, match="no losses"):
        read_metrics(tmp_path / "empty")
    a = write_metrics(tmp_path / "a", rows(1.0, 256))
    with pytest.raises(UserError, match=r"\.png"):
        plot_runs([read_metrics(a)], tmp_path / "loss.pdf")


def test_cli_on_a_real_run(tmp_path, shakespeare):
    """A smoke pretrain (W&B off) and the plot command on its metrics.jsonl."""
    run = tmp_path / "run"
    trained = run_script(
        "pretrain.py",
        "--config",
        "configs/smoke.yaml",
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={run}",
        "--train.max_steps=12",
    )
    assert trained.returncode == 0, trained.stderr
    result = run_script("plot.py", str(run), str(run), "--out", str(tmp_path / "plot.png"), "--log")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    curves = read_metrics(run)
    assert [s for s, _, _ in curves.val] == [0, 10, 12] and [s for s, _, _ in curves.train] == list(range(1, 13))
    missing = run_script("plot.py", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png"))
    assert (
        missing.returncode == 2
        and missing.stderr.strip().startswith("error:")
        and "metrics.jsonl not found" in missing.stderr
    )
