"""Prepare: a text source -> token arrays on disk (read back by batches.py).

    meta = prepare(cfg.data, data_dir=Path("data/shakespeare_char"))  # builds the arrays, or says "up to date"

A prepared folder holds `train.bin`, `val.bin` (raw token ids, dtype from meta), `tokenizer.json` and
`meta.json`; SFT data adds `SPLIT.mask.bin` (uint8, 1 = a response token) and `SPLIT.idx.bin` (int64
start offsets of the pairs, plus the end). Every file is written to a temporary name and renamed, and
meta.json is removed before a rebuild and written last, so arrays without a matching meta.json never count.

The source (text files, a directory, a glob, .jsonl, .parquet, a URL, a Hub name) is read with
`datasets.load_dataset`, tokenized with `Dataset.map(batched=True, num_proc=data.num_proc)` and streamed
from the Arrow cache into the arrays batch by batch, so memory stays bounded by the batch, not the corpus.
The steps: load -> check the columns -> the tokenizer -> tokenize -> split plan -> write.
- Text files are read line by line ("\\r\\n" and "\\r" read as "\\n"). Each file is a document. The lines are encoded in pieces cut only at
  "clean" line breaks (a non-space character before the '\\n' and the next line starting with at most one
  space before text): there GPT-2's pre-tokenizer regex, used by `bpe` and `gpt2`, ends a token at the
  '\\n' whatever follows, so the pieces encode exactly like the whole file. (If no clean break shows up
  within MAX_CUT_SCAN lines, the text is cut anyway.)
- .jsonl / parquet / Hub rows are documents (`data.text_field`). Documents are concatenated as they are,
  with no separator token.
- Split: one document gives its first (1 - val_fraction) of the tokens to train and the rest to val,
  as in the lecture; several documents are split by document (a seeded choice of
  round(val_fraction * n) documents, at least one, goes to val).
- SFT (`sft=True`): records `{"prompt", "response"}` from a .jsonl source or a recipe. Each is rendered as
  the chat template of tokenizers.py (`render_prompt`, no loss, then `render_response`, loss), the two parts
  encoded separately. A record's `"split": "val"` puts it in val; otherwise pairs are split by document as above.
- Recipes: `data.recipe=NAME` runs `records(text) -> list[dict]` from the repository's `data/NAME.py` on the
  source text; records with `prompt`/`response` are pairs (rendered as text when not SFT), else `text`. NAME
  is a plain name (letters, digits, _ and -): no path, so no file outside data/ is ever run.

Hostile input: nothing is lost silently and every failure is one line (a UserError).
- One prepare at a time per data folder: it holds an flock on DATA_DIR/.lock for the whole check and build;
  a second one says "waiting for another prepare of DIR (PID n)..." and then usually finds it up to date.
- The new files are complete on disk under temporary names before the first is renamed into place, so a
  full or read-only disk, or an interruption, leaves the old folder as it was (io.StagedFiles).
- A file reached twice (links, hard links, a glob and a folder, a name repeated) is read once, with a
  warning; folder links are followed but each folder is entered once, so a symlink loop ends. A UTF-8 BOM
  at the start of a file is dropped (meta.json says so). Records without the text field (or null) are
  counted with a warning; a text field of another type is an error; empty documents are counted.
"""

from __future__ import annotations

import codecs
import errno
import fnmatch
import hashlib
import importlib.util
import itertools
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_gpt.batches import SPLITS, check_split_size, split_files
from dist_gpt.errors import UserError
from dist_gpt.io import (
    FileLock,
    StagedFiles,
    atomic_write,
    atomic_write_json,
    disk_error,
    read_error,
    read_json,
    sha256_file,
)
from dist_gpt.tokenizers import CharTokenizer, Tokenizer, render_prompt, render_response, train_tokenizer

if TYPE_CHECKING:
    from dist_gpt.config import DataConfig

FORMAT = 2  # bump when the prepared files change: everything rebuilds (2: a leading UTF-8 BOM dropped, empty documents never chosen for val)
SPLIT_SEED = 1337  # which documents go to val
LINES_PER_BATCH = 4096  # text lines per Dataset.map batch
RECORDS_PER_BATCH = 256  # .jsonl / parquet / recipe records per Dataset.map batch
# bytes the datasets text/json readers take at a time (their default, 10 MB, costs ~100 MB of peak memory)
READ_CHUNK = 1 << 20
MAX_CUT_SCAN = 256  # lines searched for a clean cut before cutting anyway
REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "data"
RECIPE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # data.recipe: the name of a file in RECIPES, nothing else
TMP_DIR = ".prepare_tmp"  # the datasets cache while preparing, inside the data folder, removed afterwards
WRITE_FAILURES = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # errors that only a write meets
LOCK = ".lock"  # held by the prepare working in a data folder (see io.FileLock)

GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE | re.IGNORECASE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The book alone: Project Gutenberg's header (up to "*** START OF ...") and footer ("*** END OF ..." on) removed."""
    if start := GUTENBERG_START.search(text):
        text = text[start.end() :].lstrip("\n")
    if end := GUTENBERG_END.search(text):
        text = text[: end.start()].rstrip() + "\n"
    return text


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    kind: str  # "text" | "json" | "parquet" | "hub"
    files: list[Path] = field(default_factory=list)
    name: str = ""  # Hub dataset (kind "hub"), "NAME" or "NAME:CONFIG"

    def describe(self) -> str:
        if self.kind == "hub":
            return f"Hugging Face dataset {self.name}"
        return str(self.files[0]) + (f" and {len(self.files) - 1} more files" if len(self.files) > 1 else "")


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _file_kind(path: Path) -> str:
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def _visible(name: str, pattern: str) -> bool:
    """Does a file or folder name match one glob component? Names starting with "." only match a pattern that does."""
    return (pattern.startswith(".") or not name.startswith(".")) and fnmatch.fnmatchcase(name, pattern)


@dataclass
class _Walk:
    """Files found under a folder, entering each folder once per pattern position (so a symlink loop ends)."""

    files: list[Path] = field(default_factory=list)
    loops: list[Path] = field(default_factory=list)  # folder links that lead back to a folder already entered
    broken: list[Path] = field(default_factory=list)  # links to nothing
    entered: set[tuple[int, int, int]] = field(default_factory=set)

    def visit(self, folder: Path, patterns: list[str]) -> None:
        """Collect the files under `folder` whose relative path matches `patterns` ("**" = any number of folders)."""
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino, len(patterns))
            if key in self.entered:
                if folder.is_symlink():
                    self.loops.append(folder)
                return
            self.entered.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise read_error(folder, e) from None
        head, rest = patterns[0], patterns[1:]
        if head == "**":
            if rest:
                self.visit(folder, rest)  # "**" standing for no folder at all
            else:
                self._take(e for e in entries if _visible(e.name, "*"))
            for entry in entries:
                if _visible(entry.name, "*") and entry.is_dir():
                    self.visit(Path(entry.path), patterns)
        elif rest:
            for entry in entries:
                if _visible(entry.name, head) and entry.is_dir():
                    self.visit(Path(entry.path), rest)
        else:
            self._take(e for e in entries if _visible(e.name, head))

    def _take(self, entries: Iterator[os.DirEntry]) -> None:
        for entry in entries:
            if entry.is_file():
                self.files.append(Path(entry.path))
            elif entry.is_symlink() and not os.path.exists(entry.path):
                self.broken.append(Path(entry.path))


def _expand(part: str, log: Callable[[str], None]) -> list[Path]:
    """The files one source entry names (a file, a directory, a glob), sorted; [] when it names nothing.

    A directory is every file under it (`DIR/**/*`); names starting with "." are skipped, as glob does.
    Folder links are followed, but a folder is entered only once, so a symlink loop is walked once.
    """
    path = Path(part).expanduser()
    if any(ch in part for ch in "*?["):
        parts = path.parts
        fixed = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        patterns = [
            p for i, p in enumerate(parts) if i == fixed or (i > fixed and not p == parts[i - 1] == "**")
        ]  # "**/**" is "**"
        if not root.is_dir():
            return []
    elif path.is_dir():
        root, patterns = path, ["**", "*"]
    else:
        return [path] if path.is_file() else []
    walk = _Walk()
    walk.visit(root, patterns)
    if walk.loops:
        shown = ", ".join(map(str, walk.loops[:3])) + (
            f" and {len(walk.loops) - 3} more" if len(walk.loops) > 3 else ""
        )
        log(
            f"warning: data.source: not entering {len(walk.loops)} folder links to folders already read (a symlink loop, or a second link): {shown}"
        )
    if walk.broken:
        shown = ", ".join(map(str, walk.broken[:3])) + (
            f" and {len(walk.broken) - 3} more" if len(walk.broken) > 3 else ""
        )
        log(f"warning: data.source: skipping {len(walk.broken)} links to files that do not exist: {shown}")
    return sorted(walk.files)


def _read_once(files: list[Path], log: Callable[[str], None]) -> list[Path]:
    """`files` without the ones reached twice (the same file through a link, a hard link, or named twice), with a warning."""
    first: dict[tuple[int, int], Path] = {}
    unique, twice = [], []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise read_error(f, e) from None
        key = (st.st_dev, st.st_ino)
        if key in first:
            twice.append(f"{f} (same as {first[key]})" if f != first[key] else str(f))
        else:
            first[key] = f
            unique.append(f)
    if twice:
        shown = ", ".join(twice[:3]) + (f" and {len(twice) - 3} more" if len(twice) > 3 else "")
        log(
            f"warning: data.source reaches {len(twice)} files a second time (links or repeated names); each is read once: {shown}"
        )
    return unique


def resolve_source(cfg: DataConfig, data_dir: Path, log: Callable[[str], None] = print) -> Source:
    """What `data.source` names: local files (downloading a URL first) or a Hub dataset."""
    spec = cfg.source.strip()
    if not spec:
        raise UserError(
            "data.source is empty: pass --data.source=PATH (a text file, a directory, a glob, a .jsonl or .parquet file, or a URL)"
        )
    if spec.startswith(("http://", "https://")):
        path = download(spec, cfg.sha256, data_dir / "download", log)
        return Source(_file_kind(path), [path])
    parts = [p.strip() for p in spec.split(",")] if "," in spec and not Path(spec).exists() else [spec]
    files: list[Path] = []
    for part in parts:
        found = _expand(part, log)
        if not found:
            if (
                len(parts) == 1
                and re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?", part)
                and not Path(part).suffix
                and not Path(part).exists()
            ):
                if _offline():
                    raise UserError(
                        f"data.source {part!r} is not a local file or directory, and reading it as a Hugging Face dataset needs the network "
                        "(HF_HUB_OFFLINE is set): pass --data.source=PATH to a local copy"
                    )
                return Source("hub", name=part)
            if Path(part).expanduser().is_dir():
                raise UserError(
                    f"data.source: {part} holds no files to read (names starting with '.' and broken links are skipped)"
                )
            what = (
                "no files match"
                if any(ch in part for ch in "*?[")
                else "no such file or directory (or an empty directory)"
            )
            raise UserError(f"data.source: {what}: {part}")
        files += found
    files = _read_once(files, log)
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(
            f"data.source mixes file kinds ({', '.join(sorted(kinds))}): use text files only, or .jsonl only, or .parquet only"
        )
    return Source(kinds.pop(), files)


def download(url: str, sha256: str, cache: Path, log: Callable[[str], None]) -> Path:
    """`url` into `cache/` (once), checked against `sha256` when given."""
    dest = cache / (Path(urllib.parse.urlparse(url).path).name or "download")
    if dest.is_file() and (not sha256 or sha256_file(dest) == sha256):
        return dest
    how = "download it yourself and pass --data.source=PATH"
    if _offline():
        raise UserError(
            f"data.source is a URL ({url}), the network is off (HF_HUB_OFFLINE) and there is no downloaded copy in {cache}: {how}"
        )
    log(f"downloading {url}")

    def fetch(tmp: Path) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
        except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError) as e:
            raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}): {how}") from None
        if sha256 and digest.hexdigest() != sha256:
            raise UserError(
                f"{url} has SHA-256 {digest.hexdigest()}, not data.sha256={sha256}: check the file, then update data.sha256 or {how}"
            )

    atomic_write(dest, fetch)
    return dest


def _scan(path: Path, errors: str, check_utf8: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Size, SHA-256, line count (as the datasets text reader counts them) and a leading UTF-8 BOM of a file;
    stops at bytes that are not UTF-8."""
    try:
        return _scan_bytes(path, errors, check_utf8, log)
    except OSError as e:
        raise read_error(path, e) from None


def _scan_bytes(path: Path, errors: str, check_utf8: bool, log: Callable[[str], None]) -> dict[str, Any]:
    digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    size = lines = 0
    bad: int | None = None
    last = first = b""
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
            first = first or block[:3]
            if check_utf8 and bad is None:
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    bad = size - pending + e.start
            # universal newlines: "\r\n", "\r" and "\n" each end a line
            lines += (
                block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n") - (last == b"\r" and block[:1] == b"\n")
            )
            size += len(block)
            last = block[-1:]
    if check_utf8 and bad is None:
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            bad = size - pending + e.start
    if bad is not None:
        if errors != "replace":
            raise UserError(
                f"{path} is not valid UTF-8 (byte offset {bad}): convert it to UTF-8, or set data.errors=replace to substitute U+FFFD"
            )
        log(
            f"warning: {path} is not valid UTF-8 (first bad byte at offset {bad}); bad bytes become U+FFFD (data.errors=replace)"
        )
    bom = check_utf8 and first == codecs.BOM_UTF8  # dropped by the reader: not text, never a token
    lines += size > len(codecs.BOM_UTF8) * bom and last not in (b"\n", b"\r")
    return {"path": str(path), "size": size, "sha256": digest.hexdigest(), "lines": lines, "bom": bom}


# ----------------------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    """The recipes there are: the plain names of the .py files in the repository's data/ folder that define records()."""
    return sorted(
        p.stem
        for p in RECIPES.glob("*.py")
        if RECIPE_NAME.fullmatch(p.stem) and "\ndef records(" in p.read_text(encoding="utf-8")
    )


def _recipe(name: str) -> tuple[Callable[[str], list[dict]], Path]:
    """`records(text)` from data/NAME.py. NAME is a plain name (letters, digits, _ and -): no path leads elsewhere."""
    path = RECIPES / f"{name}.py"
    if not RECIPE_NAME.fullmatch(name) or not path.is_file() or path.resolve().parent != RECIPES.resolve():
        raise UserError(
            f"data.recipe {name!r} is not a recipe: name one of the files in {RECIPES} without .py: {', '.join(recipe_names()) or 'none'}"
        )
    spec = importlib.util.spec_from_file_location(f"dist_gpt_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = getattr(module, "records", None)
    if not callable(records):
        raise UserError(f"data.recipe: {path} has no function records(text) -> list[dict]")
    return records, path


def _recipe_dataset(ds: Any, recipe: Callable[[str], list[dict]], path: Path, sft: bool) -> Any:
    """Run the recipe on the whole source text; pairs become text when not preparing SFT data."""
    import datasets

    text = "".join(ds["text"])
    records = recipe(text)
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise UserError(f"data.recipe {path.name} returned no records (it must return a non-empty list of dicts)")
    rows = []
    for r in records:
        if "prompt" in r and "response" in r:
            row = (
                {"prompt": str(r["prompt"]), "response": str(r["response"])}
                if sft
                else {"text": render_prompt(r["prompt"]) + render_response(r["response"])}
            )
        elif "text" in r and not sft:
            row = {"text": str(r["text"])}
        else:
            need = "prompt and response" if sft else "text, or prompt and response"
            raise UserError(f"data.recipe {path.name}: every record needs {need}; got keys {sorted(r)}")
        rows.append({**row, "split": str(r.get("split", ""))})
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------- step 1: load


@dataclass
class Corpus:
    """The loaded source: a `datasets.Dataset` of lines (text files) or of records, and where its text is."""

    ds: Any
    columns: list[str]  # the text columns: [text] or, for SFT, [prompt, response]
    lines: bool  # one row per line of the text files (else one row per record)
    doc_starts: list[int] = field(default_factory=list)  # lines: the first row of each file

    def texts(self, sft: bool) -> Iterator[str]:
        """The corpus as strings (joined batches of rows), rendered as the model will see it, for training a tokenizer."""
        for batch in self.ds.data.to_batches(max_chunksize=1024):
            if sft:
                prompts, responses = batch.column("prompt").to_pylist(), batch.column("response").to_pylist()
                yield "".join(render_prompt(p) + render_response(r) for p, r in zip(prompts, responses, strict=True))
            else:
                yield "".join(t or "" for t in batch.column(self.columns[0]).to_pylist())


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # the innermost error says what was wrong with the input
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _os_failure(e: BaseException | None) -> OSError | None:
    """The operating system's error behind `e`: `e` itself, or what caused it (datasets wraps them)."""
    for _ in range(32):
        if e is None:
            return None
        if isinstance(e, FileNotFoundError) or (isinstance(e, OSError) and e.errno is not None):
            return e
        e = e.__cause__ or e.__context__
    return None


def _os_error_line(failure: OSError, data_dir: Path) -> UserError:
    """One line for a failed read or write: writing when the disk is full or read-only, or when the file is in `data_dir`."""
    path = Path(failure.filename) if failure.filename else data_dir
    writing = failure.errno in WRITE_FAILURES or path.resolve().is_relative_to(data_dir.resolve())
    return disk_error(path, failure) if writing else read_error(path, failure)


def _load(source: Source, cfg: DataConfig, cache: Path) -> Any:
    """The source as a `datasets.Dataset`: one row per line (text files) or per record."""
    import datasets

    kwargs: dict[str, Any] = {"split": "train", "cache_dir": str(cache)}
    chunk = {"chunksize": READ_CHUNK}
    files = [str(f) for f in source.files]
    try:
        if source.kind == "text":
            # utf-8-sig: a byte order mark at the start of a file is dropped, not read as a character
            text = {
                "sample_by": "line",
                "keep_linebreaks": True,
                "encoding": "utf-8-sig",
                "encoding_errors": cfg.errors,
            }
            return datasets.load_dataset("text", data_files=files, **text, **chunk, **kwargs)
        if source.kind == "json":
            # the json reader honours encoding_errors only for an encoding not spelled "utf-8"; "utf_8" is the same codec
            encoding = "utf_8" if cfg.errors == "replace" else "utf-8"
            return datasets.load_dataset(
                "json", data_files=files, encoding=encoding, encoding_errors=cfg.errors, **chunk, **kwargs
            )
        if source.kind == "parquet":
            return datasets.load_dataset("parquet", data_files=files, **kwargs)
        name, _, config = source.name.partition(":")
        return datasets.load_dataset(name, config or None, **kwargs)
    except Exception as e:
        failure = _os_failure(e)
        if failure is not None and (failure.filename or failure.errno in WRITE_FAILURES):
            raise _os_error_line(
                failure, cache.parent
            ) from None  # the datasets cache could not be written, or a file not read
        if isinstance(failure, FileNotFoundError):
            raise UserError(
                f"cannot read {source.describe()}: a file vanished while it was being read ({_first_line(e)}); run again"
            ) from None
        raise UserError(f"cannot read {source.describe()}: {_first_line(e)}") from None


def _load_corpus(
    cfg: DataConfig, source: Source, scans: list[dict], cache: Path, recipe: tuple[Callable, Path] | None, sft: bool
) -> Corpus:
    """Step 1: read the source (and run the recipe on it)."""
    ds = _load(source, cfg, cache)
    if source.kind == "text" and recipe is None:
        if len(ds) != sum(s["lines"] for s in scans):
            raise UserError(
                f"{source.describe()} changed while it was being prepared ({len(ds)} lines read, {sum(s['lines'] for s in scans)} scanned): run again"
            )
        doc_starts = np.cumsum([0] + [s["lines"] for s in scans[:-1]]).tolist()
        return Corpus(ds, ["text"], lines=True, doc_starts=doc_starts)
    if recipe:
        ds = _recipe_dataset(ds, *recipe, sft)
    column = "text" if recipe else cfg.text_field
    return Corpus(ds, ["prompt", "response"] if sft else [column], lines=False)


# ----------------------------------------------------------------------------- step 2: check the text columns


def _not_text(feature: Any) -> str | None:
    """What a column holds when it is not text ("numbers (int64)", "lists", ...); None for strings."""
    import datasets

    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return None
        if feature.dtype.startswith(("int", "uint", "float", "decimal")):
            return f"numbers ({feature.dtype})"
        return "true/false values" if feature.dtype == "bool" else f"{feature.dtype} values"
    if isinstance(feature, datasets.Json):
        return "values of mixed types (strings in some records, numbers, lists or objects in others)"
    if isinstance(feature, (list, datasets.List, datasets.LargeList)):
        return "lists"
    if isinstance(feature, dict):
        return "objects"
    return f"{type(feature).__name__} values"


def _is_null(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype == "null"


def _check_text(corpus: Corpus, source: Source, sft: bool, log: Callable[[str], None]) -> dict[str, int]:
    """Step 2: the text columns are there, hold strings and some text. Returns the counts of records without
    text (the field missing or null; a warning says how many) and of empty documents."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ds, columns = corpus.ds, corpus.columns
    fields = [c for c in ds.column_names if not _is_null(ds.features[c])]  # a field null in every record is no field
    hint = "records need prompt and response fields for SFT" if sft else "set data.text_field"
    absent = [c for c in columns if c not in fields]
    if absent:
        raise UserError(
            f"{source.describe()} has no field {absent[0]!r} (fields: {', '.join(fields) or 'none'}): {hint}"
        )
    for c in columns:
        if what := _not_text(ds.features[c]):
            raise UserError(
                f"{source.describe()}: field {c!r} holds {what}, not text: every record's {c!r} must be a string ({hint})"
            )
    if len(ds) == 0 or not sum(pc.sum(pc.binary_length(ds.data.column(c))).as_py() or 0 for c in columns):
        raise UserError(f"the corpus is empty: {source.describe()} holds no text")
    if corpus.lines:
        return {"missing": 0, "empty": 0}  # empty files: counted from the scans
    no_text = pa.array(np.zeros(len(ds), dtype=bool))
    for c in columns:
        no_text = pc.or_(no_text, pc.is_null(ds.data.column(c)))
    missing, named = int(pc.sum(no_text).as_py() or 0), " or ".join(repr(c) for c in columns)
    if missing == len(ds):
        raise UserError(f"{source.describe()}: no record has {named} (every one is missing or null): {hint}")
    if missing:
        first = int(pc.index(no_text, True).as_py())
        log(
            f"warning: {missing:,} of {len(ds):,} records of {source.describe()} have no {named} (or null): they add no text (the first is record {first + 1})"
        )
    empty = 0 if sft else int(pc.sum(pc.equal(pc.binary_length(ds.data.column(columns[0])), 0)).as_py() or 0)
    return {"missing": missing, "empty": empty}


# ----------------------------------------------------------------------------- step 3: the tokenizer


def _choose_tokenizer(
    cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer | None, sft: bool, log: Callable[[str], None]
) -> tuple[Tokenizer, list[str]]:
    """Step 3: the given tokenizer (finetuning; a char vocabulary must cover the corpus) or one trained on the corpus.

    Returns it and the characters a given char vocabulary lacks (handled as data.unknown says).
    """
    if tokenizer is None:
        log(
            f"training the {cfg.tokenizer} tokenizer"
            + (f" (vocab_size {cfg.vocab_size})" if cfg.tokenizer == "bpe" else "")
        )
        return train_tokenizer(cfg.tokenizer, corpus.texts(sft), cfg.vocab_size), []
    if not isinstance(tokenizer, CharTokenizer):
        return tokenizer, []
    seen: set[str] = set()
    for text in corpus.texts(sft):
        seen.update(text)
    unknown_chars = tokenizer.missing(seen)
    if unknown_chars and cfg.unknown == "error":
        raise tokenizer.unknown_error(unknown_chars)
    return tokenizer, unknown_chars


# ----------------------------------------------------------------------------- step 4: tokenize (Dataset.map functions)


def _clean_cut(lines: Any, k: int, n: int, starts: set[int]) -> bool:
    """Is the break before line k one where every tokenizer here ends a token at the '\\n' (see the module docstring)?"""
    prev, cur = lines[k - 1].as_py(), lines[k].as_py()
    if len(prev) < 2 or prev[-1] != "\n" or prev[-2].isspace():
        return False  # the whitespace before the break is more than the '\n'
    if not cur[0].isspace():
        return True
    if len(cur) > 1:
        return not cur[1].isspace()  # one space or tab, then text
    nxt = lines[k + 1].as_py() if k + 1 < n and k + 1 not in starts else ""
    return bool(nxt) and not nxt[0].isspace()  # a blank line, then text


def _cut(lines: Any, k: int, n: int, starts: set[int]) -> int:
    """The first clean cut at or after line k; document starts and the end are always cuts."""
    for c in range(k, min(k + MAX_CUT_SCAN, n) + 1):
        if c == n or c in starts or _clean_cut(lines, c, n, starts):
            return c
    return k


def _encode_lines(
    batch: Any,
    indices: list[int],
    *,
    table: Any,
    doc_starts: list[int],
    tokenizer: Tokenizer,
    unknown: str,
    dtype: str,
    count: bool,
) -> dict:
    """Map batch of lines [i, j): encode lines [cut(i), cut(j)), one row per document piece."""
    lines, n, starts = table.column("text"), table.num_rows, set(doc_starts)
    i, j = indices[0], indices[-1] + 1
    start, stop = _cut(lines, i, n, starts), _cut(lines, j, n, starts)
    bounds = [start, *(s for s in doc_starts if start < s < stop), stop]
    out: dict[str, list] = {"ids": [], "doc": [], "unknown": []}
    for a, b in itertools.pairwise(bounds):
        if a < b:
            text = "".join(lines.slice(a, b - a).to_pylist())
            out["unknown"].append(tokenizer.count_unknown(text) if count else 0)
            out["ids"].append(tokenizer.encode_array(text, unknown).astype(dtype))
            out["doc"].append(int(np.searchsorted(doc_starts, a, side="right")) - 1)
    return out


def _encode_records(
    batch: dict,
    indices: list[int],
    *,
    tokenizer: Tokenizer,
    unknown: str,
    dtype: str,
    count: bool,
    column: str,
    sft: bool,
) -> dict:
    """Map batch of records: one row per record (for SFT with the loss mask)."""
    out: dict[str, list] = {"ids": [], "doc": list(indices), "unknown": []}
    if sft:
        out["mask"] = []
        for prompt, response in zip(batch["prompt"], batch["response"], strict=True):
            head, tail = render_prompt(prompt or ""), render_response(response or "")
            a, b = tokenizer.encode_array(head, unknown), tokenizer.encode_array(tail, unknown)
            out["ids"].append(np.concatenate([a, b]).astype(dtype))
            out["mask"].append(np.concatenate([np.zeros(len(a), np.uint8), np.ones(len(b), np.uint8)]))
            out["unknown"].append(tokenizer.count_unknown(head + tail) if count else 0)
    else:
        for text in batch[column]:
            out["ids"].append(tokenizer.encode_array(text or "", unknown).astype(dtype))
            out["unknown"].append(tokenizer.count_unknown(text or "") if count else 0)
    return out


def _tokenize(corpus: Corpus, cfg: DataConfig, tokenizer: Tokenizer, dtype: str, count: bool, sft: bool) -> Any:
    """Step 4: one Dataset.map over batches of lines or of records -> rows of (ids, doc, unknown[, mask])."""
    import datasets

    if cfg.num_proc > 1 and tokenizer.kind == "bpe":
        # the processes are the parallelism; silences the fork warning
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs = {"tokenizer": tokenizer, "unknown": cfg.unknown, "dtype": dtype, "count": count}
    features = {
        "ids": datasets.List(datasets.Value(dtype)),
        "doc": datasets.Value("int64"),
        "unknown": datasets.Value("int64"),
    }
    if sft:
        features["mask"] = datasets.List(datasets.Value("uint8"))
    ds = corpus.ds
    if corpus.lines:
        fn, batch_size, writer_batch_size = _encode_lines, LINES_PER_BATCH, 16
        kwargs.update(table=ds.data, doc_starts=corpus.doc_starts)
        ds = ds.with_format("arrow")  # the function reads the lines itself; spare converting them
    else:
        fn, batch_size, writer_batch_size = _encode_records, RECORDS_PER_BATCH, RECORDS_PER_BATCH
        kwargs.update(column=corpus.columns[0], sft=sft)
    return ds.map(
        fn,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=ds.column_names,
        fn_kwargs=kwargs,
        features=datasets.Features(features),
        writer_batch_size=writer_batch_size,
        new_fingerprint=uuid.uuid4().hex,  # a fresh cache every time; also spares datasets hashing the function
        desc=f"tokenizing ({tokenizer.kind})",
    )


# ----------------------------------------------------------------------------- step 5: the split plan


def _split_plan(
    docs: np.ndarray, lengths: np.ndarray, marked: list[str], val_fraction: float, sft: bool, source: Source
) -> dict[str, tuple]:
    """Step 5: per split, (which rows, token range [lo, hi) of their concatenation): by position in one document, else by document."""
    every, total = np.ones(len(docs), dtype=bool), int(lengths.sum())
    doc_ids = np.unique(docs[lengths > 0])  # empty documents are no document to choose
    if total == 0:
        raise UserError(f"the corpus is empty: {source.describe()} holds no tokens once encoded")
    if any(marked):  # the records say (doc = record index)
        bad = sorted({m for m in marked if m not in ("", "train", "val")})
        if bad:
            raise UserError(f'records may mark "split" as "train" or "val", not {bad[0]!r}')
        val_docs = np.flatnonzero(np.array(marked) == "val")
    elif len(doc_ids) == 1 and not sft:  # the lecture: the first (1 - val_fraction) of the tokens train
        n_train = int(total * (1 - val_fraction))
        return {"train": (every, 0, n_train), "val": (every, n_train, total)}
    elif len(doc_ids) < 2:
        raise UserError(
            f"{source.describe()} holds a single prompt/response pair: SFT needs at least two, one for validation"
        )
    else:
        n_val = max(1, round(val_fraction * len(doc_ids)))
        val_docs = np.random.default_rng(SPLIT_SEED).permutation(doc_ids)[:n_val]
    is_val = np.isin(docs, val_docs)
    return {"train": (~is_val, 0, total), "val": (is_val, 0, total)}


def _check_sizes(meta: dict, block_size: int) -> None:
    for split in SPLITS:
        if meta.get("sft"):
            if meta["documents"][split] < 1:
                raise UserError(
                    f"the {split} split has no prompt/response pairs: supply more pairs or change data.val_fraction"
                )
        else:
            check_split_size(split, meta["tokens"][split], block_size)


# ----------------------------------------------------------------------------- step 6: write


def _write_split(
    staged: StagedFiles, path: Path, enc: Any, column: str, rows: np.ndarray, lo: int, hi: int, dtype: str
) -> None:
    """Stream `column` of the selected rows, tokens [lo, hi) of their concatenation, into `path` (staged)."""
    import pyarrow as pa

    def write(tmp: Path) -> None:
        row = pos = 0
        with open(tmp, "wb") as f:
            for batch in enc.data.to_batches(max_chunksize=64):
                keep = rows[row : row + batch.num_rows]
                row += batch.num_rows
                ids = batch.column(column) if keep.all() else batch.column(column).filter(pa.array(keep))
                values = ids.flatten().to_numpy(zero_copy_only=False)  # the fast Arrow flatten, no per-row objects
                a, b = max(lo - pos, 0), min(hi - pos, len(values))
                if a < b:
                    # a short write raises OSError with its errno
                    f.write(memoryview(values[a:b].astype(dtype, copy=False)))
                pos += len(values)

    staged.write(path, write)


@dataclass
class Built:
    """What steps 1-5 made, for step 6 to write: the encoded rows (in the datasets cache), the split plan, meta."""

    enc: Any  # datasets.Dataset: ids, doc, unknown (and mask, for SFT) per row
    plan: dict[str, tuple]  # split -> (rows, lo, hi), see _split_plan
    lengths: np.ndarray  # tokens per row
    tokenizer: Tokenizer
    meta: dict


def _write(data_dir: Path, built: Built, t0: float) -> None:
    """Step 6: the arrays, the tokenizer and meta.json, all complete on disk under temporary names before the first
    is renamed into place, so a failure while writing (a full disk) leaves the old folder as it was. The old
    meta.json goes first and the new one is renamed in last, so a half-replaced folder never looks valid."""
    enc, lengths, meta = built.enc, built.lengths, built.meta
    sft, dtype = meta["sft"], meta["dtype"]
    for name in os.listdir(data_dir):
        if name.startswith(".") and ".tmp" in name:
            (data_dir / name).unlink(missing_ok=True)  # leftovers of a killed prepare
    with StagedFiles() as staged:
        for split, (rows, lo, hi) in built.plan.items():
            _write_split(staged, data_dir / f"{split}.bin", enc, "ids", rows, lo, hi, dtype)
            if sft:
                _write_split(staged, data_dir / f"{split}.mask.bin", enc, "mask", rows, lo, hi, "uint8")
                offsets = np.concatenate([[0], np.cumsum(lengths[rows])]).astype(np.int64)
                staged.write(data_dir / f"{split}.idx.bin", lambda tmp, b=offsets.tobytes(): tmp.write_bytes(b))
        staged.write(data_dir / "tokenizer.json", built.tokenizer.save)
        meta["seconds"] = round(time.time() - t0, 2)
        staged.write(data_dir / "meta.json", lambda tmp: atomic_write_json(tmp, meta))
        (data_dir / "meta.json").unlink(missing_ok=True)
        for split in SPLITS if not sft else ():
            for extra in (f"{split}.mask.bin", f"{split}.idx.bin"):
                (data_dir / extra).unlink(missing_ok=True)
        staged.commit()  # meta.json last


def _versions() -> dict[str, str]:
    import datasets
    import pyarrow
    import tokenizers

    out = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
    }
    try:
        import tiktoken

        out["tiktoken"] = tiktoken.__version__
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- prepare


def _settings(
    cfg: DataConfig, source: Source, tokenizer: Tokenizer | None, sft: bool, recipe_path: Path | None
) -> dict[str, Any]:
    """Everything besides the source's bytes that changes the arrays."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.fingerprint() if tokenizer else cfg.tokenizer,
        "vocab_size": cfg.vocab_size if not tokenizer and cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
        "split_seed": SPLIT_SEED,
        "text_field": cfg.text_field if source.kind != "text" else None,
        "recipe": {"name": cfg.recipe, "sha256": sha256_file(recipe_path)} if recipe_path else None,
        "errors": cfg.errors,
        "unknown": cfg.unknown if isinstance(tokenizer, CharTokenizer) else None,
        "sft": sft,
    }


def prepare(
    cfg: DataConfig,
    *,
    data_dir: Path,
    tokenizer: Tokenizer | None = None,
    sft: bool = False,
    log: Callable[[str], None] = print,
    block_size: int = 0,
) -> dict | None:
    """Build `data_dir`'s arrays from `cfg.source`, or say they are up to date; returns meta.

    Sharded data (data.shard_tokens > 0, or data.source naming another sharded folder's meta.json) goes to
    streaming.prepare_sharded; it returns None when other workers (data.prepare_world > 1) are still busy.

    `tokenizer` given (finetuning): encode with it instead of training one. `block_size` > 0: each split
    must hold at least block_size + 1 tokens (SFT: at least one pair). One prepare at a time works in a
    data folder (it holds DATA_DIR/.lock); another waits for it, then finds the arrays up to date. Any
    failure is a UserError: a full or read-only disk, an unreadable or vanished source file.
    """
    data_dir = Path(data_dir)
    # sharded data: streamed into shards (streaming.py)
    if cfg.shard_tokens > 0 or cfg.source.strip().endswith("meta.json"):
        from dist_gpt.streaming import is_manifest, prepare_sharded

        if cfg.shard_tokens > 0 or is_manifest(cfg.source):
            return prepare_sharded(cfg, data_dir, tokenizer, sft, cfg.recipe, log, block_size)
    recipe = _recipe(cfg.recipe) if cfg.recipe else None
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data.dir {data_dir} is a file, not a folder: move it away or choose another --data.dir")
    created = _missing_dirs(data_dir)
    lock, read_only = FileLock(data_dir / LOCK, f"prepare of {data_dir}", log), None
    try:
        lock.acquire()
    except OSError as e:
        if created or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            _remove_empty(created)
            raise _os_error_line(e, data_dir) from None
        read_only = e  # nobody can write here, so nobody is building it: checking needs no lock
    done = False
    try:
        meta = _prepare_locked(cfg, data_dir, tokenizer, sft, recipe, block_size, log, read_only)
        done = True
        return meta
    except UserError:
        raise
    except Exception as e:
        failure = _os_failure(e)
        if failure is None:
            raise
        raise _os_error_line(failure, data_dir) from None
    finally:
        fresh = not done and bool(created) and data_dir.is_dir() and {p.name for p in data_dir.iterdir()} <= {LOCK}
        lock.release(remove=fresh)
        if fresh:
            _remove_empty(created)  # a failed first prepare leaves nothing behind


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _prepare_locked(
    cfg: DataConfig,
    data_dir: Path,
    tokenizer: Tokenizer | None,
    sft: bool,
    recipe: tuple[Callable, Path] | None,
    block_size: int,
    log: Callable[[str], None],
    read_only: OSError | None,
) -> dict:
    """`prepare` once the data folder is locked: scan the source, then say "up to date" or build."""
    t0 = time.time()
    source = resolve_source(cfg, data_dir, log)
    if recipe and source.kind != "text":
        raise UserError("data.recipe works on text sources: point data.source at text files")
    scans = [_scan(f, cfg.errors, source.kind in ("text", "json"), log) for f in source.files]
    settings = _settings(cfg, source, tokenizer, sft, recipe[1] if recipe else None)
    fingerprint = hashlib.sha256(
        repr([[(s["size"], s["sha256"]) for s in scans], source.name, settings]).encode()
    ).hexdigest()

    meta = _current_meta(data_dir, fingerprint)
    if meta:
        _check_sizes(meta, block_size)
        log(f"{data_dir} is up to date ({_summary(meta)}); nothing to do")
        return meta
    if read_only:
        raise _os_error_line(read_only, data_dir)
    if source.files and sum(s["size"] for s in scans) == 0:
        raise UserError(f"the corpus is empty: {source.describe()} holds no text")
    if boms := [s["path"] for s in scans if s["bom"]]:
        log(
            f"dropping the UTF-8 byte order mark at the start of {len(boms)} file(s) (not text; meta.json records it): {', '.join(boms[:3])}"
        )

    tmp = data_dir / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        built = _build(cfg, source, scans, tmp, tokenizer, sft, recipe, block_size, log)
        built.meta.update(fingerprint=fingerprint, settings=settings)
        _write(data_dir, built, t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {data_dir} in {built.meta['seconds']:.1f} s: {_summary(built.meta)}")
    return built.meta


def _summary(meta: dict) -> str:
    t = meta["tokens"]
    pairs = f" in {meta['documents']['train']:,} / {meta['documents']['val']:,} pairs" if meta.get("sft") else ""
    text = f"train {t['train']:,} tokens, val {t['val']:,} tokens{pairs}; vocab {meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}"
    if meta.get("empty_documents"):
        text += f"; {meta['empty_documents']:,} empty documents"
    if meta.get("records_without_text"):
        text += f"; {meta['records_without_text']:,} records without text"
    return text


def _current_meta(data_dir: Path, fingerprint: str) -> dict | None:
    """The existing meta when it matches `fingerprint` and every file it lists is there, complete."""
    path = data_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = read_json(path, "meta file")
        if meta.get("fingerprint") != fingerprint:
            return None
        sizes = split_files(meta)
    except (UserError, KeyError, TypeError, ValueError):
        return None
    files_ok = all(
        (data_dir / name).is_file() and (data_dir / name).stat().st_size == size for name, size in sizes.items()
    )
    return meta if files_ok and (data_dir / "tokenizer.json").is_file() else None


def _build(
    cfg: DataConfig,
    source: Source,
    scans: list[dict],
    tmp: Path,
    tokenizer: Tokenizer | None,
    sft: bool,
    recipe: tuple[Callable, Path] | None,
    block_size: int,
    log: Callable[[str], None],
) -> Built:
    """Steps 1-5: load -> check the text -> the tokenizer -> tokenize -> split plan (the datasets cache in `tmp`)."""
    import datasets
    import pyarrow.compute as pc

    datasets.utils.logging.set_verbosity_error()
    corpus = _load_corpus(cfg, source, scans, tmp, recipe, sft)
    counts = _check_text(corpus, source, sft, log)
    if corpus.lines:
        counts["empty"] = sum(s["size"] <= len(codecs.BOM_UTF8) * s["bom"] for s in scans)  # empty files
    tokenizer, unknown_chars = _choose_tokenizer(cfg, corpus, tokenizer, sft, log)
    dtype = dtype_for(tokenizer.vocab_size)
    enc = _tokenize(corpus, cfg, tokenizer, dtype, bool(unknown_chars), sft)

    lengths = pc.list_value_length(enc.data.column("ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    docs = enc.data.column("doc").to_numpy()
    ds = corpus.ds
    marked = [m or "" for m in ds.data.column("split").to_pylist()] if "split" in ds.column_names else []
    plan = _split_plan(docs, lengths, marked, cfg.val_fraction, sft, source)
    meta = _meta(tokenizer, dtype, plan, lengths, docs, sft, cfg, source, scans)
    meta.update(empty_documents=counts["empty"], records_without_text=counts["missing"])
    _check_sizes(meta, block_size)
    if unknown_chars:
        changed = int(pc.sum(enc.data.column("unknown")).as_py())
        verb = "dropped" if cfg.unknown == "drop" else f"replaced with {tokenizer.replacement!r}"
        log(
            f"{changed:,} characters outside the vocabulary {verb} (data.unknown={cfg.unknown}): {', '.join(map(repr, unknown_chars[:10]))}"
        )
        meta["unknown"] = {"mode": cfg.unknown, "chars": "".join(unknown_chars), "count": changed}
    if sft and block_size:
        long = int((lengths[plan["train"][0]] > block_size + 1).sum())
        if long:
            log(
                f"{long} of {meta['documents']['train']} train pairs are longer than block_size + 1 = {block_size + 1} tokens and will be truncated"
            )
    return Built(enc, plan, lengths, tokenizer, meta)


def _meta(
    tokenizer: Tokenizer,
    dtype: str,
    plan: dict,
    lengths: np.ndarray,
    docs: np.ndarray,
    sft: bool,
    cfg: DataConfig,
    source: Source,
    scans: list[dict],
) -> dict:
    """meta.json's content (prepare adds the fingerprint, the settings and the time)."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "tokens": {s: int(min(lengths[rows].sum(), hi) - lo) for s, (rows, lo, hi) in plan.items()},
        "documents": {s: len(np.unique(docs[rows])) for s, (rows, _, _) in plan.items()},  # pairs, for SFT
        "sft": sft,
        "source": {
            "spec": cfg.source,
            "kind": source.kind,
            "files": [
                {k: s[k] for k in ("path", "size", "sha256")} | ({"bom": True} if s["bom"] else {}) for s in scans
            ],
            "hub": source.name or None,
        },
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "versions": _versions(),
    }
