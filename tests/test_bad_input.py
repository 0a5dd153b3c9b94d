"""Bad input, everywhere: each row runs a launch script as a user would and must end with exit code 2 and
one line `error: ...` that names the problem (and the fix), no traceback, and nothing half-written."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import first_of_each, run_script

from dist_gpt.checkpoint import list_checkpoints
from dist_gpt.io import disk_error
from dist_gpt.tokenizers import CharTokenizer, load_tokenizer

SMOKE = ["--config", "configs/smoke.yaml"]
PRETRAIN = [*SMOKE, "--data.source={shakespeare}", "--data.dir={data}", "--run.out_dir={out}"]
FINETUNE = [
    *SMOKE,
    "--data.source={shakespeare}",
    "--data.dir={tmp}/ft_data",
    "--run.out_dir={out}",
    "--finetune.init_from={run}",
]
PREPARE = [*SMOKE, "--data.dir={tmp}/data"]

# Starts a launch script with writes limited to 60 kB per file (SIGXFSZ ignored), so writing a checkpoint fails
# with EFBIG the way a full disk fails with ENOSPC: the same failed write() in the middle of a save.
DISK_FULL = [
    sys.executable,
    "-c",
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
]


@dataclass
class Row:
    id: str
    script: str
    # formatted with the paths below: {tmp} (this row's folder), {out} (its run directory), {run}, {data}, ...
    args: list[str]
    expect: str | tuple[str, ...]  # distinctive parts of the one-line message, the problem and the fix (formatted too)
    setup: Callable[[dict], None] | None = None
    launcher: list[str] | None = None
    check: Callable[[dict], None] | None = None  # more about what must (not) be on disk afterwards


# ----------------------------------------------------------------------------- row setups and checks


def write(name: str, data: bytes) -> Callable[[dict], None]:
    return lambda p: (p["tmp"] / name).write_bytes(data)


def copy_run(p: dict) -> None:
    """A private copy of the finished run as this row's run directory, to break or to resume."""
    shutil.copytree(p["run"], p["out"])


def corrupt_model(p: dict) -> None:
    copy_run(p)
    model = p["out"] / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])


def without_model(p: dict) -> None:
    copy_run(p)
    (p["out"] / "model.safetensors").unlink()


def bigger_tokenizer(p: dict) -> None:
    """The parent's tokenizer.json swapped for one with two more characters than the model has rows."""
    copy_run(p)
    CharTokenizer([*load_tokenizer(p["run"] / "tokenizer.json").chars, "ü", "€"]).save(p["out"] / "tokenizer.json")


def live_lock(p: dict) -> None:
    """Another live run holds the directory: this test process holds the flock of its .lock, which names it."""
    p["out"].mkdir()
    (p["out"] / ".lock").write_text(f"{os.getpid()}\n")
    p["lock_fd"] = os.open(p["out"] / ".lock", os.O_RDWR)
    fcntl.flock(p["lock_fd"], fcntl.LOCK_EX | fcntl.LOCK_NB)


def lock_untouched(p: dict) -> None:
    assert (p["out"] / ".lock").read_text() == f"{os.getpid()}\n"
    assert sorted(x.name for x in p["out"].iterdir()) == [".lock"]
    os.close(p["lock_fd"])


def unwritable_out_dir(p: dict) -> None:
    """A parent folder without write permission; root ignores permissions, so there use a path below a regular file,
    which no user can create either."""
    locked = p["tmp"] / "locked"
    locked.mkdir(mode=0o555)
    p["out"] = locked / "run"
    if os.access(locked, os.W_OK):
        (p["tmp"] / "a_file").write_text("")
        p["out"] = p["tmp"] / "a_file" / "run"


def no_arrays(p: dict) -> None:
    for data in (p["tmp"] / "data", p["tmp"] / "ft_data"):
        assert not any((data / name).exists() for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"))


def nothing_saved(p: dict) -> None:
    assert list_checkpoints(p["out"] / "checkpoints") == [] and not list((p["out"] / "checkpoints").glob("*"))
    assert not (p["out"] / "model.safetensors").exists() and not (p["out"] / "summary.json").exists()


def copy_unchanged(p: dict) -> None:
    """A rejected resume leaves the run directory as it was."""
    assert snapshot(p["out"]) == snapshot(p["run"])


def without_checkpoints(p: dict) -> None:
    """The finished run with its checkpoints deleted to save disk."""
    copy_run(p)
    shutil.rmtree(p["out"] / "checkpoints")


def unchanged_but_checkpoints(p: dict) -> None:
    assert snapshot(p["out"]) == {k: v for k, v in snapshot(p["run"]).items() if not k.startswith("checkpoints/")}


def other_corpus(p: dict) -> None:
    """The run, and another corpus whose character vocabulary has the same size (65) as Tiny Shakespeare's."""
    copy_run(p)
    chars = [chr(c) for c in range(0x100, 0x100 + 64)] + ["\n"]
    (p["tmp"] / "other.txt").write_text("".join(chars[i % 65] for i in range(20_000)) + "\n", encoding="utf-8")


def same_chars_other_text(p: dict) -> None:
    """The run, and another text with exactly Tiny Shakespeare's characters (the same char tokenizer): the corpus backwards."""
    copy_run(p)
    (p["tmp"] / "other.txt").write_text(p["shakespeare"].read_text(encoding="utf-8")[::-1], encoding="utf-8")


def broken_checkpoints(p: dict) -> None:
    """Every checkpoint of the run damaged (a flipped byte), its trained model still there."""
    copy_run(p)
    for ckpt in (p["out"] / "checkpoints").iterdir():
        f = ckpt / "optimizer.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))


def model_kept(p: dict) -> None:
    assert (p["out"] / "model.safetensors").read_bytes() == (p["run"] / "model.safetensors").read_bytes()
    assert not list((p["out"] / "checkpoints").glob("step_*"))  # the broken ones were moved aside, not resumed


def foreign_folder(p: dict) -> None:
    """A folder of someone else's files."""
    p["out"].mkdir()
    (p["out"] / "notes.txt").write_text("my notes")
    (p["out"] / "sub").mkdir()
    (p["out"] / "sub" / "data.csv").write_text("a,b\n1,2\n")


def foreign_untouched(p: dict) -> None:
    assert snapshot(p["out"]) == {"notes.txt": b"my notes", "sub/data.csv": b"a,b\n1,2\n"}


def runs_folder(p: dict) -> None:
    """{out} is a folder holding runs, like runs/."""
    p["out"].mkdir()
    shutil.copytree(p["run"], p["out"] / "a")


def runs_untouched(p: dict) -> None:
    assert snapshot(p["out"] / "a") == snapshot(p["run"])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(folder)): f.read_bytes()
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != ".lock"
    }


# ----------------------------------------------------------------------------- the table

ROWS = [
    # prepare
    Row(
        "prepare: missing corpus",
        "prepare.py",
        [*PREPARE, "--data.source={tmp}/missing.txt"],
        "data.source: no such file or directory (or an empty directory): {tmp}/missing.txt",
        check=no_arrays,
    ),
    Row(
        "prepare: empty corpus",
        "prepare.py",
        [*PREPARE, "--data.source={tmp}/empty.txt"],
        "the corpus is empty: {tmp}/empty.txt holds no text",
        write("empty.txt", b""),
        check=no_arrays,
    ),
    Row(
        "prepare: corpus not UTF-8",
        "prepare.py",
        [*PREPARE, "--data.source={tmp}/latin1.txt"],
        "{tmp}/latin1.txt is not valid UTF-8 (byte offset 9): convert it to UTF-8, or set data.errors=replace",
        write("latin1.txt", "hello caf\xe9 world\n".encode("latin-1") * 50),
        check=no_arrays,
    ),  # fmt: skip
    Row(
        "prepare: unknown config key",
        "prepare.py",
        [*PREPARE, "--data.source={shakespeare}", "--data.vocab=100"],
        "unknown config key 'data.vocab' in the command line (did you mean data.vocab_size?)",
        check=no_arrays,
    ),
    Row(
        "prepare: value not among the choices",
        "prepare.py",
        [*PREPARE, "--data.source={shakespeare}", "--data.tokenizer=wordpiece"],
        "data.tokenizer: 'wordpiece' is not one of char, bpe, gpt2",
        check=no_arrays,
    ),
    Row(
        "prepare: config file not found",
        "prepare.py",
        ["--config", "{tmp}/nope.yaml"],
        "config file not found: {tmp}/nope.yaml",
    ),
    Row(
        "prepare: config not valid YAML",
        "prepare.py",
        ["--config", "{tmp}/broken.yaml"],
        "config file {tmp}/broken.yaml is not valid YAML",
        write("broken.yaml", b"train:\n  lr: [1\n"),
    ),
    # pretrain
    Row(
        "pretrain: wrong type",
        "pretrain.py",
        [*PRETRAIN, "--train.batch_size=abc"],
        "train.batch_size: expected int, got 'abc'",
    ),
    Row(
        "pretrain: batch_size 0",
        "pretrain.py",
        [*PRETRAIN, "--train.batch_size=0"],
        "train.batch_size must be >= 1, got 0",
    ),
    Row(
        "pretrain: contradictory model shape",
        "pretrain.py",
        [*PRETRAIN, "--model.n_embd=30", "--model.n_head=4"],
        "model.n_embd (30) must be divisible by model.n_head (4)",
    ),
    Row(
        "pretrain: block_size larger than a split",
        "pretrain.py",
        [
            *SMOKE,
            "--data.source={tmp}/small.txt",
            "--data.dir={tmp}/data",
            "--run.out_dir={out}",
            "--model.block_size=512",
        ],
        "the val split has 300 tokens, fewer than block_size + 1 = 513: use a larger corpus, change data.val_fraction, or lower model.block_size",
        lambda p: (p["tmp"] / "small.txt").write_text(p["shakespeare"].read_text()[:3000]),
        check=no_arrays,
    ),  # fmt: skip
    Row(
        "pretrain: vocab_size below the tokenizer's",
        "pretrain.py",
        [*PRETRAIN, "--model.vocab_size=10"],
        "model.vocab_size=10 is smaller than the tokenizer's 65 tokens; leave it at 0",
    ),
    Row(
        "pretrain: unexpected argument",
        "pretrain.py",
        [*PRETRAIN, "--bogus"],
        "unexpected argument '--bogus': overrides look like --section.key=value",
    ),
    Row(
        "pretrain: out_dir not writable",
        "pretrain.py",
        PRETRAIN,
        ("cannot create run directory {out}: ", "; choose a writable --run.out_dir"),
        unwritable_out_dir,
    ),
    Row(
        "pretrain: disk full on save",
        "pretrain.py",
        PRETRAIN,
        "disk full while writing {out}/checkpoints/.tmp_step_000010: free space on that filesystem or point the output elsewhere",
        launcher=DISK_FULL,
        check=nothing_saved,
    ),
    Row(
        "pretrain: run directory held by a live run",
        "pretrain.py",
        PRETRAIN,
        "run directory {out} is in use by a live run (PID {pid})",
        live_lock,
        check=lock_untouched,
    ),
    Row(
        "pretrain: existing run with resume=never",
        "pretrain.py",
        [*PRETRAIN, "--run.resume=never"],
        "already exists and run.resume=never; pass --run.overwrite=true to replace it",
        copy_run,
        check=copy_unchanged,
    ),
    Row(
        "pretrain: resume with another data.loader",
        "pretrain.py",
        [*PRETRAIN, "--train.max_steps=8", "--data.loader=sequential"],
        "the checkpoint's data loader used mode='random', this run 'sequential': resume with the same setting",
        copy_run,
        check=copy_unchanged,
    ),  # fmt: skip
    Row(
        "pretrain: resume with another model shape",
        "pretrain.py",
        [*PRETRAIN, "--train.max_steps=8", "--model.n_embd=48"],
        ("was trained with another model than this command asks for (n_embd=48)", "add --model.n_embd=32"),
        copy_run,
        check=copy_unchanged,
    ),
    # the run directory is owned: nothing a command does destroys a run (issue 15)
    Row(
        "pretrain: a model far too large for this machine",
        "pretrain.py",
        [*PRETRAIN, "--model.n_embd=16384", "--model.n_head=16", "--model.n_layer=48"],
        ("needs about", "GiB but this machine's free RAM (per process) has", "lower train.batch_size"),
        check=nothing_saved,
    ),
    Row(
        "pretrain: a micro-batch far too large for this machine",
        "pretrain.py",
        [*PRETRAIN, "--train.batch_size=200000", "--model.block_size=1024"],
        ("needs about", "lower train.batch_size (raise train.grad_accum to keep the tokens per step)"),
        check=nothing_saved,
    ),
    Row(
        "pretrain: finished run without checkpoints, rerun",
        "pretrain.py",
        PRETRAIN,
        (
            "holds a trained model but its checkpoints/ folder is gone",
            "finetune.init_from={out}",
            "--run.resume=never --run.overwrite=true",
        ),
        without_checkpoints,
        check=unchanged_but_checkpoints,
    ),
    Row(
        "pretrain: finished run without checkpoints, continued with more steps",
        "pretrain.py",
        [*PRETRAIN, "--train.max_steps=8"],
        "holds a trained model but its checkpoints/ folder is gone",
        without_checkpoints,
        check=unchanged_but_checkpoints,
    ),
    Row(
        "pretrain: finished run continued on another corpus of the same vocabulary size",
        "pretrain.py",
        [
            *SMOKE,
            "--data.source={tmp}/other.txt",
            "--data.dir={tmp}/other_data",
            "--run.out_dir={out}",
            "--train.max_steps=8",
        ],
        ("was trained with another tokenizer", "resume with the data it was trained on"),
        other_corpus,
        check=copy_unchanged,
    ),
    Row(
        "pretrain: finished run continued on other data with the same tokenizer",
        "pretrain.py",
        [
            *SMOKE,
            "--data.source={tmp}/other.txt",
            "--data.dir={tmp}/other_data",
            "--run.out_dir={out}",
            "--train.max_steps=8",
        ],
        ("was trained on other data", "finetune from it to train on new data"),
        same_chars_other_text,
        check=copy_unchanged,
    ),
    Row(
        "pretrain: resume with another model function, the same weights (a config whose defaults changed)",
        "pretrain.py",
        [*PRETRAIN, "--train.max_steps=8", "--model.qk_norm=true", "--model.activation=relu2"],
        (
            "{out} was trained with another model than this command asks for (activation='relu2', qk_norm=True)",
            "to resume it, add --model.activation=gelu --model.qk_norm=false",
        ),
        copy_run,
        check=copy_unchanged,
    ),
    Row(
        "pretrain: every checkpoint broken, the trained model there",
        "pretrain.py",
        [*PRETRAIN, "--train.max_steps=8"],
        ("holds a trained model but no complete checkpoint survives", "--run.resume=never --run.overwrite=true"),
        broken_checkpoints,
        check=model_kept,
    ),
    Row(
        "pretrain: overwrite a folder that is not a run",
        "pretrain.py",
        [*PRETRAIN, "--run.resume=never", "--run.overwrite=true"],
        ("is a non-empty folder that is not a dist_gpt run", "choose another --run.out_dir"),
        foreign_folder,
        check=foreign_untouched,
    ),
    Row(
        "pretrain: overwrite a folder of runs",
        "pretrain.py",
        [*PRETRAIN, "--run.resume=never", "--run.overwrite=true"],
        "holds other runs; a run needs a folder of its own",
        runs_folder,
        check=runs_untouched,
    ),
    Row(
        "pretrain: the data folder as the run directory",
        "pretrain.py",
        [
            *SMOKE,
            "--data.source={shakespeare}",
            "--data.dir={data}",
            "--run.out_dir={data}",
            "--run.resume=never",
            "--run.overwrite=true",
        ],
        "is the data folder (or above it)",
    ),
    Row(
        "pretrain: a folder above the data as the run directory",
        "pretrain.py",
        [
            *SMOKE,
            "--data.source={shakespeare}",
            "--data.dir={tmp}/d/data",
            "--run.out_dir={tmp}/d",
            "--run.resume=never",
            "--run.overwrite=true",
        ],
        "is the data folder (or above it)",
    ),
    Row(
        "finetune: into its own parent",
        "finetune.py",
        [
            *SMOKE,
            "--data.source={shakespeare}",
            "--data.dir={tmp}/ft_data",
            "--run.out_dir={run}",
            "--finetune.init_from={run}",
        ],
        ("is the parent run", "never touches its parent's"),
    ),
    Row(
        "finetune: inside its parent",
        "finetune.py",
        [
            *SMOKE,
            "--data.source={shakespeare}",
            "--data.dir={tmp}/ft_data",
            "--run.out_dir={run}/finetuned",
            "--finetune.init_from={run}",
        ],
        "is the parent run {run} (or contains or lies inside it)",
    ),
    Row(
        "finetune: into a pretrain run",
        "finetune.py",
        FINETUNE,
        "holds a pretrain run; this finetune needs its own directory",
        copy_run,
        check=copy_unchanged,
    ),
    # finetune
    Row(
        "finetune: no parent",
        "finetune.py",
        [*FINETUNE[:-1]],
        "finetune.init_from is required: --finetune.init_from=RUN_DIR",
    ),
    Row(
        "finetune: shape contradicts the parent",
        "finetune.py",
        [*FINETUNE, "--model.n_layer=4"],
        "model.n_layer=4 contradicts the parent {run}, which has model.n_layer=2",
    ),
    Row(
        "finetune: another tokenizer than the parent's",
        "finetune.py",
        [*FINETUNE, "--data.tokenizer=bpe"],
        "data.tokenizer=bpe but the parent {run} uses the char tokenizer",
    ),
    Row(
        "finetune: parent's tokenizer does not match its model",
        "finetune.py",
        [*FINETUNE[:-1], "--finetune.init_from={out}", "--run.out_dir={tmp}/ft"],
        "tokenizer.json has 67 tokens but the model only 65",
        bigger_tokenizer,
    ),  # fmt: skip
    Row(
        "finetune: parent without model.safetensors",
        "finetune.py",
        [*FINETUNE[:-1], "--finetune.init_from={out}", "--run.out_dir={tmp}/ft"],
        "model weights not found: {out}/model.safetensors",
        without_model,
    ),
    Row(
        "finetune: parent's model.safetensors corrupt",
        "finetune.py",
        [*FINETUNE[:-1], "--finetune.init_from={out}", "--run.out_dir={tmp}/ft"],
        "model weights {out}/model.safetensors is corrupt or truncated",
        corrupt_model,
    ),  # fmt: skip
    Row(
        "finetune: corpus with characters the parent never saw",
        "finetune.py",
        [*FINETUNE, "--data.source={sonnets}"],
        "2 character(s) are not in the char tokenizer's vocabulary: '(', ')'; set data.unknown=drop",
        check=no_arrays,
    ),  # fmt: skip
    # sample
    Row(
        "sample: missing run directory",
        "sample.py",
        ["--run", "{tmp}/nope", "--prompt", "ROMEO:"],
        "run directory not found: {tmp}/nope",
    ),
    Row(
        "sample: not a run directory",
        "sample.py",
        ["--run", "{tmp}", "--prompt", "ROMEO:"],
        "{tmp} is not a run directory: config.yaml is missing",
    ),
    Row(
        "sample: corrupt model.safetensors",
        "sample.py",
        ["--run", "{out}", "--prompt", "ROMEO:"],
        "model weights {out}/model.safetensors is corrupt or truncated",
        corrupt_model,
    ),
    Row(
        "sample: prompt with unknown characters",
        "sample.py",
        ["--run", "{run}", "--prompt", "ROMEO: ü€"],
        "the prompt has characters that the run's char tokenizer does not know: 'ü', '€'",
    ),
    Row("sample: no prompt", "sample.py", ["--run", "{run}"], "the following arguments are required: --prompt"),
]


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory, shakespeare, sonnets) -> dict:
    """A prepared dataset and a finished (4-step) run that rows read but must never change."""
    root = tmp_path_factory.mktemp("world")
    data, run = root / "data", root / "run"
    out = run_script(
        "pretrain.py",
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={data}",
        f"--run.out_dir={run}",
        "--train.max_steps=4",
        "--train.checkpoint_interval=2",
    )
    assert out.returncode == 0, out.stderr
    return {
        "shakespeare": shakespeare,
        "sonnets": sonnets,
        "data": data,
        "run": run,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def half_written(folder: Path) -> list[Path]:
    """Temporary files and folders of an atomic write or a checkpoint save."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


@pytest.mark.parametrize("row", first_of_each(ROWS, lambda r: r.script))
def test_bad_input(row: Row, world: dict, tmp_path: Path):
    paths = {**world, "tmp": tmp_path, "out": tmp_path / "run"}
    if row.setup:
        row.setup(paths)
    shared_before = {name: snapshot(world[name]) for name in ("data", "run")}

    out = run_script(row.script, *(a.format(**paths) for a in row.args), launcher=row.launcher)

    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for part in (row.expect,) if isinstance(row.expect, str) else row.expect:
        assert part.format(**paths) in last
    assert half_written(tmp_path) == [] and half_written(world["run"]) == []
    assert {name: snapshot(world[name]) for name in ("data", "run")} == shared_before
    if row.check:
        row.check(paths)


def test_a_command_with_nothing_to_do_changes_nothing(world, tmp_path, shakespeare):
    """A finished run rerun as it was, or on another corpus: "nothing to do", and not one byte of it changes."""
    copy_run({"run": world["run"], "out": tmp_path / "run"})
    (tmp_path / "other.txt").write_text(shakespeare.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    before = snapshot(tmp_path / "run")
    for source, data in ((shakespeare, world["data"]), (tmp_path / "other.txt", tmp_path / "other_data")):
        out = run_script(
            "pretrain.py",
            *SMOKE,
            f"--data.source={source}",
            f"--data.dir={data}",
            f"--run.out_dir={tmp_path / 'run'}",
            "--train.max_steps=4",
        )
        assert out.returncode == 0 and "run already complete at step 4" in out.stderr, out.stderr
        assert snapshot(tmp_path / "run") == before


def test_table_covers_every_stage():
    assert len(ROWS) >= 20
    assert {r.script for r in ROWS} == {"prepare.py", "pretrain.py", "finetune.py", "sample.py"}


def test_debug_shows_the_traceback(tmp_path):
    out = run_script("pretrain.py", *SMOKE, f"--run.out_dir={tmp_path / 'run'}", "--train.batch_size=0", "--debug")
    assert out.returncode == 2
    assert (
        "Traceback (most recent call last)" in out.stderr
        and "dist_gpt.errors.UserError: train.batch_size must be >= 1, got 0" in out.stderr
    )
    assert out.stderr.strip().splitlines()[-1] == "error: train.batch_size must be >= 1, got 0"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_every_full_disk_errno_reads_as_disk_full(code):
    message = str(disk_error(Path("/runs/x/model.safetensors"), OSError(code, os.strerror(code))))
    assert (
        message
        == "disk full while writing /runs/x/model.safetensors: free space on that filesystem or point the output elsewhere"
    )


# A full disk while appending to metrics.jsonl (the log written at every log step): `open(..., "a")` of that file
# fails with ENOSPC from the sixth line on, the rest of the run writes normally.
FULL_METRICS = """
import builtins, errno, os, sys
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

real_open, lines = builtins.open, [0]
def full_open(file, mode="r", *args, **kwargs):
    if str(file).endswith("metrics.jsonl") and "a" in mode:
        lines[0] += 1
        if lines[0] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return real_open(file, mode, *args, **kwargs)
builtins.open = full_open
main(pretrain, sys.argv[1:])
"""


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_disk_full_while_appending_metrics_is_one_line_and_keeps_the_checkpoint(tmp_path, shakespeare):
    args = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--train.checkpoint_interval=4",
    ]
    out = subprocess.run([sys.executable, "-c", FULL_METRICS, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (
        out.stderr.strip().splitlines()[-1]
        == f"error: disk full while writing {tmp_path / 'run' / 'metrics.jsonl'}: free space on that filesystem or point the output elsewhere"
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_000004"
    ]  # the last good checkpoint stays
    again = run_script("pretrain.py", *args)  # space freed: the same command resumes from it and finishes
    assert again.returncode == 0 and "step_000004" in again.stderr, again.stderr
