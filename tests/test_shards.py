"""Sharded data: the streaming prepare, the manifest, the sample stream across shards, fetched shards, and runs on them.

The corpus: Tiny Shakespeare and the Sonnets cut into documents at blank lines, written as 4 .jsonl files and the
same 4 as parquet (Tiny Shakespeare in 3 files, the Sonnets in the 4th), prepared into shards of SHARD tokens.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, run_script, toy_gpt2_file

from dist_gpt import shards as shards_mod
from dist_gpt.batches import BatchLoader, eval_batches, open_split
from dist_gpt.config import DataConfig, load_config
from dist_gpt.errors import UserError
from dist_gpt.io import sha256_file
from dist_gpt.prepare import prepare
from dist_gpt.shards import ShardedSplit
from dist_gpt.streaming import workers_from_launcher
from dist_gpt.tokenizers import GPT2_FILE_ENV, GPT2Tokenizer, load_tokenizer

SHARD, VAL = 20_000, 20_000  # tokens per shard; the val split is the stream's first VAL tokens
BLOCK = 32


def quiet(_: str) -> None:
    pass


def sharded(source, data_dir: Path, log=quiet, **keys) -> dict | None:
    keys = {"shard_tokens": SHARD, "val_tokens": VAL, **keys}
    return prepare(DataConfig(source=str(source), **keys), data_dir=data_dir, log=log, block_size=BLOCK)


def documents(path: Path) -> list[str]:
    return [d + "\n\n" for d in path.read_text(encoding="utf-8").split("\n\n")]


@pytest.fixture(scope="module")
def corpus(shakespeare, sonnets, tmp_path_factory) -> dict:
    """{"jsonl": folder, "parquet": folder, "docs": every document in stream order}."""
    root = tmp_path_factory.mktemp("corpus")
    plays = documents(shakespeare)
    files = [plays[i * len(plays) // 3 : (i + 1) * len(plays) // 3] for i in range(3)] + [documents(sonnets)]
    for kind in ("jsonl", "parquet"):
        (root / kind).mkdir()
    for i, docs in enumerate(files):
        with open(root / "jsonl" / f"part{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d, "id": j}) + "\n" for j, d in enumerate(docs))
        pq.write_table(pa.table({"text": docs}), root / "parquet" / f"part{i}.parquet")
    return {"jsonl": root / "jsonl", "parquet": root / "parquet", "docs": [d for docs in files for d in docs]}


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory) -> Path:
    """The jsonl corpus prepared into shards (char tokenizer), one process."""
    out = tmp_path_factory.mktemp("data") / "sharded"
    sharded(corpus["jsonl"] / "*.jsonl", out)
    return out


def meta_of(d: Path) -> dict:
    return json.loads((d / "meta.json").read_text())


def stream(d: Path) -> np.ndarray:
    """val then train: the whole token stream, in input order."""
    return np.concatenate([np.asarray(open_split(d, "val").tokens), np.asarray(open_split(d, "train").tokens)])


def shard_bytes(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.glob("*.bin"))}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ----------------------------------------------------------------------------- the prepared shards and the manifest


def test_shards_hold_the_documents_in_order_and_the_manifest_describes_them(corpus, data_dir):
    meta = meta_of(data_dir)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    want = tok.encode_array("".join(corpus["docs"]))
    assert np.array_equal(stream(data_dir), want)  # nothing lost, nothing reordered, val = the stream's head
    assert meta["layout"] == "shards" and meta["tokens"] == {"train": len(want) - VAL, "val": VAL}
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(corpus["docs"])
    assert meta["tokenizer_fingerprint"] == tok.fingerprint() and meta["shard_tokens"] == SHARD
    assert [s["name"] for s in meta["shards"]["val"]] == ["val_00000_0000.bin"]
    names = [s["name"] for s in meta["shards"]["train"]]
    # 4 input files
    assert names[0] == "train_00000_0000.bin" and len(names) > 40 and len({n[6:11] for n in names}) == 4
    for s in meta["shards"]["train"]:
        assert (data_dir / s["name"]).stat().st_size == 2 * s["tokens"] and sha256_file(data_dir / s["name"]) == s[
            "sha256"
        ]
    last_of_file = {n[:11]: n for n in names}.values()  # every shard is SHARD tokens but each input file's last one
    assert all(s["tokens"] == SHARD for s in meta["shards"]["train"] if s["name"] not in last_of_file)
    assert "up to date" in "".join(log_of(lambda log: sharded(corpus["jsonl"] / "*.jsonl", data_dir, log=log)))


def log_of(fn) -> list[str]:
    lines: list[str] = []
    fn(lines.append)
    return lines


def test_parquet_with_two_tokenizing_processes_gives_the_same_shards(corpus, data_dir, tmp_path):
    out = tmp_path / "pq"
    meta = sharded(corpus["parquet"] / "*.parquet", out, num_proc=2)
    assert shard_bytes(out) == shard_bytes(data_dir)
    assert meta["shards"] == meta_of(data_dir)["shards"]


def test_the_default_layout_is_one_array_per_split(shakespeare, tmp_path):
    meta = prepare(DataConfig(source=str(shakespeare)), data_dir=tmp_path / "d", log=quiet)
    assert "layout" not in meta and "shards" not in meta
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if not p.name.startswith(".")) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    split = open_split(tmp_path / "d", "train")
    assert not split.sharded and len(split) == meta["tokens"]["train"]


def test_text_files_are_encoded_as_a_whole_in_pieces(shakespeare, sonnets, tmp_path):
    """Text files stream line by line; cut at clean line breaks, the pieces encode exactly as the whole file (BPE)."""
    out = tmp_path / "txt"
    meta = sharded(f"{shakespeare},{sonnets}", out, tokenizer="bpe", vocab_size=300)
    tok = load_tokenizer(out / "tokenizer.json")
    want = np.concatenate([tok.encode_array(p.read_text(encoding="utf-8-sig")) for p in (shakespeare, sonnets)])
    assert np.array_equal(stream(out), want)
    assert meta["documents"]["train"] + meta["documents"]["val"] == 2


# ----------------------------------------------------------------------------- stop and resume, lost shards


def test_a_stopped_prepare_resumes_after_its_last_shard(corpus, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    commit, calls = shards_mod.ShardFile.commit, [0]

    def dying_commit(self):
        calls[0] += 1
        if calls[0] == 30:  # in the second input file
            raise KeyboardInterrupt
        return commit(self)

    monkeypatch.setattr(shards_mod.ShardFile, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        sharded(corpus["jsonl"] / "*.jsonl", out)
    assert not (out / "meta.json").exists()  # an unfinished folder never looks prepared
    assert not list(out.glob(".*.tmp*"))  # the shard being written was not left behind
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.bin")}
    assert len(before) == 29

    monkeypatch.setattr(shards_mod.ShardFile, "commit", commit)
    lines = log_of(lambda log: sharded(corpus["jsonl"] / "*.jsonl", out, log=log))
    assert any("part1.jsonl: " in line and "shard(s) already written; continuing at row" in line for line in lines), (
        lines
    )
    assert not any("part0.jsonl" in line for line in lines)  # the first file was finished: not read again
    assert all((out / n).stat().st_ino == ino and (out / n).stat().st_mtime_ns == t for n, (ino, t) in before.items())
    assert shard_bytes(out) == shard_bytes(data_dir)
    got, want = meta_of(out), meta_of(data_dir)
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}


def test_a_missing_shard_is_one_error_and_prepare_rebuilds_it_alone(corpus, data_dir, tmp_path):
    d = copy_of(data_dir, tmp_path / "d")
    lost = d / "train_00002_0003.bin"
    lost.unlink()
    with pytest.raises(
        UserError, match=r"the train shard .*train_00002_0003\.bin is missing: run `python launch/prepare.py` again"
    ):
        open_split(d, "train")
    others = {p.name: p.stat().st_mtime_ns for p in d.glob("*.bin")}
    lines = log_of(lambda log: sharded(corpus["jsonl"] / "*.jsonl", d, log=log))
    assert any("part2.jsonl: 3 shard(s) already written" in line for line in lines), lines
    assert shard_bytes(d) == shard_bytes(data_dir)
    assert all(d.joinpath(n).stat().st_mtime_ns == t for n, t in others.items() if not n.startswith("train_00002"))


def test_a_corrupt_shard_is_one_error_when_read(data_dir, tmp_path):
    d = copy_of(data_dir, tmp_path / "d")
    victim = d / meta_of(d)["shards"]["train"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    split = open_split(d, "train")  # sizes are right: found when the shard is first read
    with pytest.raises(
        UserError,
        match=r"shard .*train_00000_0000\.bin is corrupt \(its size or SHA-256 differs from meta\.json's\): delete it",
    ):
        np.asarray(split.tokens[:10])


def test_two_prepare_workers_split_the_files_and_the_last_writes_the_manifest(corpus, data_dir, tmp_path):
    out = tmp_path / "two"
    base = ["--config", "configs/smoke.yaml", f"--data.source={corpus['jsonl']}/*.jsonl", f"--data.dir={out}"]
    base += [f"--data.shard_tokens={SHARD}", f"--data.val_tokens={VAL}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "launch/prepare.py", *base, f"--data.prepare_rank={r}", "--data.prepare_world=2"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(f"prepared {out} in" in o for o in outputs) == 1, outputs  # exactly one worker wrote meta.json
    # files 0, 2 and 1, 3
    assert "part0.jsonl" in outputs[0] and "part2.jsonl" in outputs[0] and "part1.jsonl" not in outputs[0]
    assert "part1.jsonl" in outputs[1] and "part3.jsonl" in outputs[1] and "part0.jsonl" not in outputs[1]
    assert shard_bytes(out) == shard_bytes(data_dir) and meta_of(out)["shards"] == meta_of(data_dir)["shards"]


# ----------------------------------------------------------------------------- the sample stream across shards


@pytest.fixture(scope="module")
def train(data_dir) -> ShardedSplit:
    return open_split(data_dir, "train")


def take(loader: BatchLoader, n: int) -> torch.Tensor:
    return torch.cat([loader.next_batch()[0] for _ in range(n)])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_one_global_stream_across_shards_on_any_world_size(train, mode):
    windows = BatchLoader(train, BLOCK, 8, seed=3, mode=mode)._sampler.windows
    n = int(windows.windows[windows.order(0)[0][0]])  # samples in the first shard read: batches cross into the next one
    steps = n // 8 + 2
    one = take(BatchLoader(train, BLOCK, 8, seed=3, mode=mode), steps)
    halves = take(BatchLoader(train, BLOCK, 4, seed=3, mode=mode), 2 * steps)
    ranks = [BatchLoader(train, BLOCK, 4, seed=3, rank=r, world_size=2, mode=mode) for r in range(2)]
    two = torch.cat([torch.cat([r.next_batch()[0] for r in ranks]) for _ in range(steps)])
    assert torch.equal(one, halves) and torch.equal(one, two)
    shards, _ = windows.locate(np.arange(steps * 8))
    assert len(set(shards.tolist())) >= 2


def test_resume_is_exact_across_a_shard_boundary_with_another_world_size(train):
    ref = BatchLoader(train, BLOCK, 6, seed=5)
    boundary = int(ref._sampler.windows.order(0)[1][1])  # samples in the first shard read
    before, after = boundary // 6, 40  # steps of 6 samples: the first step after the resume reaches the next shard
    want = take(ref, before + after)
    first = [BatchLoader(train, BLOCK, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    got = [torch.cat([r.next_batch()[0] for r in first]) for _ in range(before)]
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["position"] == 6 * before
    later = [
        BatchLoader(train, BLOCK, 2, seed=5, rank=r, world_size=3) for r in range(3)
    ]  # the checkpoint resumed on 3 processes
    for r in later:
        r.load_state_dict(json.loads(json.dumps(state)))
    got += [torch.cat([r.next_batch()[0] for r in later]) for _ in range(after)]
    assert torch.equal(torch.cat(got), want)
    shards, _ = ref._sampler.windows.locate(np.arange(6 * before - 6, 6 * before + 6))
    assert len(set(shards.tolist())) == 2  # the resume point is at a shard boundary


def test_random_windows_read_each_shard_once_per_epoch_in_a_seeded_order(train):
    w = BatchLoader(train, BLOCK, 8, seed=1)._sampler.windows
    epoch = np.arange(w.per_epoch)
    shards, starts = w.locate(epoch)
    assert w.per_epoch == int(((train.sizes - 1) // BLOCK).sum())
    runs = shards[np.r_[0, np.flatnonzero(np.diff(shards)) + 1]]
    assert sorted(runs.tolist()) == list(range(len(train.shards)))  # one shard after another, each once
    assert runs.tolist() != list(range(len(train.shards)))  # in a shuffled order
    for s in range(len(train.shards)):
        mine = np.sort(starts[shards == s])
        assert len(mine) == w.windows[s] and np.all(np.diff(mine) == BLOCK)  # every window once, none overlapping
        assert mine[0] >= 0 and mine[-1] + BLOCK + 1 <= train.sizes[s]  # never past the shard's end
    again, _ = w.locate(epoch + w.per_epoch)
    assert not np.array_equal(again, shards)  # the next epoch reads the shards in another order
    x, y = BatchLoader(train, BLOCK, 8, seed=1).next_batch()
    s0, st0 = w.locate(np.arange(8))
    # a window is block_size + 1 consecutive tokens of one shard
    for row_x, row_y, s, st in zip(x, y, s0, st0, strict=True):
        tokens = np.asarray(train.array(int(s))[st : st + BLOCK + 1]).astype(np.int64)
        assert torch.equal(row_x, torch.from_numpy(tokens[:-1])) and torch.equal(row_y, torch.from_numpy(tokens[1:]))


def test_sequential_mode_and_evaluation_read_in_order(data_dir, train):
    x = take(BatchLoader(train, BLOCK, 4, seed=1, mode="sequential"), 2)
    flat = np.asarray(train.tokens[: 8 * BLOCK]).astype(np.int64)
    assert torch.equal(x, torch.from_numpy(flat.reshape(8, BLOCK)))
    val = open_split(data_dir, "val")
    batches = list(eval_batches(val, BLOCK, 4, 3, seed=9))
    assert torch.equal(
        torch.cat([b[0] for b in batches]),
        torch.from_numpy(np.asarray(val.tokens[: 12 * BLOCK]).astype(np.int64).reshape(12, BLOCK)),
    )
    ranks = [list(eval_batches(val, BLOCK, 4, 3, seed=9, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(ranks[0][1][0], batches[2][0]) and torch.equal(ranks[1][0][0], batches[1][0])


def test_the_split_reads_as_one_token_sequence(data_dir, train):
    """What the evaluator reads: the shards as one sequence, sliced and indexed across shard boundaries."""
    whole = np.concatenate([np.fromfile(data_dir / s.name, dtype=np.uint16) for s in train.shards])
    tokens = train.tokens
    assert len(tokens) == len(whole) == len(train)
    edge = int(train.starts[3])
    assert np.array_equal(tokens[edge - 5 : edge + 5], whole[edge - 5 : edge + 5]) and tokens[-1] == whole[-1]
    idx = np.array([[0, edge - 1], [edge, len(whole) - 1]])
    assert np.array_equal(tokens[idx], whole[idx])
    with pytest.raises(IndexError):
        tokens[len(whole)]


def test_a_shard_shorter_than_a_window_is_one_error(corpus, tmp_path):
    with pytest.raises(UserError, match=r"data\.shard_tokens=20 is smaller than block_size \+ 1 = 33"):
        sharded(corpus["jsonl"] / "*.jsonl", tmp_path / "d", shard_tokens=20)


# ----------------------------------------------------------------------------- shards from elsewhere


class Server:
    """A folder served over HTTP from a thread, counting the requests per path."""

    def __init__(self, folder: Path):
        counts: dict[str, int] = {}

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                counts[self.path] = counts.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.counts = counts
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(data_dir, tmp_path):
    folder = copy_of(data_dir, tmp_path / "served")
    server = Server(folder)
    yield folder, server
    server.close()


def disk_use(folder: Path) -> int:
    """Bytes of the shards in `folder` (the prefetch thread may delete one while they are counted)."""
    total = 0
    for p in folder.glob("*.bin"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def test_shards_at_a_url_are_fetched_ahead_and_deleted_behind_within_the_disk_budget(data_dir, served, tmp_path):
    folder, server = served
    local = tmp_path / "local"
    cfg = DataConfig(source=f"{server.url}/meta.json", disk_budget_gb=5 * 2 * SHARD / 1e9, prefetch_shards=2)
    meta = prepare(cfg, data_dir=local, log=quiet, block_size=BLOCK)
    assert meta["base"] == f"{server.url}/" and meta["fingerprint"] == meta_of(data_dir)["fingerprint"]
    assert not list(local.glob("*.bin"))  # nothing fetched before it is needed
    remote, here = (
        BatchLoader(open_split(local, "train", cfg), BLOCK, 64, seed=2),
        BatchLoader(open_split(data_dir, "train"), BLOCK, 64, seed=2),
    )
    most = 0
    for _ in range(60):  # 3,840 windows: about 6 shards
        assert torch.equal(remote.next_batch()[0], here.next_batch()[0])
        most = max(most, disk_use(local))
    assert most <= 5 * 2 * SHARD  # the budget held
    fetched = [k for k in server.counts if k.startswith("/train_")]
    # each fetched once
    assert len(fetched) >= 6 and all(v == 1 for k, v in server.counts.items() if k.startswith("/train_"))
    assert "up to date" in "".join(log_of(lambda log: prepare(cfg, data_dir=local, log=log, block_size=BLOCK)))


def test_a_corrupt_download_is_retried_then_one_error(served, tmp_path, monkeypatch):
    folder, server = served
    monkeypatch.setattr(shards_mod, "FETCH_BACKOFF_S", 0.01)
    name = meta_of(folder)["shards"]["train"][3]["name"]
    data = bytearray((folder / name).read_bytes())
    data[7] ^= 1
    (folder / name).write_bytes(bytes(data))
    prepare(DataConfig(source=f"{server.url}/meta.json"), data_dir=tmp_path / "local", log=quiet, block_size=BLOCK)
    split = open_split(tmp_path / "local", "train")
    with pytest.raises(
        UserError,
        match=rf"could not fetch shard {name} from {server.url}/{name} after 4 tries \(last: got 40,000 bytes with SHA-256",
    ):
        split.array(3)
    assert server.counts[f"/{name}"] == 4 and not (tmp_path / "local" / name).exists()


def test_a_shard_missing_on_the_server_is_one_error(served, tmp_path):
    folder, server = served
    name = meta_of(folder)["shards"]["train"][5]["name"]
    (folder / name).unlink()
    prepare(DataConfig(source=f"{server.url}/meta.json"), data_dir=tmp_path / "local", log=quiet, block_size=BLOCK)
    with pytest.raises(UserError, match=rf"shard {name} is missing at {server.url}/{name} \(HTTP 404 File not found\)"):
        open_split(tmp_path / "local", "train").array(5)
    assert server.counts[f"/{name}"] == 1  # not retried: the server says it has no such file


def test_a_file_url_copies_and_a_path_reads_in_place(data_dir, tmp_path):
    copied, in_place = tmp_path / "copied", tmp_path / "in_place"
    prepare(DataConfig(source=(data_dir / "meta.json").as_uri()), data_dir=copied, log=quiet, block_size=BLOCK)
    prepare(DataConfig(source=str(data_dir / "meta.json")), data_dir=in_place, log=quiet, block_size=BLOCK)
    assert np.array_equal(stream(copied), stream(data_dir)) and np.array_equal(stream(in_place), stream(data_dir))
    assert len(list(copied.glob("*.bin"))) == len(list(data_dir.glob("*.bin")))
    assert not list(in_place.glob("*.bin"))  # read from data_dir itself
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"format": 2, "tokens": {"train": 5}}')
    with pytest.raises(
        UserError, match=r"data\.source .*other/meta\.json is not the meta\.json of a sharded dist_gpt folder"
    ):
        prepare(DataConfig(source=str(tmp_path / "other" / "meta.json")), data_dir=tmp_path / "bad", log=quiet)


def test_a_manifest_may_give_each_shard_its_own_url(data_dir, tmp_path):
    listed = tmp_path / "listed"
    listed.mkdir()
    meta = meta_of(data_dir)
    for split in ("train", "val"):
        for s in meta["shards"][split]:
            s["url"] = (data_dir / s["name"]).as_uri()
    (listed / "meta.json").write_text(json.dumps(meta))
    shutil.copy(data_dir / "tokenizer.json", listed)
    local = tmp_path / "local"
    prepare(DataConfig(source=str(listed / "meta.json")), data_dir=local, log=quiet, block_size=BLOCK)
    assert np.array_equal(np.asarray(open_split(local, "val").tokens), np.asarray(open_split(data_dir, "val").tokens))
    assert [p.name for p in local.glob("*.bin")] == ["val_00000_0000.bin"]  # fetched from its url into the data folder


# ----------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"val_tokens": 0}, r"sharded data needs data\.val_tokens > 0"),
        ({"eot": True}, r"data\.eot needs the gpt2 tokenizer .* the char tokenizer has no end-of-text token"),
        ({"val_tokens": 10**9}, r"data\.val_tokens=1,000,000,000 but the first input file holds only [\d,]+ tokens"),
        ({"recipe": "gutenberg"}, r"data\.recipe works on the single-array layout"),
    ],
)
def test_sharded_settings_that_cannot_work_are_one_error(corpus, tmp_path, keys, message):
    with pytest.raises(UserError, match=message):
        sharded(corpus["jsonl"] / "part3.jsonl", tmp_path / "d", **keys)
    assert not (tmp_path / "d" / "meta.json").exists()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [{"body": "no text field"}],
            r"the corpus is empty: .*bad\.jsonl: no record has a 'text' field with text \(set data\.text_field\)",
        ),
        ([{"text": "fine"}, {"text": 5}], r"bad\.jsonl: field 'text' holds int values, not text"),
    ],
)
def test_records_without_text_are_one_error(tmp_path, records, message):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match=message):
        sharded(tmp_path / "bad.jsonl", tmp_path / "d", val_tokens=1, shard_tokens=100)


def test_workers_come_from_torchrun_unless_the_command_names_them(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    cfg = load_config(None, ["--data.shard_tokens=1000"], "prepare")
    workers_from_launcher(cfg)
    assert (cfg.data.prepare_rank, cfg.data.prepare_world) == (3, 4)
    cfg = load_config(None, ["--data.shard_tokens=1000", "--data.prepare_world=2"], "prepare")
    workers_from_launcher(cfg)
    assert (cfg.data.prepare_rank, cfg.data.prepare_world) == (0, 2)


def test_a_changed_input_file_rebuilds(corpus, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(corpus["jsonl"], src)
    d = tmp_path / "d"
    first = sharded(src / "*.jsonl", d)
    with open(src / "part3.jsonl", "a") as f:
        f.write(json.dumps({"text": "A new sonnet.\n"}) + "\n")
    lines = log_of(lambda log: sharded(src / "*.jsonl", d, log=log))
    assert any(line.startswith(f"prepared {d}") for line in lines)
    assert meta_of(d)["tokens"]["train"] == first["tokens"]["train"] + len("A new sonnet.\n")


def test_prepare_world_belongs_to_launch_prepare(tmp_path):
    with pytest.raises(
        UserError, match=r"data\.prepare_world > 1 splits a sharded prepare over several launch/prepare\.py workers"
    ):
        load_config(None, ["--data.prepare_world=2"], "pretrain")
    with pytest.raises(UserError, match=r"data\.prepare_rank must be in \[0, data\.prepare_world = 2\), got 2"):
        load_config(None, ["--data.prepare_world=2", "--data.prepare_rank=2"], "prepare")


# ----------------------------------------------------------------------------- the FineWeb recipe on local files


@pytest.fixture(scope="module")
def fineweb_like(corpus, tmp_path_factory) -> dict:
    """FineWeb's shape offline: parquet files with a text column, and a toy GPT-2 ranks file standing in for tiktoken's."""
    root = tmp_path_factory.mktemp("fineweb")
    for i, p in enumerate(sorted(corpus["parquet"].glob("*.parquet"))):
        shutil.copy(p, root / f"00{i}_00000.parquet")
    ranks = toy_gpt2_file(root / "gpt2.tiktoken", [b"th", b"e ", b"the", b"an", b"in", b"\n\n"])
    return {"source": f"{root}/*.parquet", "env": {GPT2_FILE_ENV: str(ranks)}}


def test_fineweb_recipe_offline_is_one_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "data/fineweb.py", f"--data.dir={tmp_path / 'fw'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "error: data.source 'HuggingFaceFW/fineweb:sample-10BT' is not a local file or directory, and reading it as a Hugging Face "
        "dataset needs the network (HF_HUB_OFFLINE is set): pass --data.source=PATH to a local copy"
    )


def test_gpt2_decode_skips_the_padded_vocabulary(fineweb_like, monkeypatch):
    """The recipes pad the GPT-2 vocabulary to 50304 rows; an id the model samples there decodes to nothing, not a crash."""
    monkeypatch.setenv(GPT2_FILE_ENV, fineweb_like["env"][GPT2_FILE_ENV])
    tok = GPT2Tokenizer()
    assert tok.decode([104, 50256, 50300, 105]) == "h<|endoftext|>i"


@pytest.mark.slow
def test_fineweb_recipe_and_its_training_config_on_local_shards(corpus, fineweb_like, tmp_path):
    """data/fineweb.py on local parquet files, then configs/gpt2_124m_fineweb.yaml's code path with a tiny model on CPU."""
    d, env = tmp_path / "fineweb", {**fineweb_like["env"], "PYTHONPATH": str(REPO)}
    data = [
        f"--data.source={fineweb_like['source']}",
        f"--data.dir={d}",
        "--data.shard_tokens=50000",
        "--data.val_tokens=20001",
        "--data.num_proc=1",
    ]
    out = subprocess.run(
        [sys.executable, "data/fineweb.py", *data],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr + out.stdout
    meta = meta_of(d)
    assert meta["tokenizer"] == "gpt2" and meta["eot_id"] == 50256 and meta["tokens"]["val"] == 20001
    ids = stream(d)
    starts = np.flatnonzero(ids == 50256)
    assert len(starts) == len(corpus["docs"]) and starts[0] == 0  # <|endoftext|> before every document

    tiny = [
        "--model.n_layer=2",
        "--model.n_head=2",
        "--model.n_embd=32",
        "--model.block_size=64",
        "--train.batch_size=4",
    ]
    tiny += [
        "--train.tokens_per_step=512",
        "--train.max_steps=8",
        "--train.warmup_steps=2",
        "--train.eval_interval=4",
        "--train.eval_iters=2",
    ]
    tiny += [
        "--train.checkpoint_interval=4",
        "--train.compile=false",
        "--train.mixed_precision=no",
        "--log.wandb=false",
        "--log.progress=false",
    ]
    tiny += ["--train.sample_tokens=0"]  # the toy ranks file has ids 262..50255 missing: a sample would name them
    run_dir = tmp_path / "run"
    args = ["--config", "configs/gpt2_124m_fineweb.yaml", *data, f"--run.out_dir={run_dir}", *tiny]
    out = run_script("pretrain.py", *args, env=env)
    assert out.returncode == 0, out.stderr
    assert (
        "tokens per optimizer step: 4 (micro-batch) x 64 (block) x 2 (accumulation) x 1 (processes) = 512" in out.stderr
    )
    assert f"{d} is up to date" in out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4, 8] and all(
        np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r
    )
    out = run_script("evaluate.py", "--run", str(run_dir), "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == 20000  # the val split's 20,001 tokens: every target once


# ----------------------------------------------------------------------------- 2 processes, SIGKILL, resume across a shard boundary


@pytest.mark.slow
def test_two_process_run_killed_and_rerun_across_a_shard_boundary_is_bit_identical(corpus, tmp_path):
    from test_resume import STEPS, Running, assert_same_run, last_logged_step, pretrain_cmd, run

    from dist_gpt.checkpoint import find_resumable

    d = tmp_path / "data"
    # 31 windows per shard, 16 per step: a boundary every 2 steps
    sharded(corpus["jsonl"] / "*.jsonl", d, shard_tokens=1000, val_tokens=2000)
    extra = ["--data.shard_tokens=1000", "--data.val_tokens=2000", f"--data.source={corpus['jsonl']}/*.jsonl"]
    reference = tmp_path / "ref"
    out = run(pretrain_cmd(reference, d, 2, *extra))
    assert out.returncode == 0, out.stderr
    assert f"{d} is up to date" in out.stderr and "weights identical on all 2 ranks" in out.stderr

    run_dir = tmp_path / "run"
    killed = Running(pretrain_cmd(run_dir, d, 2, *extra), tmp_path)
    killed.wait_for_step(run_dir, 14)
    killed.signal(signal.SIGKILL, tree=True)
    killed.wait()
    assert last_logged_step(run_dir) < STEPS
    resume_step = int(find_resumable(run_dir / "checkpoints", pytest.fail).name[5:])
    out = run(pretrain_cmd(run_dir, d, 2, *extra))
    assert out.returncode == 0, out.stderr
    assert "resuming from" in out.stderr
    assert_same_run(run_dir, reference)

    # the samples the resumed run trained on (16 per step)
    loader = BatchLoader(open_split(d, "train"), 32, 8, seed=1337)
    shards, _ = loader._sampler.windows.locate(np.arange(16 * resume_step, 16 * STEPS))
    assert len(set(shards.tolist())) >= 2  # they cross at least one shard boundary
