"""Tokenizers behind one small interface: `char`, `bpe` and `gpt2`.

    tok = train_tokenizer("char", [text], vocab_size=0)   # or "bpe" (vocab_size merges target), "gpt2"
    ids = tok.encode("To be"); assert tok.decode(ids) == "To be"
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")

- `char`: one token per character; the vocabulary is the sorted set of the corpus's characters
  (the lecture's `stoi`/`itos`). Characters outside it are an error, or dropped, or replaced by
  `CharTokenizer.replacement` (a space), as `unknown=` says.
- `bpe`: byte-level BPE trained on the corpus with Hugging Face `tokenizers` (GPT-2's pre-tokenizer
  regex, no prefix space, so any text round-trips exactly).
- `gpt2`: tiktoken's GPT-2 encoding (50257 ids). Its files are downloaded on first use and cached in
  TIKTOKEN_CACHE_DIR. Offline, either pre-seed that cache, or point DIST_GPT_GPT2_TIKTOKEN at a
  `gpt2.tiktoken` file (the one in openai-whisper's `whisper/assets/`).

A tokenizer is saved as JSON: `{"format": "dist_gpt.tokenizer", "version": 1, "kind": ..., ...}`.
`to_hf()` gives an equivalent Hugging Face `tokenizers.Tokenizer` (for the export to transformers).

The chat template of SFT data lives here too: `render_prompt(p) + render_response(r)` is what a
prompt/response pair looks like to the model (prepare encodes it, `sample.py --chat` feeds the prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers as hf

from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write_json, read_json

FORMAT = "dist_gpt.tokenizer"
VERSION = 1
KINDS = ("char", "bpe", "gpt2")
UNKNOWN_MODES = ("error", "drop", "replace")
GPT2_FILE_ENV = "DIST_GPT_GPT2_TIKTOKEN"

PROMPT_TEMPLATE = "PROMPT:\n{prompt}\nRESPONSE:\n"  # masked: no loss on these tokens
RESPONSE_TEMPLATE = "{response}\n\n"  # trained: the model learns to answer and to stop
RESPONSE_END = "\n\n"  # what ends a response when sampling in chat mode


def render_prompt(prompt: str) -> str:
    """What the model sees before a response (also what the sampler's chat mode feeds it)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def render_response(response: str) -> str:
    return RESPONSE_TEMPLATE.format(response=response)


class Tokenizer:
    """The interface every tokenizer implements. Ids are ints in [0, vocab_size)."""

    kind: str = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        """`encode` as a numpy array, the data pipeline's fast path (`unknown` matters only for `char`)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_hf(self) -> hf.Tokenizer:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {"format": FORMAT, "version": VERSION, **self.to_dict()})

    def fingerprint(self) -> str:
        """SHA-256 of the saved form: equal fingerprints encode identically."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """The lecture's character-level tokenizer: id = position of the character in the sorted vocabulary."""

    kind = "char"
    _UNKNOWN = np.iinfo(np.uint32).max  # marks codepoints outside the vocabulary in the lookup table

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise UserError("a char vocabulary needs at least one character, each a single character")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._table: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def replacement(self) -> str:
        """What `unknown="replace"` writes for a character outside the vocabulary: a space, else the first character."""
        return " " if " " in self.stoi else self.chars[0]

    def _lookup(self, text: str) -> np.ndarray:
        """Ids of `text` (uint32), with `_UNKNOWN` for characters outside the vocabulary."""
        if self._table is None:  # one entry per Unicode codepoint: 4.4 MB, built on first use
            self._table = np.full(0x110000, self._UNKNOWN, dtype=np.uint32)
            self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.uint32)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return self._table[codes]

    def missing(self, text: str | Iterable[str]) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary, sorted."""
        return sorted(c for c in set(text) if c not in self.stoi)

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` are outside the vocabulary (what `drop`/`replace` would change)."""
        return int(np.count_nonzero(self._lookup(text) == self._UNKNOWN))

    def unknown_error(self, missing: Sequence[str]) -> UserError:
        shown = ", ".join(repr(c) for c in missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        return UserError(
            f"{len(missing)} character(s) are not in the char tokenizer's vocabulary: {shown}; "
            f"set data.unknown=drop to remove them or data.unknown=replace to write {self.replacement!r} instead"
        )

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        ids = self._lookup(text)
        bad = ids == self._UNKNOWN
        if bad.any():
            if unknown == "drop":
                ids = ids[~bad]
            elif unknown == "replace":
                ids[bad] = self.stoi[self.replacement]
            else:
                raise self.unknown_error(self.missing(text))
        return ids

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        return self.encode_array(text, unknown).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "chars": "".join(self.chars)}

    def to_hf(self) -> hf.Tokenizer:
        """WordLevel over single characters, split one per character and fused back on decode.

        Characters outside the vocabulary become `replacement` (like `unknown="replace"`).
        """
        tok = hf.Tokenizer(hf.models.WordLevel(dict(self.stoi), unk_token=self.replacement))
        tok.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = hf.decoders.Fuse()
        return tok


# ----------------------------------------------------------------------------- bpe


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Hugging Face `tokenizers`), trained on the corpus."""

    kind = "bpe"

    def __init__(self, tok: hf.Tokenizer):
        self.hf = tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        tok = hf.Tokenizer(hf.models.BPE())
        # GPT-2's regex, no prefix space: pieces of a text cut at a clean line break encode like the whole (see prepare.py)
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode_batch_fast([text])[0].ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts))]

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "tokenizer": json.loads(self.hf.to_str())}

    def to_hf(self) -> hf.Tokenizer:
        return hf.Tokenizer.from_str(self.hf.to_str())


# ----------------------------------------------------------------------------- gpt2


def _gpt2_encoding() -> Any:
    """tiktoken's GPT-2 encoding, from DIST_GPT_GPT2_TIKTOKEN or tiktoken's own download/cache."""
    import tiktoken

    how = (
        f"pre-seed TIKTOKEN_CACHE_DIR with tiktoken's cached GPT-2 files, or set {GPT2_FILE_ENV}=/path/to/gpt2.tiktoken "
        "(whisper/assets/gpt2.tiktoken in the openai-whisper sdist)"
    )
    path = os.environ.get(GPT2_FILE_ENV)
    if path:
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

        if not Path(path).is_file():
            raise UserError(f"{GPT2_FILE_ENV} names a file that does not exist: {path}")
        try:
            ranks = load_tiktoken_bpe(path)
        except (ValueError, OSError) as e:
            raise UserError(f"{GPT2_FILE_ENV}={path} is not a tiktoken BPE file ({e}); {how}") from None
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, a bad cache: anything here means "no files"
        raise UserError(f"the tiktoken GPT-2 files could not be downloaded ({type(e).__name__}); {how}") from None


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE through tiktoken (ordinary text: `<|endoftext|>` in the text is not special)."""

    kind = "gpt2"

    def __init__(self) -> None:
        self.enc = _gpt2_encoding()

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts))

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids past the vocabulary (a model's padded rows, e.g. 50304) have no text and are skipped."""
        return self.enc.decode([int(i) for i in ids if int(i) < self.enc.n_vocab])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    def to_hf(self) -> hf.Tokenizer:
        raise UserError(
            "the gpt2 tokenizer has no tokenizers-library form here: use transformers' own GPT-2 tokenizer ('gpt2'), which encodes identically"
        )


# ----------------------------------------------------------------------------- building and loading


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer for `texts`: `char` collects the characters, `bpe` learns `vocab_size` ids, `gpt2` ignores them."""
    if kind == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise UserError("cannot build a char vocabulary from an empty corpus")
        return CharTokenizer(chars)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer kind {kind!r}: one of {', '.join(KINDS)}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved by `Tokenizer.save`; a missing or corrupt file is a UserError naming it."""
    path = Path(path)
    data = read_json(path, "tokenizer file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f'{path} is not a dist_gpt tokenizer file (no "format": "{FORMAT}")')
    kind = data.get("kind")
    try:
        if kind == "char":
            return CharTokenizer(data["chars"])
        if kind == "bpe":
            return BPETokenizer(hf.Tokenizer.from_str(json.dumps(data["tokenizer"])))
        if kind == "gpt2":
            return GPT2Tokenizer()
    except UserError:
        raise
    except Exception as e:  # a missing key, or tokenizers' parse error (a plain Exception)
        raise UserError(f"tokenizer file {path} is corrupt ({type(e).__name__}: {e})") from None
    raise UserError(f"tokenizer file {path} has unknown kind {kind!r}: one of {', '.join(KINDS)}")
