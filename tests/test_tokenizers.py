"""Tokenizers: round trips, the char vocabulary, unknown characters, JSON save/load, to_hf, gpt2 offline."""

from __future__ import annotations

import json

import pytest
from conftest import toy_gpt2_file

from dist_gpt.errors import UserError
from dist_gpt.tokenizers import GPT2_FILE_ENV, CharTokenizer, load_tokenizer, train_tokenizer

ODD = "Ünïcödé ✓ 日本語 — tabs\tand\r\nCRLF, emoji 🙂, trailing spaces   \n\n\n  indented"


@pytest.fixture(scope="module")
def text(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char(text) -> CharTokenizer:
    return train_tokenizer("char", [text], vocab_size=0)


@pytest.fixture(scope="module")
def bpe(text):
    return train_tokenizer("bpe", [text[i : i + 100_000] for i in range(0, len(text), 100_000)], vocab_size=1024)


def test_char_vocabulary_is_the_lectures(char, text):
    assert char.kind == "char" and char.vocab_size == 65
    assert char.chars == sorted(set(text))
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert char.encode(text[:5000]) == [stoi[c] for c in text[:5000]]
    assert char.decode(char.encode(text)) == text
    assert char.encode_array(text).tolist() == char.encode(text)


def test_bpe_round_trip(bpe, text):
    assert bpe.kind == "bpe" and bpe.vocab_size == 1024
    ids = bpe.encode(text)
    assert len(ids) < len(text) / 2  # merges happened
    assert bpe.decode(ids) == text
    assert bpe.decode(bpe.encode(ODD)) == ODD  # byte-level: any text, no unknowns
    assert bpe.encode_batch(["To be", ODD]) == [bpe.encode("To be"), bpe.encode(ODD)]


def test_char_unknown_characters(char):
    with pytest.raises(UserError) as e:
        char.encode("a(b)c")
    message = str(e.value)
    assert "'('" in message and "')'" in message and "data.unknown" in message
    assert char.encode("a(b)c", unknown="drop") == char.encode("abc")
    assert char.replacement == " "
    assert char.encode("a(b)c", unknown="replace") == char.encode("a b c")
    assert char.count_unknown("a(b)c((") == 4
    assert char.missing("a(b)c((") == ["(", ")"]
    assert CharTokenizer("xyz").replacement == "x"  # no space in the vocabulary: its first character


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(kind, char, bpe, tmp_path, text):
    tok = char if kind == "char" else bpe
    tok.save(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["kind"] == kind and data["vocab_size"] == tok.vocab_size
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(text[:20_000]) == tok.encode(text[:20_000])


def test_fingerprint_tells_vocabularies_apart():
    assert CharTokenizer("abc").fingerprint() == CharTokenizer("cba").fingerprint()
    assert CharTokenizer("abc").fingerprint() != CharTokenizer("abd").fingerprint()


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(UserError, match="not found.*nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"format": "dist_gpt.tokenizer", "version": 1, "kind": "char"}))
    with pytest.raises(UserError, match="bad.json is corrupt"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a dist_gpt tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        train_tokenizer("words", ["a"], 0)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_to_hf_encodes_and_decodes_identically(kind, char, bpe, text):
    tok = char if kind == "char" else bpe
    hf = tok.to_hf()
    sample = text[:50_000]
    ids = hf.encode(sample).ids
    assert ids == tok.encode(sample)
    assert hf.decode(ids) == sample == tok.decode(ids)
    assert hf.get_vocab_size() == tok.vocab_size


def test_gpt2_offline_says_how_to_supply_the_files(monkeypatch, tmp_path):
    import tiktoken

    def no_network(name):
        raise ConnectionError("no network")

    monkeypatch.delenv(GPT2_FILE_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(UserError) as e:
        train_tokenizer("gpt2", [], 0)
    assert (
        "could not be downloaded" in str(e.value)
        and "TIKTOKEN_CACHE_DIR" in str(e.value)
        and GPT2_FILE_ENV in str(e.value)
    )
    monkeypatch.setenv(GPT2_FILE_ENV, str(tmp_path / "missing.tiktoken"))
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer("gpt2", [], 0)


def test_gpt2_from_a_local_tiktoken_file(monkeypatch, tmp_path):
    """A toy ranks file in the gpt2.tiktoken format stands in for the real one (no network here)."""
    monkeypatch.setenv(GPT2_FILE_ENV, str(toy_gpt2_file(tmp_path / "gpt2.tiktoken", [b"th", b"the", b" the", b"e\n"])))
    tok = train_tokenizer("gpt2", [], 0)
    assert tok.kind == "gpt2" and tok.vocab_size == 50257  # <|endoftext|> is id 50256
    ids = tok.encode("the the\n")
    assert ids == [257, 258, ord("\n")]  # "the", " the", "\n": GPT-2's pre-tokenizer, then the toy merges
    assert tok.decode(tok.encode(ODD)) == ODD
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(ODD) == tok.encode(ODD)
    with pytest.raises(UserError, match="transformers"):
        tok.to_hf()
