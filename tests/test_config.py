"""The config system: YAML + overrides, typed, validated, documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dist_gpt.config import Config, from_dict, help_text, load_config, save_config
from dist_gpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"n_layer": 3, "n_embd": 64, "n_head": 4}, "train": {"lr": 0.01}}))
    cfg = load_config(
        str(f), ["--train.lr=3e-4", "--model.dropout", "0.1", "--log.wandb=false", "--train.compile=true"], "pretrain"
    )
    assert cfg.model.n_layer == 3 and cfg.model.n_embd == 64  # from YAML
    assert cfg.train.lr == pytest.approx(3e-4)  # the command line wins
    assert cfg.model.dropout == pytest.approx(0.1)
    assert cfg.log.wandb is False and cfg.train.compile == "true"
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default
    assert {"model.n_layer", "train.lr", "model.dropout", "log.wandb"} <= cfg.explicit
    assert "train.batch_size" not in cfg.explicit


def test_int_accepts_scientific_notation():
    assert load_config(None, ["--train.max_steps=1e3"], "pretrain").train.max_steps == 1000


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.lrr=1", "unknown config key 'train.lrr'"),
        ("--nosuch.key=1", "unknown config key 'nosuch.key'"),
        ("--finetune.kind=sft", "finetune keys belong to launch/finetune.py"),
        ("--train.batch_size=abc", "train.batch_size: expected int"),
        ("--train.max_steps=2.5", "train.max_steps: expected int"),
        ("--log.wandb=maybe", "log.wandb: expected bool"),
        ("--train.mixed_precision=fp8", "not one of auto, no, bf16, fp16"),
        ("--model.n_embd=100", "divisible by model.n_head"),
        ("--train.lr=-1", "train.lr must be"),
        ("--train.batch_size=0", "train.batch_size must be >= 1"),
        ("--model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("--data.val_fraction=0", "data.val_fraction"),
        ("--train.min_lr=1", "must not exceed train.lr"),
    ],
)
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(UserError, match=None) as e:
        load_config(None, [override], "pretrain")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_argument_shapes():
    with pytest.raises(UserError, match="overrides look like"):
        load_config(None, ["positional"], "pretrain")
    with pytest.raises(UserError, match="needs a value"):
        load_config(None, ["--train.lr"], "pretrain")
    with pytest.raises(UserError, match="config file not found"):
        load_config("/nonexistent.yaml", [], "pretrain")


def test_bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(f), [], "pretrain")
    f.write_text("train: 3\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(str(f), [], "pretrain")


def test_finetune_requires_init_from():
    with pytest.raises(UserError, match="finetune.init_from is required"):
        load_config(None, [], "finetune")
    cfg = load_config(None, ["--finetune.init_from=runs/x", "--finetune.kind=sft"], "finetune")
    assert cfg.finetune.kind == "sft" and cfg.out_dir == Path("runs/shakespeare_char_sft")


def test_help_lists_every_key_with_default():
    text = help_text("finetune")
    cfg = Config()
    for section in ("run", "data", "model", "train", "log", "finetune"):
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"--{section}.{f.name}=" in text
    assert "--train.lr=0.001" in text
    assert "--finetune." not in help_text("pretrain")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.n_layer=2", "--data.source=x.txt"], "pretrain")
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "accelerate" in path.parts or path.name == "sweep.yaml":
            continue  # Accelerate's and W&B's formats (tests/test_features.py checks the sweep's keys)
        stage = "finetune" if "finetune" in yaml.safe_load(path.read_text()) else "pretrain"
        overrides = ["--finetune.init_from=runs/parent"] if stage == "finetune" else []
        load_config(str(path), overrides, stage)
