"""Strict configs: the YAML loader (duplicate keys, alias bombs, nesting, encodings), several --config files,
clipped messages, and the range checks that keep values inside what torch accepts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from dist_gpt.cli import parse_stage_args
from dist_gpt.config import (
    CLIP,
    MAX_ALIASES,
    MAX_DEPTH,
    SECTIONS,
    Config,
    StrictLoader,
    YAMLRejected,
    clip,
    from_dict,
    load_config,
    parse_yaml,
    read_saved_config,
    save_config,
)
from dist_gpt.errors import UserError


def refused(text: str) -> str:
    with pytest.raises(YAMLRejected) as e:
        parse_yaml(text)
    return str(e.value)


def error(tmp_path: Path, text: str | bytes, overrides: list[str] = (), stage: str = "pretrain") -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(UserError) as e:
        load_config(str(path), list(overrides), stage)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300
    return message


# ----------------------------------------------------------------------------- the loader


def test_duplicate_keys_at_any_level_name_the_key_and_both_lines():
    assert (
        refused("train:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 300\n")
        == "key 'lr' appears twice in one mapping (lines 2 and 4); keep one"
    )
    assert (
        refused("train: {}\nmodel: {}\ntrain: {}\n")
        == "key 'train' appears twice in one mapping (lines 1 and 3); keep one"
    )
    assert "key 'a' appears twice" in refused("x:\n  - {a: 1, b: 2, a: 3}\n")  # inside a list, in flow style


def test_merge_keys_may_be_overridden():
    """`<<: *base` then the same key: YAML's override, not a duplicate."""
    data = parse_yaml("base: &b {lr: 0.1, batch_size: 4}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    assert data["train"] == {"lr": 0.2, "batch_size": 4}


def test_alias_bombs_are_refused_without_expanding():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert refused(laughs).startswith(f"more than {MAX_ALIASES} aliases (*name)")
    # 30 aliases, 2**16 values
    doubling = "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 16))
    assert refused(doubling).startswith("its aliases expand to more than 10000 values")
    assert refused("a: &a [*a]\n").startswith("its aliases expand to more than")  # a list that holds itself
    assert parse_yaml("base: &b 3\nx: [*b, *b]\n") == {"base": 3, "x": [3, 3]}  # a few aliases are fine


def test_nesting_is_bounded():
    assert refused("a: " + "[" * 5000 + "]" * 5000 + "\n") == f"nested more than {MAX_DEPTH} levels deep, at line 1"
    assert parse_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None


def test_loader_is_a_safe_loader():
    assert issubclass(StrictLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError):
        parse_yaml("!!python/object/apply:os.system ['echo no']\n")


def test_file_errors_are_one_line(tmp_path):
    assert (
        error(tmp_path, b"train:\n  sample_prompt: caf\xe9\n")
        == f"config file {tmp_path / 'c.yaml'} is not UTF-8 text (byte offset 27); save it as UTF-8"
    )
    assert "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2" in error(
        tmp_path, "train: [1, 2\n"
    )
    assert "a value cannot be read (Exceeds the limit (4300 digits) for integer string conversion" in error(
        tmp_path, "run:\n  seed: " + "9" * 5000
    )
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(UserError, match="dir.yaml is a directory; pass a YAML file"):
        load_config(str(tmp_path / "dir.yaml"), [], "pretrain")
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"), [], "pretrain")
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20))
    with pytest.raises(UserError, match="is over 1 MiB"):
        load_config(str(tmp_path / "big.yaml"), [], "pretrain")


def test_a_bom_and_an_empty_file_are_fine(tmp_path):
    (tmp_path / "bom.yaml").write_bytes("\ufefftrain:\n  lr: 0.01\n".encode())
    assert load_config(str(tmp_path / "bom.yaml"), [], "pretrain").train.lr == 0.01
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_config(str(tmp_path / "empty.yaml"), [], "pretrain").train.lr == Config().train.lr


# ----------------------------------------------------------------------------- several files, messages


def test_config_files_merge_in_order_then_the_command_line(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.1\n  batch_size: 4\nmodel:\n  n_layer: 3\n")
    (tmp_path / "b.yaml").write_text("train:\n  lr: 0.2\n")
    args = ["--config", str(tmp_path / "a.yaml"), f"--config={tmp_path / 'b.yaml'}", "--model.n_layer=5"]
    cfg = parse_stage_args(args, "pretrain", "usage")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.model.n_layer) == (0.2, 4, 5)
    cfg = parse_stage_args(args[2:] + args[:2], "pretrain", "usage")  # the other order: a.yaml's lr wins
    assert cfg.train.lr == 0.1
    assert parse_stage_args([], "pretrain", "usage", default_config=str(tmp_path / "b.yaml")).train.lr == 0.2
    # no default with --config
    assert parse_stage_args(args[:2], "pretrain", "usage", default_config=str(tmp_path / "b.yaml")).train.lr == 0.1


def test_help_documents_the_merge(capsys):
    with pytest.raises(SystemExit):
        parse_stage_args(["--help"], "pretrain", "usage")
    assert "--config FILE may be given more than once: the files merge in order" in capsys.readouterr().out


def test_messages_clip_user_values(tmp_path):
    assert clip("x" * 1000) == "'" + "x" * (CLIP - 4) + "..." and len(clip("x" * 1000)) == CLIP
    assert clip(10**5000).startswith("<an int of about 5000 digits")
    for override in (
        "--data.tokenizer=" + "y" * 10_000,
        "--train.batch_size=" + "z" * 10_000,
        "--nosuch" + "k" * 10_000 + ".key=1",
        "--data.name=" + "/" * 10_000,
    ):
        with pytest.raises(UserError) as e:
            load_config(None, [override], "pretrain")
        assert len(str(e.value)) < 300 and "..." in str(e.value)
    assert len(error(tmp_path, "train:\n  sample_prompt: [" + ", ".join(["long value"] * 3000) + "]\n")) < 300


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--run.seed=-1", "run.seed must be in [0, 2**63 - 1], got -1"),
        (f"--run.seed={2**63}", "run.seed=9223372036854775808 is out of range: at most 9,223,372,036,854,775,807"),
        ("--run.seed=1e20", "run.seed=100000000000000000000 is out of range"),
        ("--model.n_embd=1e30", "model.n_embd=1000000000000000019884624838656 is out of range: at most 2,147,483,647"),
        (f"--train.batch_size={2**31}", "train.batch_size=2147483648 is out of range: at most 2,147,483,647"),
        (f"--train.max_steps={2**64}", "train.max_steps=18446744073709551616 is out of range"),
        ("--train.lr=nan", "train.lr must be a finite number, got nan"),
        ("--model.dropout=inf", "model.dropout must be a finite number, got inf"),
        ("--data.val_fraction=-inf", "data.val_fraction must be a finite number, got -inf"),
        ("--train.time_budget_s=inf", "train.time_budget_s must be a finite number, got inf"),
        ("--data.name=.", "data.name must be a plain folder name"),
        ("--data.name=..", "data.name must be a plain folder name"),
        ("--data.name=a/b", "data.name must be a plain folder name"),
        ("--data.name=a\\b", "data.name must be a plain folder name"),
        ("--data.name=.cache", "data.name must be a plain folder name"),
        ("--data.name=", "data.name must be a plain folder name"),
        ("--data.name= x", "data.name must be a plain folder name"),
        ("--run.out_dir=runs//x", "run.out_dir has an empty or blank path component: 'runs//x'"),
        ("--run.out_dir=runs/ /x", "run.out_dir has an empty or blank path component"),
        ("--run.out_dir=.", "run.out_dir must name a run's own folder, not '.'"),
        ("--run.out_dir=runs/..", "run.out_dir must name a run's own folder"),
        ("--run.out_dir=/", "run.out_dir must name a run's own folder, not '/'"),
        ("--run.out_dir=~", "run.out_dir must name a run's own folder"),
    ],
)
def test_out_of_range_values(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [override], "pretrain")
    assert message in str(e.value)


def test_every_float_key_must_be_finite():
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            if f.type in (float, "float"):
                with pytest.raises(UserError, match=f"{section}.{f.name} must be a finite number, got nan"):
                    load_config(None, [f"--{section}.{f.name}=nan", "--finetune.init_from=x"], "finetune")


def test_limits_themselves_are_accepted():
    cfg = load_config(None, [f"--run.seed={2**63 - 1}", "--train.max_steps=1e9"], "pretrain")
    assert cfg.run.seed == 2**63 - 1 and cfg.train.max_steps == 10**9  # ints are read exactly, not through a float


def test_lora_alpha_must_be_positive_with_lora():
    with pytest.raises(UserError, match="finetune.lora_alpha must be > 0 with LoRA"):
        load_config(None, ["--finetune.init_from=x", "--finetune.lora_rank=8", "--finetune.lora_alpha=0"], "finetune")
    # no LoRA: unused
    assert load_config(None, ["--finetune.init_from=x", "--finetune.lora_alpha=0"], "finetune").finetune.lora_alpha == 0


def test_tilde_is_expanded_in_local_paths():
    home = os.path.expanduser("~")
    cfg = load_config(
        None,
        [
            "--run.out_dir=~/runs/x",
            "--data.dir=~/data/x",
            "--data.source=~/a.txt, ~/b.txt",
            "--finetune.init_from=~/runs/parent",
        ],
        "finetune",
    )
    assert (
        cfg.run.out_dir == f"{home}/runs/x"
        and cfg.data.dir == f"{home}/data/x"
        and cfg.finetune.init_from == f"{home}/runs/parent"
    )
    assert cfg.data.source == f"{home}/a.txt,{home}/b.txt"
    cfg = load_config(
        None, ["--data.source=https://example.com/~user/a.txt", "--finetune.init_from=hf:~/gpt2"], "finetune"
    )
    # resolve_hf expands hf: folders
    assert cfg.data.source == "https://example.com/~user/a.txt" and cfg.finetune.init_from == "hf:~/gpt2"


def test_saved_configs_are_checked_too(tmp_path):
    cfg = load_config(None, ["--model.n_layer=2"], "pretrain")
    save_config(cfg, tmp_path / "config.yaml")
    assert read_saved_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()
    for data, message in [
        (None, "saved config is empty"),
        ([1, 2], "saved config must hold a mapping of sections"),
        ({"model": 5}, "saved config: section 'model' must be a mapping of keys to values, got 5"),
        ({"model": {"n_embd": 10**40}}, "model.n_embd=10000000000000000000000000000000000000000 is out of range"),
        ({"train": {"lr": float("nan")}}, "train.lr must be a finite number, got nan"),
    ]:
        with pytest.raises(UserError, match=None) as e:
            from_dict(data)
        assert message in str(e.value)
    (tmp_path / "config.yaml").write_bytes(b"model:\n  n_embd: \xff\n")
    with pytest.raises(UserError, match="saved config .*config.yaml is not UTF-8 text"):
        read_saved_config(tmp_path / "config.yaml")
