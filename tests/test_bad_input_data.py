"""Hostile input to prepare: each case runs `launch/prepare.py` (as a subprocess, or in this process where a failure
has to be injected) and must end with exit code 2 and ONE line `error: ...` without a traceback (or exit 0 with a
warning line), leave a good prepared folder byte for byte as it was, and never lose data silently."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_script

import dist_gpt.prepare as prepare_mod
from dist_gpt.batches import load_meta, open_split
from dist_gpt.cli import main
from dist_gpt.config import DataConfig
from dist_gpt.io import FileLock, sha256_file
from dist_gpt.prepare import RECIPES, prepare
from dist_gpt.tokenizers import load_tokenizer

ENV = {"PYTHONPATH": str(REPO)}  # the launch scripts import dist_gpt from the checkout
SMOKE = ["--config", str(REPO / "configs" / "smoke.yaml"), "--model.block_size=8"]
LINE = "To be, or not to be, that is the question:\n"


# ----------------------------------------------------------------------------- helpers


def write_corpus(path: Path, lines: int = 40, text: str = LINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text * lines, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but `.lock` (the lock file holds the PID of the last prepare)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def good(tmp_path) -> tuple[Path, dict[str, str]]:
    """A good prepared folder (and its hashes) that a failing prepare must leave as it is."""
    out = tmp_path / "good"
    prepare(DataConfig(source=str(write_corpus(tmp_path / "good.txt"))), data_dir=out, log=lambda _: None, block_size=8)
    return out, hashes(out)


def prepare_cmd(
    tmp_path: Path, *args: str, env: dict | None = None, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    return run_script(
        "prepare.py", *SMOKE, *args, cwd=tmp_path, env={**ENV, **(env or {})}, timeout=180, launcher=launcher
    )


def prepare_here(capsys, *args: str) -> tuple[int, str, str]:
    """launch/prepare.py run in this process, so that a test can monkeypatch a failure into it: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("launch_prepare", REPO / "launch" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        main(module.run, [*SMOKE, *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_untouched(good: tuple[Path, dict[str, str]]) -> None:
    folder, before = good
    assert hashes(folder) == before
    assert not [
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]  # no temporary files left


def mount_tmpfs(folder: Path, *options: str) -> None:
    """A small tmpfs at `folder` (needs root and a kernel that lets this container mount); skips the test otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); the monkeypatched cases cover the logic"
        )


@pytest.fixture
def tmpfs(tmp_path):
    folder = tmp_path / "tmpfs"
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


# ----------------------------------------------------------------------------- recipes: plain names in data/ only


@pytest.mark.parametrize("name", ["ESCAPE", "ABSOLUTE", "evil.py", "sub/evil", "no_such_recipe"])
def test_recipe_is_a_plain_name_inside_data(name, tmp_path, good):
    evil = tmp_path / "evil.py"
    marker = tmp_path / "ran"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef records(text):\n    return [{{'text': text}}]\n")
    recipe = {"ESCAPE": os.path.relpath(tmp_path / "evil", RECIPES), "ABSOLUTE": str(evil)}.get(name, name)
    result = prepare_cmd(
        tmp_path, f"--data.source={tmp_path / 'good.txt'}", f"--data.dir={good[0]}", f"--data.recipe={recipe}"
    )
    assert_one_error(
        result.returncode, result.stderr, f"data.recipe {recipe!r} is not a recipe", "gutenberg, sonnets_sft"
    )
    assert not marker.exists()  # the file was never run
    assert_untouched(good)


# ----------------------------------------------------------------------------- two prepares of one folder


def test_a_second_prepare_waits_for_the_lock_then_finds_the_data_up_to_date(tmp_path, good):
    folder = good[0]
    with FileLock(folder / ".lock", "test") as lock:  # this test process plays the first prepare
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch" / "prepare.py"),
                *SMOKE,
                f"--data.source={tmp_path / 'good.txt'}",
                f"--data.dir={folder}",
            ],
            cwd=tmp_path,
            env={**os.environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = proc.stdout.readline()
        assert first == f"waiting for another prepare of {folder} (PID {os.getpid()})...\n"
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting
        assert lock.fd is not None
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "is up to date" in out and "prepared" not in out
    assert_untouched(good)


def test_two_prepares_of_one_new_folder_build_it_once(tmp_path, shakespeare):
    args = [
        sys.executable,
        str(REPO / "launch" / "prepare.py"),
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
    ]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdouts = [o for o, _ in outs]
    assert sum("prepared" in o for o in stdouts) == 1 and sum("is up to date" in o for o in stdouts) == 1
    assert load_meta(tmp_path / "data")["tokens"] == {"train": 1_003_854, "val": 111_540}


def test_file_lock_without_waiting_names_the_holder(tmp_path):
    with FileLock(tmp_path / ".lock", "prepare of X"):
        code = "from dist_gpt.io import FileLock; import sys; FileLock(sys.argv[1], 'prepare of X').acquire(wait=False)"
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / ".lock")],
            env={**os.environ, **ENV},
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and f"another prepare of X is running (PID {os.getpid()})" in result.stderr
    FileLock(tmp_path / ".lock", "prepare of X").acquire(wait=False).release()  # free again once released


# ----------------------------------------------------------------------------- disk full, read-only, unreadable


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "tokenizer.json", "meta.json"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_keeps_the_old_folder(name, code, tmp_path, good, capsys, monkeypatch):
    """A write that fails (disk full, read-only) at any of prepare's files: one line, the old folder as it was."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    changed = write_corpus(tmp_path / "changed.txt", text="Whether 'tis nobler in the mind to suffer\n")
    result = prepare_here(capsys, f"--data.source={changed}", f"--data.dir={good[0]}")
    what = "disk full while writing" if code == errno.ENOSPC else "the filesystem is read-only"
    assert_one_error(result[0], result[2], what, str(good[0]))
    assert_untouched(good)


@pytest.mark.parametrize("where", ["datasets-cache", "arrays"])
def test_disk_full_with_a_real_write_limit(where, tmp_path, good, shakespeare):
    """A real failed write(): a 200 kB file size limit (EFBIG, as ENOSPC) hits the datasets cache while reading all of
    Tiny Shakespeare, or (120 kB of it, tokenized by 2 processes in small shards) the 216 kB train.bin."""
    limit = [
        sys.executable,
        "-c",
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
    ]
    source, extra = shakespeare, []
    if where == "arrays":
        source, extra = tmp_path / "part.txt", ["--data.num_proc=2"]
        source.write_bytes(shakespeare.read_bytes()[:120_000])
    result = prepare_cmd(tmp_path, f"--data.source={source}", f"--data.dir={good[0]}", *extra, launcher=limit)
    assert_one_error(result.returncode, result.stderr, "disk full while writing", str(good[0]))
    assert_untouched(good)


def test_disk_full_on_a_real_small_filesystem(tmp_path, tmpfs, shakespeare):
    mount_tmpfs(tmpfs, "size=300k")
    out = tmpfs / "data"
    prepare(DataConfig(source=str(write_corpus(tmp_path / "small.txt"))), data_dir=out, log=lambda _: None)
    before = hashes(out)
    result = prepare_cmd(tmp_path, f"--data.source={shakespeare}", f"--data.dir={out}")
    assert_one_error(result.returncode, result.stderr, "disk full while writing", str(out))
    assert_untouched((out, before))
    fresh = prepare_cmd(tmp_path, f"--data.source={shakespeare}", f"--data.dir={tmpfs / 'fresh'}")
    assert_one_error(fresh.returncode, fresh.stderr, "disk full while writing")
    assert not (tmpfs / "fresh").exists()  # a failed first prepare leaves nothing behind


def test_a_read_only_filesystem_still_reads_and_refuses_to_build(tmp_path, tmpfs, capsys):
    mount_tmpfs(tmpfs, "size=2m")
    source = write_corpus(tmp_path / "c.txt")
    for name in ("with_lock", "without_lock"):
        prepare(DataConfig(source=str(source)), data_dir=tmpfs / name, log=lambda _: None)
    (tmpfs / "without_lock" / ".lock").unlink()  # as prepared by a version without the lock
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for name in ("with_lock", "without_lock"):
        code, out, err = prepare_here(capsys, f"--data.source={source}", f"--data.dir={tmpfs / name}")
        assert code == 0 and "is up to date" in out, err
        code, _, err = prepare_here(
            capsys, f"--data.source={source}", f"--data.dir={tmpfs / name}", "--data.val_fraction=0.2"
        )
        assert_one_error(code, err, "the filesystem is read-only", str(tmpfs / name))
    result = prepare_cmd(tmp_path, f"--data.source={source}", f"--data.dir={tmpfs / 'new'}")
    assert_one_error(result.returncode, result.stderr, "the filesystem is read-only")


def test_an_unreadable_source_file(tmp_path, good, capsys, monkeypatch):
    source = write_corpus(tmp_path / "secret.txt")
    if os.geteuid() == 0:  # root reads whatever the mode says: inject the EACCES that chmod 000 gives anyone else
        real = open

        def deny(path, *args, **kwargs):
            if str(path) == str(source):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(prepare_mod, "open", deny, raising=False)
    else:
        source.chmod(0)
    code, _, err = prepare_here(capsys, f"--data.source={source}", f"--data.dir={good[0]}")
    assert_one_error(code, err, f"cannot read {source}: permission denied")
    assert_untouched(good)


def test_an_unreadable_folder_in_a_directory_source(tmp_path, good, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    write_corpus(corpus / "a.txt")
    write_corpus(corpus / "locked" / "b.txt")
    if os.geteuid() == 0:
        real = os.scandir

        def deny(path="."):
            if str(path) == str(corpus / "locked"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", deny)
    else:
        (corpus / "locked").chmod(0)
    code, _, err = prepare_here(capsys, f"--data.source={corpus}", f"--data.dir={good[0]}")
    assert_one_error(code, err, f"cannot read {corpus / 'locked'}: permission denied")
    assert_untouched(good)


def test_a_source_file_vanishing_between_scan_and_load(tmp_path, good, capsys, monkeypatch):
    source = write_corpus(tmp_path / "going.txt", text="gone with the wind\n")
    real = prepare_mod._scan

    def scan_then_delete(path, *args):
        result = real(path, *args)
        path.unlink()
        return result

    monkeypatch.setattr(prepare_mod, "_scan", scan_then_delete)
    code, _, err = prepare_here(capsys, f"--data.source={source}", f"--data.dir={good[0]}")
    assert_one_error(code, err, "cannot read", str(source), "run again")
    assert_untouched(good)


def test_a_source_file_changing_between_scan_and_load(tmp_path, good, capsys, monkeypatch):
    source = write_corpus(tmp_path / "moving.txt", text="the readiness is all\n")
    real = prepare_mod._scan

    def scan_then_append(path, *args):
        result = real(path, *args)
        with open(path, "a") as f:
            f.write("one more line\n")
        return result

    monkeypatch.setattr(prepare_mod, "_scan", scan_then_append)
    code, _, err = prepare_here(capsys, f"--data.source={source}", f"--data.dir={good[0]}")
    assert_one_error(code, err, f"{source} changed while it was being prepared", "run again")
    assert_untouched(good)


def test_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "notadir").write_text("precious")
    result = prepare_cmd(
        tmp_path, f"--data.source={write_corpus(tmp_path / 'c.txt')}", f"--data.dir={tmp_path / 'notadir'}"
    )
    assert_one_error(result.returncode, result.stderr, f"data.dir {tmp_path / 'notadir'} is a file, not a folder")
    assert (tmp_path / "notadir").read_text() == "precious"


def test_a_directory_of_nothing_readable(tmp_path, good):
    folder = tmp_path / "nothing"
    (folder / "empty_sub").mkdir(parents=True)
    (folder / ".hidden.txt").write_text(LINE * 40)
    (folder / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    result = prepare_cmd(tmp_path, f"--data.source={folder}", f"--data.dir={good[0]}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: data.source: {folder} holds no files to read (names starting with '.' and broken links are skipped)"
    ]
    assert f"skipping 1 links to files that do not exist: {folder / 'dangling.txt'}" in result.stdout
    assert_untouched(good)


# ----------------------------------------------------------------------------- records: missing, wrong type, empty


def test_records_without_the_text_field_are_counted_and_reported(tmp_path):
    rows = [{"text": f"record {i}: " + "to be or not to be " * 3} for i in range(30)]
    rows[4], rows[9], rows[20] = {"body": "no text field"}, {"text": None}, {"other": 1}
    result = prepare_cmd(
        tmp_path, f"--data.source={write_jsonl(tmp_path / 'r.jsonl', rows)}", f"--data.dir={tmp_path / 'out'}"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "warning: 3 of 30 records of" in result.stdout
        and "have no 'text' (or null)" in result.stdout
        and "(the first is record 5)" in result.stdout
    )
    assert "; 3 records without text" in result.stdout
    meta = load_meta(tmp_path / "out")
    assert meta["records_without_text"] == 3 and meta["empty_documents"] == 0
    assert sum(meta["tokens"].values()) == sum(len(r["text"]) for r in rows if r.get("text"))


@pytest.mark.parametrize("rows", [[{"body": "x"}] * 3, [{"text": None, "body": "x"}] * 3], ids=["absent", "all-null"])
def test_records_that_all_lack_the_text_field(rows, tmp_path, good):
    source = write_jsonl(tmp_path / "r.jsonl", rows)
    result = prepare_cmd(tmp_path, f"--data.source={source}", f"--data.dir={good[0]}")
    assert_one_error(
        result.returncode, result.stderr, f"{source} has no field 'text' (fields: body): set data.text_field"
    )
    assert_untouched(good)


@pytest.mark.parametrize(
    ("values", "what"),
    [
        ([1, 2, 3], "numbers (int64)"),
        ([1.5, 2.5], "numbers (float64)"),
        ([["a"], ["b"]], "lists"),
        ([{"a": "b"}, {"a": "c"}], "objects"),
        ([True, False], "true/false values"),
        (["a", 2, "c"], "values of mixed types"),
    ],
    ids=["int", "float", "list", "dict", "bool", "mixed"],
)
def test_a_text_field_of_the_wrong_type(values, what, tmp_path, good):
    source = write_jsonl(tmp_path / "r.jsonl", [{"text": v} for v in values])
    result = prepare_cmd(tmp_path, f"--data.source={source}", f"--data.dir={good[0]}")
    assert_one_error(
        result.returncode,
        result.stderr,
        f"{source}: field 'text' holds {what}",
        "not text: every record's 'text' must be a string",
    )
    assert_untouched(good)


def test_a_parquet_text_column_of_the_wrong_type(tmp_path, good):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"bytes", b"more"], pa.binary()), "n": [1, 2]}), tmp_path / "r.parquet")
    result = prepare_cmd(tmp_path, f"--data.source={tmp_path / 'r.parquet'}", f"--data.dir={good[0]}")
    assert_one_error(result.returncode, result.stderr, "field 'text' holds binary values, not text")
    assert_untouched(good)


def test_empty_documents_are_counted_in_the_summary_and_meta(tmp_path):
    rows = [{"text": "" if i % 5 == 0 else f"record {i}: all the world's a stage\n"} for i in range(40)]
    jsonl = prepare_cmd(
        tmp_path, f"--data.source={write_jsonl(tmp_path / 'r.jsonl', rows)}", f"--data.dir={tmp_path / 'j'}"
    )
    assert jsonl.returncode == 0 and "; 8 empty documents" in jsonl.stdout, jsonl.stderr
    meta = load_meta(tmp_path / "j")
    assert meta["empty_documents"] == 8 and meta["documents"]["val"] == 3  # chosen among the 32 documents with text
    docs = tmp_path / "docs"
    for i in range(6):
        write_corpus(docs / f"{i}.txt", lines=0 if i in (1, 4) else 30)
    text = prepare_cmd(tmp_path, f"--data.source={docs}", f"--data.dir={tmp_path / 't'}")
    assert text.returncode == 0 and "; 2 empty documents" in text.stdout, text.stderr
    assert load_meta(tmp_path / "t")["empty_documents"] == 2


# ----------------------------------------------------------------------------- sources: links, duplicates, BOM


def test_a_symlink_loop_is_walked_once(tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(5):
        write_corpus(corpus / "sub" / f"{i}.txt", text=f"document {i} " * 10 + "\n")
    (corpus / "sub" / "loop").symlink_to(corpus)
    (corpus / "sub" / "self").symlink_to(".")
    for spec in (str(corpus), f"{corpus}/**/*.txt"):
        out = tmp_path / ("dir" if spec == str(corpus) else "glob")
        result = prepare_cmd(tmp_path, f"--data.source={spec}", f"--data.dir={out}")
        assert result.returncode == 0, result.stderr
        assert "not entering 2 folder links to folders already read" in result.stdout
        meta = load_meta(out)
        assert len(meta["source"]["files"]) == 5 and meta["documents"] == {"train": 4, "val": 1}
        tok = load_tokenizer(out / "tokenizer.json")
        val, train = tok.decode(open_split(out, "val").tokens), tok.decode(open_split(out, "train").tokens)
        # each document once: no copy leaks into val
        assert sum(meta["tokens"].values()) == 5 * 40 * 111 and val not in train


@pytest.mark.parametrize("how", ["symlink", "hardlink", "glob-and-dir", "comma"])
def test_a_file_reached_twice_is_read_once(how, tmp_path):
    corpus = tmp_path / "corpus"
    for name in ("a", "b", "c"):
        write_corpus(corpus / f"{name}.txt", lines=1, text=f"{name} " * 20 + "\n")
    if how == "symlink":
        (corpus / "z.txt").symlink_to(corpus / "a.txt")
        spec, twice = str(corpus), f"{corpus / 'z.txt'} (same as {corpus / 'a.txt'})"
    elif how == "hardlink":
        os.link(corpus / "a.txt", corpus / "z.txt")
        spec, twice = str(corpus), f"{corpus / 'z.txt'} (same as {corpus / 'a.txt'})"
    elif how == "glob-and-dir":
        spec, twice = f"{corpus}/*.txt,{corpus}", str(corpus / "a.txt")
    else:
        spec, twice = (
            f"{corpus / 'a.txt'},{corpus / 'b.txt'},{corpus / 'a.txt'},{corpus / 'c.txt'}",
            str(corpus / "a.txt"),
        )
    result = prepare_cmd(tmp_path, f"--data.source={spec}", f"--data.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "warning: data.source reaches" in result.stdout and twice in result.stdout
    meta = load_meta(tmp_path / "out")
    assert sorted(Path(f["path"]).name for f in meta["source"]["files"]) == ["a.txt", "b.txt", "c.txt"]
    assert sum(meta["tokens"].values()) == 3 * 41


def test_a_utf8_bom_is_dropped_and_recorded(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + LINE.encode() * 40)
    write_corpus(tmp_path / "plain.txt")
    result = prepare_cmd(
        tmp_path, f"--data.source={tmp_path / 'bom.txt'},{tmp_path / 'plain.txt'}", f"--data.dir={tmp_path / 'out'}"
    )
    assert result.returncode == 0, result.stderr
    assert "dropping the UTF-8 byte order mark at the start of 1 file(s)" in result.stdout
    assert "\ufeff" not in load_tokenizer(tmp_path / "out" / "tokenizer.json").chars
    meta = load_meta(tmp_path / "out")
    assert [f.get("bom", False) for f in meta["source"]["files"]] == [True, False]
    assert sum(meta["tokens"].values()) == 2 * 40 * len(LINE)
