"""Hostile input to the configs and the side commands (sample, evaluate, export, plot): each row runs a launch
script as a user would and must end with exit code 2 and ONE line `error: ...` naming the problem, no traceback,
and the good run and its export byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, first_of_each, run_script
from safetensors.torch import load_file, save_file

SMOKE = ["--config", "configs/smoke.yaml"]
PRETRAIN = [*SMOKE, "--data.source={shakespeare}", "--data.dir={tmp}/data", "--run.out_dir={tmp}/new_run"]
SAMPLE = ["--run", "{run}", "--prompt", "ROMEO:", "--max_new_tokens", "4"]
HELLASWAG = ["--run", "{run}", "--task", "hellaswag"]
EXPORT = ["--run", "{run}", "--out"]
ITEM = {"ctx": "A man opens the door.", "endings": ["he walks in.", "he sings.", "it rains.", "he sits."], "label": 0}


@dataclass
class Row:
    id: str
    script: str
    # formatted with: {tmp} (this row's folder), {run} and {export} (the good ones), {out} (a copy to break), ...
    args: list[str]
    expect: str | tuple[str, ...]  # parts of the one-line message (formatted too)
    setup: Callable[[dict], None] | None = None
    check: Callable[[dict], None] | None = None  # what must (not) be on disk afterwards
    in_tmp: bool = False  # run in the row's folder instead of the repository


# ----------------------------------------------------------------------------- setups and checks


def write(name: str, data: bytes | str) -> Callable[[dict], None]:
    def setup(p: dict) -> None:
        path = p["tmp"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def copy_run(change: Callable[[Path], None]) -> Callable[[dict], None]:
    """A private copy of the good run at {out}, changed by `change`."""

    def setup(p: dict) -> None:
        shutil.copytree(p["run"], p["out"])
        change(p["out"])

    return setup


def config_yaml(text: str | bytes) -> Callable[[dict], None]:
    return copy_run(lambda out: (out / "config.yaml").write_bytes(text.encode() if isinstance(text, str) else text))


def retype(key: str, value: object) -> Callable[[Path], None]:
    """The copy's config.yaml with model.KEY set to VALUE."""

    def change(out: Path) -> None:
        import yaml

        cfg = yaml.safe_load((out / "config.yaml").read_text())
        cfg["model"][key] = value
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))

    return change


def nan_weights(out: Path) -> None:
    state = load_file(out / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(state, out / "model.safetensors")


def billion_laughs(levels: int, per_level: int) -> str:
    """A config whose one value expands to per_level ** levels strings."""
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(["lol"] * per_level) + "]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * per_level) + "]")
    return "\n".join(lines) + f"\ntrain:\n  sample_prompt: *{names[-1]}\n"


def unchanged(*names: str) -> Callable[[dict], None]:
    """Files that the row made in its folder are as they were made (hashed in the setup)."""

    def check(p: dict) -> None:
        for name in names:
            assert digest(p["tmp"] / name) == p["before"][name], f"{name} changed"

    return check


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under folder (or of the file itself), by relative path."""
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def export_written_anyway(p: dict) -> None:
    """Offline push: the export is complete (the error says so) and identical to the good one but for its marker."""
    new, good = digest(p["tmp"] / "hf"), digest(p["export"])
    assert {k: v for k, v in new.items() if k != ".dist_gpt_export"} == {
        k: v for k, v in good.items() if k != ".dist_gpt_export"
    }


def nothing_beside(p: dict) -> None:
    """No temporary export folder left behind."""
    assert not [x for x in p["tmp"].iterdir() if ".export-" in x.name]


# ----------------------------------------------------------------------------- the table

ROWS = [
    # configs (pretrain / prepare / finetune)
    Row(
        "config: duplicate key",
        "pretrain.py",
        [*PRETRAIN, "--config", "{tmp}/dup.yaml"],
        "config file {tmp}/dup.yaml: key 'lr' appears twice in one mapping (lines 2 and 4); keep one",
        write("dup.yaml", "train:\n  lr: 0.001\n  batch_size: 4\n  lr: 300\n"),
    ),
    Row(
        "config: duplicate section",
        "prepare.py",
        ["--config", "{tmp}/dup.yaml"],
        "key 'train' appears twice in one mapping (lines 1 and 3)",
        write("dup.yaml", "train:\n  lr: 0.001\ntrain:\n  lr: 300\n"),
    ),
    Row(
        "config: billion laughs, nine levels",
        "pretrain.py",
        [*PRETRAIN, "--config", "{tmp}/lol.yaml"],
        "config file {tmp}/lol.yaml: more than 32 aliases (*name)",
        write("lol.yaml", billion_laughs(9, 9)),
    ),
    Row(
        "config: aliases doubling 2**15 times",
        "pretrain.py",
        [*PRETRAIN, "--config", "{tmp}/lol.yaml"],
        "its aliases expand to more than 10000 values",
        write("lol.yaml", billion_laughs(15, 2)),
    ),
    Row(
        "config: nested 3000 deep",
        "pretrain.py",
        [*PRETRAIN, "--config", "{tmp}/deep.yaml"],
        "config file {tmp}/deep.yaml: nested more than 20 levels deep, at line 2",
        write("deep.yaml", "train:\n  lr: " + "[" * 3000 + "]" * 3000 + "\n"),
    ),
    Row(
        "config: not UTF-8",
        "pretrain.py",
        [*PRETRAIN, "--config", "{tmp}/latin1.yaml"],
        "config file {tmp}/latin1.yaml is not UTF-8 text (byte offset 27); save it as UTF-8",
        write("latin1.yaml", "train:\n  sample_prompt: caf\xe9\n".encode("latin-1")),
    ),
    Row(
        "config: a directory",
        "pretrain.py",
        [*PRETRAIN, "--config", "{tmp}"],
        "config file {tmp} is a directory; pass a YAML file",
    ),
    Row(
        "config: --config without a file",
        "pretrain.py",
        [*SMOKE, "--config"],
        "--config needs a file: --config configs/NAME.yaml",
    ),
    Row(
        "config: seed 1e20",
        "pretrain.py",
        [*PRETRAIN, "--run.seed=1e20"],
        "run.seed=100000000000000000000 is out of range: at most 9,223,372,036,854,775,807",
    ),
    Row(
        "config: negative seed",
        "pretrain.py",
        [*PRETRAIN, "--run.seed=-1"],
        "run.seed must be in [0, 2**63 - 1], got -1",
    ),
    Row("config: lr nan", "pretrain.py", [*PRETRAIN, "--train.lr=nan"], "train.lr must be a finite number, got nan"),
    Row(
        "config: time budget inf",
        "pretrain.py",
        [*PRETRAIN, "--train.time_budget_s=inf"],
        "train.time_budget_s must be a finite number, got inf",
    ),
    Row(
        "config: n_embd 1e30",
        "pretrain.py",
        [*PRETRAIN, "--model.n_embd=1e30"],
        ("model.n_embd=1000000000000000019884624838656 is out of range", "at most 2,147,483,647"),
    ),
    Row(
        "config: lora_alpha 0",
        "finetune.py",
        [
            *SMOKE,
            "--finetune.init_from={run}",
            "--finetune.lora_rank=4",
            "--finetune.lora_alpha=0",
            "--run.out_dir={tmp}/ft",
        ],
        "finetune.lora_alpha must be > 0 with LoRA (scale = alpha / rank; 0 trains nothing), got 0.0",
    ),
    Row(
        "config: data.name .",
        "prepare.py",
        [*SMOKE, "--data.name=."],
        "data.name must be a plain folder name (no '/', '\\', leading '.', or spaces at the ends), got '.'",
    ),
    Row(
        "config: data.name with ..",
        "pretrain.py",
        [*PRETRAIN, "--data.name=../runs"],
        "data.name must be a plain folder name",
    ),
    Row(
        "config: out_dir with an empty part",
        "pretrain.py",
        [*PRETRAIN, "--run.out_dir=runs//x"],
        "run.out_dir has an empty or blank path component: 'runs//x'",
    ),
    Row(
        "config: out_dir the working directory",
        "pretrain.py",
        [*PRETRAIN, "--run.out_dir=."],
        "run.out_dir must name a run's own folder, not '.'",
    ),
    Row(
        "config: out_dir the home folder",
        "pretrain.py",
        [*PRETRAIN, "--run.out_dir=~"],
        "run.out_dir must name a run's own folder, not '{home}'",
    ),
    Row(
        "config: a long value is clipped",
        "pretrain.py",
        [*PRETRAIN, "--data.tokenizer=" + "x" * 5000],
        "data.tokenizer: '" + "x" * 76 + "... is not one of char, bpe, gpt2",  # 80 characters of the value
    ),
    # sample
    Row(
        "sample: temperature that underflows",
        "sample.py",
        [*SAMPLE, "--temperature", "1e-300"],
        "--temperature must be 0 (greedy) or a finite number >= 1e-06",
    ),
    Row(
        "sample: seed 2**70",
        "sample.py",
        [*SAMPLE, "--seed", str(2**70)],
        f"--seed must be in [0, 2**63 - 1], got {2**70}",
    ),
    Row("sample: negative seed", "sample.py", [*SAMPLE, "--seed", "-3"], "--seed must be in [0, 2**63 - 1], got -3"),
    Row(
        "sample: device meta",
        "sample.py",
        [*SAMPLE, "--device", "meta"],
        "--device 'meta' is not supported: use cpu, cuda, cuda:N or mps",
    ),
    Row("sample: device xla", "sample.py", [*SAMPLE, "--device", "xla"], "--device 'xla' is not supported"),
    Row("sample: device cuda:7", "sample.py", [*SAMPLE, "--device", "cuda:7"], "--device 'cuda:7': "),
    Row(
        "sample: max_new_tokens 10**12",
        "sample.py",
        [*SAMPLE, "--max_new_tokens", str(10**12)],
        "--max_new_tokens must be in [0, 1,000,000], got 1000000000000",
    ),
    Row(
        "sample: num_samples 10**9",
        "sample.py",
        [*SAMPLE, "--num_samples", str(10**9)],
        "--num_samples must be in [1, 1024]",
    ),
    Row("sample: top_p nan", "sample.py", [*SAMPLE, "--top_p", "nan"], "--top_p must be in (0, 1], got nan"),
    Row(
        "sample: run is a file",
        "sample.py",
        ["--run", "{tmp}/f.txt", "--prompt", "a"],
        "run directory not found: {tmp}/f.txt",
        write("f.txt", "x"),
    ),
    Row(
        "sample: empty run directory",
        "sample.py",
        ["--run", "{tmp}", "--prompt", "a"],
        "{tmp} is not a run directory: config.yaml is missing",
    ),
    Row(
        "sample: config.yaml empty",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        ("saved config {out}/config.yaml is empty", "must hold the config it was trained with"),
        config_yaml(""),
    ),
    Row(
        "sample: config.yaml a list",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "saved config {out}/config.yaml must hold a mapping of sections",
        config_yaml("[1, 2]\n"),
    ),
    Row(
        "sample: config.yaml not YAML",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "saved config {out}/config.yaml is not valid YAML",
        config_yaml("model: [1\n"),
    ),
    Row(
        "sample: config.yaml section a number",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "saved config {out}/config.yaml: section 'model' must be a mapping",
        config_yaml("model: 5\n"),
    ),
    Row(
        "sample: config.yaml unknown key",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        ("unknown config key 'model.n_embed' in saved config {out}/config.yaml", "(did you mean model.n_embd?)"),
        copy_run(retype("n_embed", 32)),
    ),
    Row(
        "sample: config.yaml shape overflows",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "model.n_embd=10000000000000000000000000000000 is out of range",
        copy_run(retype("n_embd", 10**31)),
    ),
    Row(
        "sample: tokenizer.json missing",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "tokenizer file not found: {out}/tokenizer.json",
        copy_run(lambda o: (o / "tokenizer.json").unlink()),
    ),
    Row(
        "sample: tokenizer.json corrupt",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "tokenizer file {out}/tokenizer.json is corrupt",
        copy_run(lambda o: (o / "tokenizer.json").write_text("{")),
    ),
    Row(
        "sample: NaN weights",
        "sample.py",
        ["--run", "{out}", "--prompt", "a"],
        "{out}/model.safetensors holds NaN or inf weights (transformer.h.0.mlp.c_fc.weight)",
        copy_run(nan_weights),
    ),
    Row(
        "sample: prompt of many unknown characters",
        "sample.py",
        ["--run", "{run}", "--prompt", "".join(map(chr, range(0x4E00, 0x4E00 + 500)))],
        "and 480 more; leave them out",
    ),
    # evaluate
    Row(
        "evaluate: batch_size 10**9",
        "evaluate.py",
        ["--run", "{run}", "--batch_size", str(10**9)],
        "--batch_size must be in [1, 4096], got 1000000000",
    ),
    Row(
        "evaluate: device mps",
        "evaluate.py",
        ["--run", "{run}", "--device", "mps"],
        "--device 'mps': no Apple GPU (MPS) is available here",
    ),
    Row(
        "evaluate: truncated model.safetensors",
        "evaluate.py",
        ["--run", "{out}"],
        "model weights {out}/model.safetensors is corrupt or truncated",
        copy_run(lambda o: (o / "model.safetensors").write_bytes((o / "model.safetensors").read_bytes()[:500])),
    ),
    Row(
        "evaluate: hellaswag torn line",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "{tmp}/h.jsonl:2 is not valid JSON",
        write("h.jsonl", json.dumps(ITEM) + '\n{"ctx": "A ma'),
    ),
    Row(
        "evaluate: hellaswag test split (no label)",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "'label' must be the index of the right ending, 0 to 3, got None (the HellaSwag test split has no labels",
        write("h.jsonl", json.dumps({**ITEM, "label": None})),
    ),
    Row(
        "evaluate: hellaswag label out of range",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "{tmp}/h.jsonl:1: 'label' must be the index of the right ending, 0 to 3, got 7",
        write("h.jsonl", json.dumps({**ITEM, "label": 7})),
    ),
    Row(
        "evaluate: hellaswag endings not a list",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "'endings' must be a list of at least two strings",
        write("h.jsonl", json.dumps({**ITEM, "endings": "x"})),
    ),
    Row(
        "evaluate: hellaswag empty file",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "{tmp}/h.jsonl holds no items",
        write("h.jsonl", "\n\n"),
    ),
    Row(
        "evaluate: hellaswag not UTF-8",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "{tmp}/h.jsonl is not UTF-8 text",
        write("h.jsonl", b'{"ctx": "\xff"}\n'),
    ),
    Row(
        "evaluate: hellaswag offline without a file",
        "evaluate.py",
        HELLASWAG,
        "no HellaSwag file at data/hellaswag/hellaswag_val.jsonl and the network is off",
        in_tmp=True,
    ),
    Row(
        "evaluate: hellaswag characters unknown to the run",
        "evaluate.py",
        [*HELLASWAG, "--data", "{tmp}/h.jsonl"],
        "character(s) are not in the char tokenizer's vocabulary",
        write("h.jsonl", json.dumps({**ITEM, "ctx": "[x] + 7 = {y}"})),
    ),
    Row(
        "evaluate: --data without --task",
        "evaluate.py",
        ["--run", "{run}", "--data", "{tmp}/h.jsonl"],
        "--data FILE.jsonl is the HellaSwag file: add --task hellaswag",
    ),
    # export
    Row(
        "export: into the run itself",
        "export_hf.py",
        [*EXPORT, "{run}"],
        "--out '{run}' is the run being exported or a folder above it",
    ),
    Row(
        "export: into a folder above the run",
        "export_hf.py",
        [*EXPORT, "{world}"],
        "--out '{world}' is the run being exported or a folder above it",
    ),
    Row(
        "export: into another run",
        "export_hf.py",
        [*EXPORT, "{out}"],
        "--out '{out}' is a dist_gpt run directory",
        copy_run(lambda o: None),
        check=lambda p: assert_same(p["out"], p["run"]),
    ),
    Row(
        "export: into the repository",
        "export_hf.py",
        [*EXPORT, str(REPO)],
        f"--out '{REPO}' is the repository or a folder above it",
    ),
    Row(
        "export: --overwrite on a folder no export wrote",
        "export_hf.py",
        [*EXPORT, "{tmp}/mine", "--overwrite"],
        "--out '{tmp}/mine' already holds files that no export wrote (no .dist_gpt_export)",
        write("mine/notes.txt", "my notes"),
        check=unchanged("mine"),
    ),
    Row(
        "export: an earlier export without --overwrite",
        "export_hf.py",
        [*EXPORT, "{tmp}/hf"],
        "--out '{tmp}/hf' holds an earlier export; pass --overwrite to replace it",
        lambda p: shutil.copytree(p["export"], p["tmp"] / "hf"),
        check=unchanged("hf"),
    ),
    Row(
        "export: --out a file",
        "export_hf.py",
        [*EXPORT, "{tmp}/f.txt"],
        "--out '{tmp}/f.txt' is a file",
        write("f.txt", "x"),
        check=unchanged("f.txt"),
    ),
    Row(
        "export: bad Hub repository id",
        "export_hf.py",
        [*EXPORT, "{tmp}/hf", "--push_to_hub", "no-owner"],
        "--push_to_hub needs OWNER/NAME",
        check=lambda p: assert_absent(p["tmp"] / "hf"),
    ),
    Row(
        "export: push offline",
        "export_hf.py",
        [*EXPORT, "{tmp}/hf", "--push_to_hub", "someone/tiny"],
        (
            "--push_to_hub someone/tiny needs the network, and HF_HUB_OFFLINE is set",
            "the export is complete in {tmp}/hf",
        ),
        check=export_written_anyway,
    ),
    Row(
        "export: truncated model.safetensors",
        "export_hf.py",
        ["--run", "{out}", "--out", "{tmp}/hf"],
        "model weights {out}/model.safetensors is corrupt or truncated",
        copy_run(lambda o: (o / "model.safetensors").write_bytes((o / "model.safetensors").read_bytes()[:500])),
        check=lambda p: (assert_absent(p["tmp"] / "hf"), nothing_beside(p)),
    ),
    # plot
    Row("plot: no metrics.jsonl", "plot.py", ["{tmp}", "--out", "{tmp}/x.png"], "{tmp}/metrics.jsonl not found"),
    Row(
        "plot: only damaged lines",
        "plot.py",
        ["{tmp}", "--out", "{tmp}/x.png"],
        "{tmp}/metrics.jsonl holds no losses yet",
        write("metrics.jsonl", b'[1, 2]\n3\n{"step": "a", "tokens": 1, "train_loss": 2}\n\xff\xfe\n{"step": 1, "tok'),
        check=lambda p: assert_absent(p["tmp"] / "x.png"),
    ),
    Row(
        "plot: --out not a png",
        "plot.py",
        ["{run}", "--out", "{tmp}/x.jpg"],
        "--out must name a .png file, got '{tmp}/x.jpg'",
    ),
    Row(
        "plot: --out a folder",
        "plot.py",
        ["{run}", "--out", "{tmp}/d.png"],
        "--out '{tmp}/d.png' is a folder",
        lambda p: (p["tmp"] / "d.png").mkdir(),
    ),
    Row(
        "plot: a run that is a file",
        "plot.py",
        ["{tmp}/f.txt", "--out", "{tmp}/x.png"],
        "{tmp}/f.txt is a file, not a run directory",
        write("f.txt", "x"),
    ),
]


def assert_same(a: Path, b: Path) -> None:
    assert digest(a) == digest(b)


def assert_absent(path: Path) -> None:
    assert not path.exists(), f"{path} was written"


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory, shakespeare) -> dict:
    """A finished 4-step smoke run and its export, which rows read but must never change."""
    root = tmp_path_factory.mktemp("world")
    run, export = root / "run", root / "export"
    trained = run_script(
        "pretrain.py",
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={root / 'data'}",
        f"--run.out_dir={run}",
        "--train.max_steps=4",
        "--train.checkpoint_interval=2",
    )
    assert trained.returncode == 0, trained.stderr
    exported = run_script("export_hf.py", "--run", str(run), "--out", str(export))
    assert exported.returncode == 0, exported.stderr
    return {"shakespeare": shakespeare, "world": root, "run": run, "export": export, "home": str(Path.home())}


@pytest.mark.parametrize("row", first_of_each(ROWS, lambda r: r.script))
def test_bad_input(row: Row, world: dict, tmp_path: Path):
    paths = {**world, "tmp": tmp_path, "out": tmp_path / "run_copy"}
    if row.setup:
        row.setup(paths)
    paths["before"] = {p.name: digest(p) for p in tmp_path.iterdir()}
    good_before = {name: digest(world[name]) for name in ("run", "export")}

    out = run_script(
        row.script, *(a.format(**paths) for a in row.args), cwd=tmp_path if row.in_tmp else None, timeout=300
    )

    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0]  # one line, the last
    assert len(errors[0]) < 500
    for part in (row.expect,) if isinstance(row.expect, str) else row.expect:
        assert part.format(**paths) in errors[0]
    assert {name: digest(world[name]) for name in ("run", "export")} == good_before
    if row.check:
        row.check(paths)


def test_table_covers_every_command():
    assert len(ROWS) >= 30
    assert {r.script for r in ROWS} >= {
        "pretrain.py",
        "prepare.py",
        "finetune.py",
        "sample.py",
        "evaluate.py",
        "export_hf.py",
        "plot.py",
    }


def test_a_valid_run_still_samples(world):
    """The checks refuse only what is wrong: the good run samples and evaluates on the fixture."""
    sampled = run_script(
        "sample.py",
        "--run",
        str(world["run"]),
        "--prompt",
        "ROMEO:",
        "--max_new_tokens",
        "8",
        "--temperature",
        "1e-6",
        "--top_k",
        "100000",
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:") and len(sampled.stdout) == len("ROMEO:") + 8 + 1
    scored = run_script(
        "evaluate.py",
        "--run",
        str(world["run"]),
        "--task",
        "hellaswag",
        "--data",
        str(REPO / "tests/fixtures/hellaswag_tiny.jsonl"),
        "--json",
    )
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["items"] == 10
