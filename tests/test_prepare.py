"""Prepare: sources, splits, dtypes, fingerprints, SFT, recipes, and bad input as a user meets it."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_script, toy_gpt2_file

import dist_gpt.prepare as prepare_mod
from dist_gpt.batches import BatchLoader, load_meta, open_split
from dist_gpt.config import Config, DataConfig
from dist_gpt.errors import UserError
from dist_gpt.io import sha256_file
from dist_gpt.prepare import prepare
from dist_gpt.stages import prepare_from_config
from dist_gpt.tokenizers import GPT2_FILE_ENV, CharTokenizer, load_tokenizer, render_prompt, render_response

ENV = {"PYTHONPATH": str(REPO)}  # the launch scripts import dist_gpt from the checkout


def quiet(_: str) -> None:
    pass


def build(source, data_dir: Path, block_size: int = 0, **data_keys) -> dict:
    """`prepare` with DataConfig(source=source, **data_keys), quietly."""
    return prepare(DataConfig(source=str(source), **data_keys), data_dir=data_dir, log=quiet, block_size=block_size)


def tokens(data_dir: Path, split: str) -> np.ndarray:
    return np.asarray(open_split(data_dir, split).tokens)


@pytest.fixture(scope="module")
def text(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_dir(shakespeare, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    build(shakespeare, out, block_size=256)
    return out


def lines_corpus(n: int, seed: int = 0) -> str:
    """Lines with awkward whitespace: blank runs, indents, trailing spaces, tabs, a missing final newline."""
    rng = random.Random(seed)
    words = ["thou", "art", "the", "king's", "0x1f", "42", "!", "--", "O", "é", "日本"]
    lines = []
    for _ in range(n):
        lead = rng.choice(["", "", "", " ", "  ", "\t", "   "])
        body = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        trail = rng.choice(["", "", "", " ", "  ", "\t"])
        lines.append(lead + body + trail)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- prepare: arrays, splits, dtypes


def test_shakespeare_char_is_the_lectures_split(char_dir, text):
    meta = load_meta(char_dir)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    assert meta["tokens"] == {"train": n, "val": len(ids) - n} == {"train": 1_003_854, "val": 111_540}
    assert np.array_equal(tokens(char_dir, "train"), ids[:n]) and np.array_equal(tokens(char_dir, "val"), ids[n:])
    assert load_tokenizer(char_dir / "tokenizer.json").chars == chars
    assert meta["source"]["files"][0]["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert {"datasets", "tokenizers", "numpy"} <= set(meta["versions"])


def test_bpe_arrays_equal_encoding_the_whole_text(shakespeare, text, tmp_path):
    meta = build(shakespeare, tmp_path / "bpe", tokenizer="bpe", vocab_size=512)
    tok = load_tokenizer(tmp_path / "bpe" / "tokenizer.json")
    assert meta["vocab_size"] == tok.vocab_size == 512
    both = np.concatenate([tokens(tmp_path / "bpe", "train"), tokens(tmp_path / "bpe", "val")])
    assert both.tolist() == tok.encode(text)
    assert meta["tokens"]["train"] == int(0.9 * len(both))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_clean_cuts_encode_like_the_whole_text(kind, tmp_path, monkeypatch):
    """Tiny map batches force many cuts through blank lines, indents and trailing spaces: ids still equal encode(whole)."""
    monkeypatch.setattr(prepare_mod, "LINES_PER_BATCH", 7)
    corpus = lines_corpus(3000)
    (tmp_path / "c.txt").write_text(corpus, encoding="utf-8")
    build(tmp_path / "c.txt", tmp_path / "out", tokenizer=kind, vocab_size=300)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    both = np.concatenate([tokens(tmp_path / "out", "train"), tokens(tmp_path / "out", "val")])
    assert both.tolist() == tok.encode(corpus)


def test_gpt2_arrays_equal_encoding_the_whole_text(tmp_path, monkeypatch):
    """tiktoken's GPT-2 regex cuts like the bpe one; a toy ranks file stands in for the real gpt2.tiktoken (no network)."""
    monkeypatch.setenv(
        GPT2_FILE_ENV, str(toy_gpt2_file(tmp_path / "gpt2.tiktoken", [b"th", b"ou", b"thou", b" thou", b"\n\n", b"  "]))
    )
    monkeypatch.setattr(prepare_mod, "LINES_PER_BATCH", 7)
    corpus = lines_corpus(2000, seed=2)
    (tmp_path / "c.txt").write_text(corpus, encoding="utf-8")
    meta = build(tmp_path / "c.txt", tmp_path / "out", tokenizer="gpt2")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert np.concatenate([tokens(tmp_path / "out", "train"), tokens(tmp_path / "out", "val")]).tolist() == tok.encode(
        corpus
    )


def test_num_proc_2_gives_the_same_arrays(tmp_path):
    (tmp_path / "c.txt").write_text(lines_corpus(20_000, seed=1), encoding="utf-8")
    one = build(tmp_path / "c.txt", tmp_path / "one", tokenizer="bpe", vocab_size=300)
    two = build(tmp_path / "c.txt", tmp_path / "two", tokenizer="bpe", vocab_size=300, num_proc=2)
    assert one["tokens"] == two["tokens"]
    for split in ("train", "val"):
        assert np.array_equal(tokens(tmp_path / "one", split), tokens(tmp_path / "two", split))


def test_split_sizes_follow_val_fraction(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghij" * 100, encoding="utf-8")
    meta = build(tmp_path / "c.txt", tmp_path / "out", val_fraction=0.25)
    assert meta["tokens"] == {"train": 750, "val": 250}
    assert len(tokens(tmp_path / "out", "val")) == 250


def test_many_documents_split_by_document_deterministically(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "x" * (50 + i) + "\n", encoding="utf-8")
    (docs / ".hidden").write_text("ignored")
    meta = build(docs, tmp_path / "a")
    again = build(docs, tmp_path / "b")
    assert meta["documents"] == {"train": 18, "val": 2} and meta["tokens"] == again["tokens"]
    assert np.array_equal(tokens(tmp_path / "a", "val"), tokens(tmp_path / "b", "val"))
    tok = load_tokenizer(tmp_path / "a" / "tokenizer.json")
    val_text = tok.decode(tokens(tmp_path / "a", "val"))
    held_out = [p.read_text() for p in sorted(docs.glob("*.txt")) if p.read_text() in val_text]
    assert len(held_out) == 2 and "".join(held_out) == val_text  # whole documents, in order
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(p.read_text()) for p in docs.glob("*.txt"))


def test_glob_and_comma_separated_sources(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"{name * 40}\n", encoding="utf-8")
    by_glob = build(str(tmp_path / "*.txt"), tmp_path / "g")
    by_list = build(f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'},{tmp_path / 'c.txt'}", tmp_path / "l")
    assert by_glob["documents"] == by_list["documents"] == {"train": 2, "val": 1}
    assert by_glob["fingerprint"] == by_list["fingerprint"]


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": f"record {i}: " + "ab" * i, "id": i} for i in range(30)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(UserError, match="no field 'text'.*data.text_field"):
        build(tmp_path / "r.jsonl", tmp_path / "j")
    from_json = build(tmp_path / "r.jsonl", tmp_path / "j", text_field="body")
    from_parquet = build(tmp_path / "r.parquet", tmp_path / "p", text_field="body")
    assert from_json["documents"] == {"train": 27, "val": 3}
    assert from_json["tokens"] == from_parquet["tokens"]
    assert sum(from_json["tokens"].values()) == sum(len(r["body"]) for r in rows)


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000 + 2048) if not 0xD800 <= c < 0xE000][:70_000]
    corpus = "".join(chars) + "\n" + "".join(reversed(chars))
    (tmp_path / "wide.txt").write_text(corpus, encoding="utf-8")
    meta = build(tmp_path / "wide.txt", tmp_path / "out")
    assert meta["vocab_size"] == 70_001 and meta["dtype"] == "uint32"
    train = open_split(tmp_path / "out", "train")
    assert train.tokens.dtype == np.uint32 and train.tokens.max() > 65_535
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert tok.decode(train.tokens) + tok.decode(tokens(tmp_path / "out", "val")) == corpus


def test_errors_replace_goes_on_past_bad_bytes(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text here\n" * 20 + b"caf\xe9\n")
    logs: list[str] = []
    meta = prepare(
        DataConfig(source=str(tmp_path / "bad.txt"), errors="replace"), data_dir=tmp_path / "out", log=logs.append
    )
    assert "\ufffd" in load_tokenizer(tmp_path / "out" / "tokenizer.json").chars
    assert any("byte" in line and "offset 303" in line for line in logs)
    assert sum(meta["tokens"].values()) == 15 * 20 + 5


# ----------------------------------------------------------------------------- prepare: fingerprints, atomicity


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("hello world\n" * 100, encoding="utf-8")
    out = tmp_path / "out"
    logs: list[str] = []
    first = prepare(DataConfig(source=str(src)), data_dir=out, log=logs.append)
    stamp = (out / "train.bin").stat().st_mtime_ns
    again = prepare(DataConfig(source=str(src)), data_dir=out, log=logs.append)
    assert "up to date" in logs[-1] and again == first and (out / "train.bin").stat().st_mtime_ns == stamp

    src.write_text("hello world\n" * 100 + "more!\n", encoding="utf-8")  # the source changed
    changed = prepare(DataConfig(source=str(src)), data_dir=out, log=logs.append)
    assert (
        "prepared" in logs[-1]
        and changed["fingerprint"] != first["fingerprint"]
        and "!" in load_tokenizer(out / "tokenizer.json").chars
    )

    setting = prepare(DataConfig(source=str(src), val_fraction=0.5), data_dir=out, log=logs.append)  # a setting changed
    assert "prepared" in logs[-1] and setting["tokens"]["val"] > changed["tokens"]["val"]

    (out / "val.bin").unlink()  # a file went missing
    prepare(DataConfig(source=str(src), val_fraction=0.5), data_dir=out, log=logs.append)
    assert "prepared" in logs[-1] and (out / "val.bin").is_file()


def folder_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the lock file (it holds the PID of the last prepare)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_interrupted_prepare_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    """Every new file is complete under a temporary name before the first rename: an interruption while writing
    leaves the old prepared folder byte for byte, and no temporary file; the next run rebuilds."""
    src = tmp_path / "c.txt"
    src.write_text("hello world\n" * 100, encoding="utf-8")
    out = tmp_path / "out"
    build(src, out)
    before = folder_hashes(out)
    src.write_text("goodbye world\n" * 100, encoding="utf-8")
    real = prepare_mod._write_split

    def crash_during_val(staged, path, *args):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        real(staged, path, *args)

    monkeypatch.setattr(prepare_mod, "_write_split", crash_during_val)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    assert folder_hashes(out) == before
    assert not [
        p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]  # no temporary files or datasets cache left
    assert len(open_split(out, "train")) == 1080  # the old data, still whole
    monkeypatch.setattr(prepare_mod, "_write_split", real)
    assert build(src, out)["tokens"]["train"] == 1260  # the next run rebuilds


def test_url_source_uses_the_download_cache_offline(shakespeare, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = "https://example.invalid/tinyshakespeare/input.txt"
    sha = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--data.source=PATH"):
        build(url, out, sha256=sha)
    (out / "download").mkdir(parents=True)
    (out / "download" / "input.txt").write_text("not the right file")
    with pytest.raises(UserError, match="--data.source=PATH"):
        build(url, out, sha256=sha)  # a cached copy with the wrong checksum does not count
    (out / "download" / "input.txt").write_bytes(shakespeare.read_bytes())
    assert build(url, out, sha256=sha)["vocab_size"] == 65


# ----------------------------------------------------------------------------- finetuning data: parent tokenizer, SFT, recipes


def test_parent_tokenizer_is_used_and_its_change_rebuilds(tmp_path):
    run = tmp_path / "run"
    CharTokenizer("abcdefgh \n").save(run / "tokenizer.json")
    (tmp_path / "c.txt").write_text("a bad cafe\n" * 50, encoding="utf-8")
    cfg = Config()
    cfg.data.source, cfg.data.dir, cfg.finetune.init_from, cfg.model.block_size = (
        str(tmp_path / "c.txt"),
        str(tmp_path / "out"),
        str(run),
        8,
    )
    logs: list[str] = []
    first = prepare_from_config(cfg, log=logs.append)
    assert (
        first["vocab_size"] == 10
        and load_tokenizer(tmp_path / "out" / "tokenizer.json").fingerprint() == first["tokenizer_fingerprint"]
    )
    CharTokenizer("abcdefgh \nxyz").save(run / "tokenizer.json")
    second = prepare_from_config(cfg, log=logs.append)
    assert "prepared" in logs[-1] and second["vocab_size"] == 13


def test_sft_mask_counts_response_tokens(text, tmp_path):
    tok = CharTokenizer(text)
    tok.save(tmp_path / "run" / "tokenizer.json")
    pairs = [
        {"prompt": "Who art thou, " + "good " * (i % 5) + "sir?", "response": "I am " + "a knave " * (i % 7)}
        for i in range(40)
    ]
    pairs[3]["split"], pairs[5]["split"] = "val", "val"
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    meta = prepare(
        DataConfig(source=str(tmp_path / "p.jsonl")), data_dir=tmp_path / "out", tokenizer=tok, sft=True, log=quiet
    )
    assert meta["sft"] and meta["documents"] == {"train": 38, "val": 2}
    train, val = open_split(tmp_path / "out", "train"), open_split(tmp_path / "out", "val")
    train_pairs = [p for p in pairs if "split" not in p]
    assert train.pairs == 38 and val.pairs == 2
    assert int(train.mask.sum()) == sum(len(tok.encode(render_response(p["response"]))) for p in train_pairs)
    first = train_pairs[0]
    start, end = train.offsets[0], train.offsets[1]
    assert tok.decode(train.tokens[start:end]) == render_prompt(first["prompt"]) + render_response(first["response"])
    assert tok.decode(train.tokens[start:end][train.mask[start:end] == 1]) == render_response(first["response"])
    assert tok.decode(val.tokens[val.offsets[0] : val.offsets[1]]).startswith(render_prompt(pairs[3]["prompt"]))

    loader = BatchLoader(train, block_size=128, batch_size=38, seed=0, mode="sequential")
    x, y = loader.next_batch()  # every train pair once, in order
    assert x.shape == y.shape == (38, 128) and loader.truncated == 0
    for i in range(38):
        s, e = train.offsets[i], train.offsets[i + 1]
        n = e - s - 1
        assert (y[i] != -100).sum() == train.mask[s:e].sum()
        assert (
            x[i, :n].tolist() == train.tokens[s : e - 1].tolist() and (x[i, n:] == 0).all() and (y[i, n:] == -100).all()
        )
    short = BatchLoader(train, block_size=16, batch_size=4, seed=0)
    assert short.truncated == 38 and short.next_batch()[0].shape == (4, 16)


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("sonnets_sft", REPO / "data" / "sonnets_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sonnets_recipe(recipe, sonnets):
    text = sonnets.read_text(encoding="utf-8")
    records = recipe.records(text)
    assert len(records) == 154
    val = [r["prompt"].split("\n")[0] for r in records if r["split"] == "val"]
    assert val == ["X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC", "C", "CX", "CXX", "CXXX", "CXL", "CL"]
    assert records[17]["prompt"] == "XVIII\nShall I compare thee to a summer's day?"
    assert records[17]["response"].startswith("Thou art more lovely and more temperate:\n")
    assert records[17]["response"].endswith("  So long lives this, and this gives life to thee.")
    assert records[127]["prompt"].startswith("CXXVIII\n")  # the file's own label is CXXXIII
    raw = (
        "The Project Gutenberg eBook of Shakespeare's Sonnets\r\nContents\r\nI\r\nII\r\n\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE'S SONNETS ***\r\n"
        + text.replace("\n", "\r\n")
        + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE'S SONNETS ***\r\nI\r\nSection 1. General Terms of Use\r\n"
    )
    assert recipe.records(raw) == records


def test_gutenberg_recipe_keeps_the_book_alone_and_the_lectures_split(tmp_path):
    book = "".join(f"line {i}: thou art\n" for i in range(200))
    raw = (
        "The Project Gutenberg eBook of X\r\nRelease date: 1998\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
        + book.replace("\n", "\r\n")
        + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nSection 1. General Terms of Use {~}\r\n"
    )
    (tmp_path / "pg.txt").write_text(raw, encoding="utf-8", newline="")
    meta = build(tmp_path / "pg.txt", tmp_path / "out", recipe="gutenberg")
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert tok.chars == sorted(set(book))  # no header, licence or carriage return characters in the vocabulary
    n = int(0.9 * len(book))  # one document: the first 90% trains, the last 10% validates
    assert meta["tokens"] == {"train": n, "val": len(book) - n}
    assert (
        tok.decode(tokens(tmp_path / "out", "train").tolist()) + tok.decode(tokens(tmp_path / "out", "val").tolist())
        == book
    )


def test_sonnets_sft_prepare_with_a_shakespeare_char_tokenizer(char_dir, sonnets, tmp_path):
    tok = load_tokenizer(char_dir / "tokenizer.json")
    cfg = DataConfig(source=str(sonnets), recipe="sonnets_sft")
    with pytest.raises(UserError, match=r"'\(', '\)'.*data.unknown"):
        prepare(cfg, data_dir=tmp_path / "out", tokenizer=tok, sft=True, log=quiet)
    assert not (tmp_path / "out").exists()
    cfg.unknown = "replace"
    logs: list[str] = []
    meta = prepare(cfg, data_dir=tmp_path / "out", tokenizer=tok, sft=True, log=logs.append, block_size=256)
    assert meta["documents"] == {"train": 139, "val": 15} and meta["unknown"]["count"] == 3
    assert any("3 characters" in line for line in logs) and any("truncated" in line for line in logs)
    val = open_split(tmp_path / "out", "val")
    assert tok.decode(val.tokens[val.offsets[0] : val.offsets[1]]).startswith(
        "PROMPT:\nX\nFor shame! deny that thou bear'st love to any,\nRESPONSE:\n"
    )


# ----------------------------------------------------------------------------- bad input, as a user meets it


def run_prepare(tmp_path: Path, *args: str, env: dict | None = None):
    out = tmp_path / "out"
    result = run_script(
        "prepare.py",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        f"--data.dir={out}",
        *args,
        cwd=tmp_path,
        env={**ENV, **(env or {})},
        timeout=120,
    )
    return result, out


def assert_one_error_line(result, out: Path, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # nothing half-written


def test_prepare_script_and_help(shakespeare, tmp_path):
    result, out = run_prepare(tmp_path, f"--data.source={shakespeare}")
    assert result.returncode == 0, result.stderr
    assert "train 1,003,854 tokens, val 111,540 tokens; vocab 65 (char), uint16" in result.stdout
    again, _ = run_prepare(tmp_path, f"--data.source={shakespeare}")
    assert "up to date" in again.stdout
    helped = run_script("prepare.py", "--help", env=ENV)
    assert (
        helped.returncode == 0
        and "--data.source" in helped.stdout
        and "usage: python launch/prepare.py" in helped.stdout
    )


def test_bad_input_missing_path(tmp_path):
    result, out = run_prepare(tmp_path, f"--data.source={tmp_path / 'nope.txt'}")
    assert_one_error_line(result, out, "no such file", "nope.txt")


def test_bad_input_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result, out = run_prepare(tmp_path, f"--data.source={tmp_path / 'empty.txt'}")
    assert_one_error_line(result, out, "empty", "empty.txt")


def test_bad_input_split_smaller_than_a_block(tmp_path):
    (tmp_path / "tiny.txt").write_text("To be, or not to be: that is the question.\n" * 5)
    result, out = run_prepare(tmp_path, f"--data.source={tmp_path / 'tiny.txt'}", "--model.block_size=64")
    assert_one_error_line(result, out, "val split has 22 tokens", "block_size + 1 = 65")


def test_bad_input_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"hello world\n" * 10 + "café\n".encode("latin-1"))
    result, out = run_prepare(tmp_path, f"--data.source={tmp_path / 'latin1.txt'}")
    assert_one_error_line(result, out, "latin1.txt", "byte offset 123", "data.errors=replace")


def test_bad_input_unknown_characters_for_a_parent_vocabulary(tmp_path):
    CharTokenizer("abcdefghijklmnopqrstuvwxyz \n").save(tmp_path / "run" / "tokenizer.json")
    (tmp_path / "new.txt").write_text("hello (world) " * 200 + "\n")
    result, out = run_prepare(
        tmp_path, f"--data.source={tmp_path / 'new.txt'}", f"--finetune.init_from={tmp_path / 'run'}"
    )
    assert_one_error_line(result, out, "'('", "')'", "data.unknown=drop", "data.unknown=replace")


def test_bad_input_url_offline_without_a_local_copy(tmp_path):
    result, out = run_prepare(tmp_path, env={"HF_HUB_OFFLINE": "1"})  # smoke.yaml names Tiny Shakespeare's URL
    assert_one_error_line(result, out, "https://raw.githubusercontent.com", "--data.source=PATH")
