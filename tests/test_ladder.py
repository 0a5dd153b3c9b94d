"""The lecture ladder: the rung configs (one idea each), every rung trains, the report from fake metrics, launch/ladder.py end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from conftest import REPO, run_script

from dist_gpt.config import Config, load_config, save_config
from dist_gpt.errors import UserError
from dist_gpt.ladder import (
    COLUMNS,
    RUNGS,
    count_params,
    is_finished,
    ladder,
    markdown_table,
    parse_ladder_args,
    plot_curves,
    read_result,
    report_text,
    rung_config_file,
    stalled,
)
from dist_gpt.model import GPT
from dist_gpt.stages import pretrain

SCALES = ("cpu", "lecture")

# What each rung changes in the model section, relative to the rung before it.
ADDS = {
    "03_multi_head": {"n_head": 4},
    "04_feed_forward": {"mlp": True},
    "05_residual_blocks": {"n_layer": 3, "residual": True, "mlp_ratio": 4},
    "06_layernorm": {"layernorm": True},
}
SCALED = {
    "cpu": {"n_layer": 4, "n_embd": 128, "block_size": 64, "dropout": 0.1},
    "lecture": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2},
}


def rung_cfg(name: str, scale: str, *overrides: str) -> Config:
    rung = next(r for r in RUNGS if r.name == name)
    return load_config(rung_config_file(rung, scale), list(overrides), "pretrain")


def model_diff(a: Config, b: Config) -> dict:
    before, after = dataclasses.asdict(a.model), dataclasses.asdict(b.model)
    return {k: v for k, v in after.items() if before[k] != v}


def test_the_rung_configs_exist_at_both_scales_and_nothing_else():
    lecture = REPO / "configs" / "lecture"
    assert sorted(p.stem for p in lecture.glob("*.yaml")) == [r.name for r in RUNGS]
    assert sorted(p.stem for p in (lecture / "cpu").glob("*.yaml")) == [r.name for r in RUNGS]


@pytest.mark.parametrize("scale", SCALES)
def test_each_rung_adds_one_idea(scale):
    cfgs = {r.name: rung_cfg(r.name, scale) for r in RUNGS}
    assert cfgs["01_bigram"].model.kind == "bigram"
    two = cfgs["02_self_attention"].model
    assert (two.kind, two.n_layer, two.n_head, two.n_embd, two.block_size, two.dropout) == ("gpt", 1, 1, 32, 8, 0.0)
    assert (two.mlp, two.residual, two.layernorm, two.activation, two.tie_weights) == (
        False,
        False,
        False,
        "relu",
        False,
    )
    names = [r.name for r in RUNGS]
    for before, after in zip(names[1:-2], names[2:-1], strict=True):
        assert model_diff(cfgs[before], cfgs[after]) == ADDS[after], after
    assert model_diff(cfgs["06_layernorm"], cfgs["07_dropout_scaled"]) == SCALED[scale]
    for cfg in cfgs.values():  # one corpus and tokenizer for every rung, so the val losses compare
        assert (cfg.data.name, cfg.data.tokenizer, cfg.data.sha256) == (
            "shakespeare_char",
            "char",
            cfgs["01_bigram"].data.sha256,
        )


def test_cpu_scale_gives_every_rung_the_same_time_and_the_lecture_models():
    for rung in RUNGS:
        cpu, lecture = rung_cfg(rung.name, "cpu"), rung_cfg(rung.name, "lecture")
        # the clock, not the step count, ends a CPU rung
        assert cpu.train.time_budget_s == 150 and cpu.train.max_steps >= 10**6
        assert lecture.train.time_budget_s == 0 and lecture.train.max_steps == (
            3000 if rung.name == "01_bigram" else 5000
        )
        assert lecture.train.lr_decay == "constant" and lecture.train.warmup_steps == 0  # the lecture's plain AdamW
        assert (
            cpu.out_dir == Path("runs/lecture_cpu") / rung.name and lecture.out_dir == Path("runs/lecture") / rung.name
        )
        if rung.name != "07_dropout_scaled":
            assert cpu.model == lecture.model
    big = rung_cfg("07_dropout_scaled", "lecture")
    assert (big.train.batch_size, big.train.lr) == (64, 3e-4)


def test_parameter_counts():
    assert count_params(rung_cfg("01_bigram", "cpu", "--model.vocab_size=65").model) == 65 * 65
    # embeddings 65x32 + 8x32, q,k,v 32x96 + 96, projection 32x32 + 32, untied head 32x65
    assert (
        count_params(rung_cfg("02_self_attention", "cpu", "--model.vocab_size=65").model)
        == 2080 + 256 + 3168 + 1056 + 2080
    )
    # The lecture prints 10.788929M: its q, k, v have no bias (ours: 6 x 3 x 384 more) and its head has one (65 fewer)
    big = rung_cfg("07_dropout_scaled", "lecture", "--model.vocab_size=65").model
    assert count_params(big) == 10_788_929 + 6 * 3 * 384 - 65
    assert count_params(big) == sum(p.numel() for p in GPT(big).parameters())


@pytest.fixture
def reset_accelerate():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # later in-process runs may choose other settings


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("rung", RUNGS, ids=lambda r: r.name)
def test_every_rung_trains_three_steps(rung, scale, tmp_path, shakespeare, reset_accelerate):
    """The rung's own model through the pretrain stage; small batches and evaluations keep it fast."""
    out = tmp_path / rung.name
    # fp32 for all: Accelerate allows one precision per process, and the lecture's 07 would pick bf16 on an AMX CPU
    pretrain(["--config", rung_config_file(rung, scale), f"--data.source={shakespeare}", f"--data.dir={tmp_path / 'data'}",
              f"--run.out_dir={out}", "--train.max_steps=3", "--train.time_budget_s=0", "--train.batch_size=2", "--train.eval_iters=1",
              "--train.sample_tokens=4", "--train.mixed_precision=no", "--train.compile=false", "--log.progress=false"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3]
    result = read_result(rung, out)
    assert result.final["step"] == 3 and result.params == count_params(
        rung_cfg(rung.name, scale, "--model.vocab_size=65").model
    )
    assert is_finished(out, rung_cfg(rung.name, scale, "--train.max_steps=3"))
    assert not is_finished(out, rung_cfg(rung.name, scale, "--train.max_steps=4", "--train.time_budget_s=0"))


# ----------------------------------------------------------------------------- the report from fake runs


def fake_run(run_dir: Path, rung: str, evals: list[tuple[int, float, float]], sample: str) -> None:
    """config.yaml as pretrain saves it, and metrics.jsonl / samples.jsonl with evaluations (step, elapsed_s, val_loss)."""
    run_dir.mkdir(parents=True)
    save_config(rung_cfg(rung, "cpu", "--model.vocab_size=65"), run_dir / "config.yaml")
    lines = []
    for step, elapsed, val in evals:
        # a log line between evaluations
        lines.append({"step": step, "train_loss": 9.0, "lr": 1e-3, "tokens": step * 256, "elapsed_s": elapsed})
        lines.append(
            {"step": step, "tokens": step * 256, "elapsed_s": elapsed, "eval_train_loss": val - 0.05, "val_loss": val}
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "samples.jsonl").write_text(json.dumps({"step": evals[-1][0], "prompt": "\n", "text": sample}) + "\n")


def test_table_from_fake_metrics(tmp_path):
    fake_run(
        tmp_path / "01_bigram",
        "01_bigram",
        [(0, 0.0, 4.17), (1000, 75.0, 2.6), (40000, 150.04, 2.4871)],
        "\nFirst bigram",
    )
    fake_run(tmp_path / "02_self_attention", "02_self_attention", [(0, 0.0, 4.17), (20000, 150.4, 2.3304)], "\nROMEO:")
    fake_run(tmp_path / "03_multi_head", "03_multi_head", [(0, 0.0, 4.17), (19000, 151.2, 2.3312)], "\nJULIET:")
    results = [read_result(r, tmp_path / r.name) for r in RUNGS[:3]]
    lines = markdown_table(results).splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert COLUMNS == ("step", "adds", "model", "params", "train steps", "val loss", "change", "lecture", "time (s)")
    assert lines[1].count("|") == len(COLUMNS) + 1
    assert lines[2] == "| 01_bigram | bigram lookup table | 65x65 table | 4,225 | 40,000 | 2.487 |  | 2.49 | 150 |"
    assert (
        lines[3]
        == "| 02_self_attention | one self-attention head, 8-char context | 1L 1H 32d, ctx 8 | 8,640 | 20,000 | 2.330 | -0.157 | 2.40 | 150 |"
    )
    assert (
        lines[4]
        == "| 03_multi_head | 4 heads instead of 1 | 1L 4H 32d, ctx 8 | 8,640 | 19,000 | 2.331 | +0.001 (no gain) | 2.28 | 151 |"
    )
    assert len(lines) == 5
    assert [(a.rung.name, b.rung.name) for a, b in stalled(results)] == [("02_self_attention", "03_multi_head")]
    page = report_text(results, "cpu")
    assert "**03_multi_head is not better than 02_self_attention**" in page and "01_bigram is not" not in page
    assert "![val loss of every rung](ladder.png)" in page and "```text\nROMEO:\n```" in page

    plot_curves(results, tmp_path / "ladder.png", "test")
    assert (tmp_path / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_rung_and_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="01_bigram has not been trained"):
        read_result(RUNGS[0], tmp_path / "nothing")
    with pytest.raises(UserError, match="--scale must be cpu or lecture"):
        parse_ladder_args(["--scale", "gpu"])
    with pytest.raises(UserError, match="no rung '8'"):
        parse_ladder_args(["--rungs", "8"])
    with pytest.raises(UserError, match="--out DIR, not --run.out_dir"):
        parse_ladder_args(["--run.out_dir=x"])
    a = parse_ladder_args(["--scale=cpu", "--rungs", "7,01", "--data.source", "x.txt"])
    assert (a.scale, a.out, [r.name for r in a.rungs], a.overrides) == (
        "cpu",
        Path("runs/lecture_cpu"),
        ["01_bigram", "07_dropout_scaled"],
        ["--data.source=x.txt"],
    )


def test_unfinished_runs_are_resumed_not_skipped(tmp_path):
    cfg = rung_cfg("05_residual_blocks", "cpu")  # 150 s budget
    assert not is_finished(tmp_path, cfg)  # never started
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 9000, "wall_s": 80.5}))  # stopped by a signal at 80 s
    assert not is_finished(tmp_path, cfg)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 16000, "wall_s": 150.02}))
    assert is_finished(tmp_path, cfg)


# ----------------------------------------------------------------------------- launch/ladder.py


@pytest.mark.slow
def test_ladder_script_trains_reports_and_skips_finished_rungs(tmp_path, shakespeare):
    args = ["--scale", "cpu", "--out", str(tmp_path / "out"), "--rungs", "01,07", f"--data.source={shakespeare}", f"--data.dir={tmp_path / 'data'}",
            "--train.max_steps=3", "--train.batch_size=2", "--train.eval_iters=1", "--train.sample_tokens=4", "--log.progress=false"]  # fmt: skip
    first = run_script("ladder.py", *args)
    assert first.returncode == 0, first.stderr
    table = first.stdout.strip().splitlines()
    assert table[0].startswith("| step | adds |") and [line.split(" | ")[0] for line in table[2:]] == [
        "| 01_bigram",
        "| 07_dropout_scaled",
    ]
    assert (
        "[1/2] 01_bigram: bigram lookup table" in first.stderr
        and "[2/2] 07_dropout_scaled: scaled up, dropout" in first.stderr
    )
    for rung in ("01_bigram", "07_dropout_scaled"):
        assert json.loads((tmp_path / "out" / rung / "summary.json").read_text())["steps"] == 3
    assert "| 07_dropout_scaled |" in (tmp_path / "out" / "ladder.md").read_text()
    assert (tmp_path / "out" / "ladder.png").read_bytes()[:4] == b"\x89PNG"

    before = (tmp_path / "out" / "01_bigram" / "model.safetensors").read_bytes()
    again = run_script("ladder.py", *args)
    assert again.returncode == 0, again.stderr
    assert (
        "01_bigram: finished earlier, skipping" in again.stderr
        and "07_dropout_scaled: finished earlier, skipping" in again.stderr
    )
    assert "world size" not in again.stderr  # no pretrain started
    assert (
        again.stdout == first.stdout and (tmp_path / "out" / "01_bigram" / "model.safetensors").read_bytes() == before
    )


def test_a_typo_stops_the_ladder_before_any_training(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'train.lrr'"):
        ladder(["--scale", "cpu", "--out", str(tmp_path), "--train.lrr=1"])
    assert not any(tmp_path.iterdir())
