"""Streaming prepare: a source -> token shards and a manifest (shards.py), memory bounded by a batch, not the corpus.

    meta = prepare(DataConfig(source="corpus/*.parquet", tokenizer="gpt2", eot=True, shard_tokens=100_000_000,
                              val_tokens=10_485_761), data_dir=Path("data/fineweb10B"))     # prepare.prepare sends it here

prepare.prepare comes here when data.shard_tokens > 0, or when data.source names another sharded folder's
meta.json (`adopt`: the run then reads those shards in place, or fetches them when the address is a URL).

Units. Every input file (a Hub dataset: every file of it) is a unit, read with
`datasets.load_dataset(..., streaming=True)`: .jsonl / parquet / Hub rows are documents (`data.text_field`);
a text file is one document, read line by line and encoded in pieces cut at clean line breaks exactly as
prepare.py does, so it encodes as a whole. Unit u's tokens, in input order (with `data.eot`, the end-of-text
token before every document), are cut into shards of exactly `data.shard_tokens` tokens named
`train_UUUUU_KKKK.bin`, the unit's last one shorter. Unit 0's first `data.val_tokens` tokens are the val
split instead (`val_00000_KKKK.bin`): the head of the stream, as modded-nanogpt's FineWeb val shard is.
The manifest lists the shards in stream order, so the result does not depend on how many workers made it.

Workers. `data.prepare_world` = W workers (processes or nodes sharing the data folder; launch/prepare.py
takes RANK / WORLD_SIZE from torchrun) each take units R, R + W, ...; within a worker, `data.num_proc`
processes tokenize batches of documents (in order, a bounded number of batches in flight). The first
worker to arrive fixes the tokenizer (`gpt2`, a finetune's, or `char` / `bpe` trained on the first
TOKENIZER_SAMPLE bytes of text spread over the units) in `.shards/`; the last one to finish writes
tokenizer.json and meta.json. A stale meta.json is removed when a rebuild starts, so a half-built folder
never looks valid.

Resume. After every shard, `.shards/unit_UUUUU.json` records the shards written so far (name, tokens,
SHA-256) and where the next one starts (input row, tokens of that row already written). A prepare that
stops (killed, a full disk) is rerun with the same command: finished shards are kept, each unit continues
after its last one. The records stay after the manifest is written, so a shard deleted later (or found
corrupt) is rebuilt by rerunning prepare, from that shard of its unit on. Local input files are
identified by path, size and modification time (hashing tens of GB at every start would cost minutes).
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_gpt.batches import SPLITS, check_split_size
from dist_gpt.errors import UserError
from dist_gpt.io import FileLock, StagedFiles, atomic_write_bytes, atomic_write_json, read_json
from dist_gpt.prepare import (
    FORMAT,
    LINES_PER_BATCH,
    LOCK,
    MAX_CUT_SCAN,
    READ_CHUNK,
    RECORDS_PER_BATCH,
    Source,
    _cut,
    _first_line,
    _os_error_line,
    _os_failure,
    _versions,
    dtype_for,
    resolve_source,
)
from dist_gpt.shards import LAYOUT, ShardFile, is_url, join, manifest_shards, read_url, shard_name
from dist_gpt.tokenizers import CharTokenizer, Tokenizer, load_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from dist_gpt.config import Config, DataConfig

PARTS = ".shards"  # the plan, the fixed tokenizer and one record per unit
TOKENIZER_SAMPLE = 64 << 20  # bytes of text a char / bpe tokenizer is trained on, taken evenly from the units
SHARD_FILE = re.compile(r"(train|val)_\d{5}_\d{4}\.bin")


def workers_from_launcher(cfg: Config) -> None:
    """Under torchrun (or any launcher that sets RANK and WORLD_SIZE) each process of a sharded prepare is one worker,
    unless the command names data.prepare_rank / data.prepare_world itself."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and cfg.data.shard_tokens > 0 and not {"data.prepare_rank", "data.prepare_world"} & cfg.explicit:
        cfg.data.prepare_rank, cfg.data.prepare_world = int(os.environ.get("RANK", "0")), world


def is_manifest(spec: str) -> bool:
    """Does data.source name another sharded folder's manifest (PATH/meta.json or URL/meta.json)?"""
    spec = spec.strip()
    return (
        bool(spec)
        and "," not in spec
        and Path(urllib.parse.urlparse(spec).path if is_url(spec) else spec).name == "meta.json"
    )


# ----------------------------------------------------------------------------- units: the input, one file at a time


@dataclass
class Unit:
    index: int
    source: Source
    file: Path | None  # None: a file of a Hub dataset
    count: int  # units in all

    def describe(self) -> str:
        return str(self.file) if self.file else f"{self.source.describe()} (file {self.index + 1} of {self.count})"

    def identity(self) -> dict[str, Any]:
        if self.file is None:
            return {"hub": self.source.name, "file": self.index, "of": self.count}
        st = self.file.stat()
        return {"path": str(self.file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _units(source: Source) -> list[Unit]:
    if source.kind != "hub":
        return [Unit(i, source, f, len(source.files)) for i, f in enumerate(source.files)]
    n = _open_stream(source, None, None).num_shards
    return [Unit(i, source, None, n) for i in range(n)]


def _open_stream(source: Source, file: Path | None, cfg: DataConfig | None, index: int = 0) -> Any:
    """A unit as a streaming `datasets.IterableDataset` (rows of lines for text files, records otherwise)."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    errors = cfg.errors if cfg else "strict"
    try:
        if source.kind == "hub":
            name, _, config = source.name.partition(":")
            ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
            return ds if cfg is None else ds.shard(num_shards=ds.num_shards, index=index)
        files = [str(file)]
        if source.kind == "text":
            text = {"sample_by": "line", "keep_linebreaks": True, "encoding": "utf-8-sig", "encoding_errors": errors}
            return datasets.load_dataset(
                "text", data_files=files, split="train", streaming=True, chunksize=READ_CHUNK, **text
            )
        if source.kind == "json":
            encoding = "utf_8" if errors == "replace" else "utf-8"  # see prepare._load
            return datasets.load_dataset(
                "json",
                data_files=files,
                split="train",
                streaming=True,
                encoding=encoding,
                encoding_errors=errors,
                chunksize=READ_CHUNK,
            )
        return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    except Exception as e:
        raise _read_failure(e, source, file) from None


def _read_failure(e: Exception, source: Source, file: Path | None) -> UserError:
    if isinstance(e, UserError):
        return e
    failure = _os_failure(e)
    if failure is not None and failure.filename:
        return _os_error_line(failure, Path(failure.filename).parent)
    return UserError(f"cannot read {file or source.describe()}: {_first_line(e)}")


@dataclass
class Piece:
    """Text to encode as one: a record, or lines of a text file cut at a clean break."""

    row: int  # the unit's row (record or line) it starts at
    text: str
    doc_start: bool
    missing_before: int = 0  # records without text just before it
    empty: bool = False  # set when encoded (the text itself is dropped then)


def _pieces(unit: Unit, cfg: DataConfig, start_row: int) -> Iterator[Piece]:
    """The unit's pieces from row `start_row` on, in order; the same pieces whatever the reader's batches."""
    ds = _open_stream(unit.source, unit.file, cfg, unit.index)
    if start_row:
        ds = ds.skip(start_row)
    rows = _rows(ds, unit, cfg.text_field if unit.source.kind != "text" else "text")
    if unit.source.kind == "text":
        yield from _text_pieces(rows, start_row)
        return
    missing = 0
    for row, text in enumerate(rows, start=start_row):
        if text is None:
            missing += 1
            continue
        yield Piece(row, text, True, missing)
        missing = 0
    if missing:
        yield Piece(-1, "", False, missing)  # records without text at the end: counted, nothing encoded


def _rows(ds: Any, unit: Unit, field: str) -> Iterator[str | None]:
    """The text field of every row (None where it is missing or null); another type is an error."""
    try:
        for batch in ds.iter(batch_size=RECORDS_PER_BATCH):
            values = batch.get(field)
            if values is None:
                yield from [None] * len(next(iter(batch.values()), []))
                continue
            for v in values:
                if v is not None and not isinstance(v, str):
                    raise UserError(
                        f"{unit.describe()}: field {field!r} holds {type(v).__name__} values, not text: every record's {field!r} must be a string (set data.text_field)"
                    )
                yield v
    except UserError:
        raise
    except Exception as e:
        raise _read_failure(e, unit.source, unit.file) from None


def _text_pieces(lines: Iterator[str | None], row: int) -> Iterator[Piece]:
    """Lines -> pieces of about LINES_PER_BATCH lines, each cut at the first clean break after that (prepare._cut)."""
    import pyarrow as pa

    # the lines a cut looks at, so it never depends on how the lines arrived
    window = LINES_PER_BATCH + MAX_CUT_SCAN + 2
    buf: list[str] = []
    first = row == 0
    for line in lines:
        buf.append(line or "")
        if len(buf) == window:
            cut = _cut(pa.array(buf), LINES_PER_BATCH, window, set())
            yield Piece(row, "".join(buf[:cut]), first)
            row, buf, first = row + cut, buf[cut:], False
    if buf or first:
        yield Piece(row, "".join(buf), first)


# ----------------------------------------------------------------------------- tokenizing (inline or in worker processes)

_worker_tokenizer: list[Any] = []


def _init_worker(tokenizer_path: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_tokenizer[:] = [load_tokenizer(tokenizer_path)]


def _encode_in_worker(job: tuple) -> tuple:
    return _encode(_worker_tokenizer[0], *job)


def _encode(
    tokenizer: Tokenizer, pieces: list[Piece], unknown: str, eot: int | None, dtype: str
) -> tuple[list[Piece], list[np.ndarray]]:
    """Token ids of each piece (the end-of-text id first where a document starts, when `eot` is given)."""
    texts = [p.text for p in pieces]
    if isinstance(tokenizer, CharTokenizer):
        ids = [tokenizer.encode_array(t, unknown) for t in texts]
    else:
        ids = [np.asarray(x, dtype=np.int64) for x in tokenizer.encode_batch(texts)]
    out = []
    for p, a in zip(pieces, ids, strict=True):
        if eot is not None and p.doc_start:
            a = np.concatenate([[eot], a])
        out.append(a.astype(dtype, copy=False))
    for p in pieces:
        p.empty, p.text = not p.text, ""  # the text is not sent back
    return pieces, out


def _batches(pieces: Iterator[Piece], size: int) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    for p in pieces:
        batch.append(p)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(
    pieces: Iterator[Piece], tokenizer: Tokenizer, pool: Any, procs: int, args: tuple
) -> Iterator[tuple[Piece, np.ndarray]]:
    """(piece, ids) in input order; with a pool of `procs` processes, at most 2 batches per process in flight (bounded memory)."""
    if pool is None:
        for batch in _batches(pieces, RECORDS_PER_BATCH):
            yield from zip(*_encode(tokenizer, batch, *args), strict=True)
        return
    pending: collections.deque = collections.deque()
    for batch in _batches(pieces, RECORDS_PER_BATCH):
        pending.append(pool.apply_async(_encode_in_worker, ((batch, *args),)))
        if len(pending) >= 2 * procs:
            yield from zip(*pending.popleft().get(), strict=True)
    while pending:
        yield from zip(*pending.popleft().get(), strict=True)


# ----------------------------------------------------------------------------- writing one unit's shards


def _fresh_state() -> dict[str, Any]:
    """Where a unit's next shard starts: input row, tokens of that row already written, the counters so far."""
    return {
        "row": 0,
        "skip": 0,
        "emitted": 0,
        "docs": {"train": 0, "val": 0},
        "missing": 0,
        "empty": 0,
        "counted": False,
    }


class UnitWriter:
    """One unit's tokens -> its shards; after each shard, the unit's record (resume point) is rewritten atomically."""

    def __init__(self, folder: Path, unit: int, record: dict, shard_tokens: int, val_tokens: int):
        self.folder, self.unit, self.record = folder, unit, record
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens if unit == 0 else 0
        self.state = json.loads(json.dumps(record["state"]))  # a copy
        self.file: ShardFile | None = None
        self.file_split = ""
        self.start: dict = {}

    @property
    def split(self) -> str:
        """Where the next token goes: unit 0's first val_tokens tokens are val."""
        return "val" if self.state["emitted"] < self.val_tokens else "train"

    def add(self, piece: Piece, ids: np.ndarray, count: bool = True) -> None:
        """Write `ids` (the piece's tokens); `count`: the piece is not yet in the counters (False for the first piece of a resume)."""
        s = self.state
        if count:
            s["missing"] += piece.missing_before
            if piece.doc_start:
                s["docs"][self.split] += 1
                s["empty"] += piece.empty
        if piece.row < 0:
            return  # the count of records without text at the end of the unit
        pos = 0 if count else s["skip"]
        s["row"], s["skip"], s["counted"] = piece.row, pos, True
        while pos < len(ids):
            if self.file is None:
                self.start, self.file_split = json.loads(json.dumps(s)), self.split
                index = sum(sh["split"] == self.file_split for sh in self.record["shards"])
                self.file = ShardFile(self.folder / shard_name(self.file_split, self.unit, index))
            room = self.shard_tokens - self.file.tokens
            if self.file_split == "val":
                room = min(room, self.val_tokens - s["emitted"])
            take = ids[pos : pos + room]
            self.file.write(take)
            pos += len(take)
            s["emitted"] += len(take)
            s["skip"] = pos
            if self.file.tokens == self.shard_tokens or (self.file_split == "val" and s["emitted"] == self.val_tokens):
                self._close()

    def _close(self) -> None:
        sha = self.file.commit()
        entry = {
            "name": self.file.path.name,
            "split": self.file_split,
            "tokens": self.file.tokens,
            "sha256": sha,
            "start": self.start,
        }
        self.record["shards"].append(entry)
        self.file.__exit__()
        self.file = None
        self.record["state"] = json.loads(json.dumps(self.state))
        self._save()

    def finish(self) -> None:
        if self.file is not None:
            self._close()
        if self.state["emitted"] < self.val_tokens:
            raise UserError(
                f"data.val_tokens={self.val_tokens:,} but the first input file holds only {self.state['emitted']:,} tokens: "
                "the val split is the head of the first file; lower data.val_tokens or put a larger file first"
            )
        self.record["state"], self.record["done"] = json.loads(json.dumps(self.state)), True
        self._save()

    def abort(self) -> None:
        if self.file is not None:
            self.file.__exit__()
            self.file = None

    def _save(self) -> None:
        atomic_write_json(self.folder / PARTS / f"unit_{self.unit:05d}.json", self.record)


def _shard_ok(folder: Path, entry: dict, itemsize: int) -> bool:
    path = folder / entry["name"]
    return path.is_file() and path.stat().st_size == entry["tokens"] * itemsize


def _resume_point(folder: Path, record: dict, itemsize: int) -> dict | None:
    """The record cut back to its first missing or damaged shard; None when the unit is complete."""
    shards = record["shards"]
    k = next((i for i, sh in enumerate(shards) if not _shard_ok(folder, sh, itemsize)), len(shards))
    if k == len(shards):
        return None if record["done"] else record
    state = shards[k]["start"]
    return {**record, "shards": shards[:k], "state": state, "done": False}


# ----------------------------------------------------------------------------- the plan: settings, fingerprint, tokenizer


@dataclass
class Plan:
    fingerprint: str
    settings: dict
    tokenizer: Tokenizer
    units: list[Unit]
    eot: int | None

    @property
    def dtype(self) -> str:
        return dtype_for(self.tokenizer.vocab_size)


def _settings(cfg: DataConfig, source: Source, tokenizer: Tokenizer | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "layout": LAYOUT,
        "tokenizer": tokenizer.fingerprint() if tokenizer else cfg.tokenizer,
        "vocab_size": cfg.vocab_size if not tokenizer and cfg.tokenizer == "bpe" else None,
        "tokenizer_sample": TOKENIZER_SAMPLE if not tokenizer and cfg.tokenizer != "gpt2" else None,
        "text_field": cfg.text_field if source.kind != "text" else None,
        "errors": cfg.errors,
        "unknown": cfg.unknown if cfg.tokenizer == "char" or isinstance(tokenizer, CharTokenizer) else None,
        "shard_tokens": cfg.shard_tokens,
        "val_tokens": cfg.val_tokens,
        "eot": cfg.eot,
        "lines_per_piece": LINES_PER_BATCH if source.kind == "text" else None,
    }


def _eot_id(tokenizer: Tokenizer) -> int:
    if tokenizer.kind != "gpt2":
        raise UserError(
            f"data.eot needs the gpt2 tokenizer (its <|endoftext|> token); the {tokenizer.kind} tokenizer has no end-of-text token: set data.eot=false"
        )
    return int(tokenizer.enc.eot_token)


def _train_sampled(cfg: DataConfig, units: list[Unit], log: Callable[[str], None]) -> Tokenizer:
    """A char / bpe tokenizer trained on the first TOKENIZER_SAMPLE bytes of text, an equal share from each unit."""
    share = max(TOKENIZER_SAMPLE // len(units), 1)

    def texts() -> Iterator[str]:
        for unit in units:
            seen = 0
            for piece in _pieces(unit, cfg, 0):
                yield piece.text
                seen += len(piece.text.encode("utf-8", "surrogatepass"))
                if seen >= share:
                    break

    log(
        f"training the {cfg.tokenizer} tokenizer on up to {TOKENIZER_SAMPLE >> 20} MB of text from {len(units)} input file(s)"
    )
    seen = [0]

    def counted() -> Iterator[str]:
        for text in texts():
            seen[0] += len(text)
            yield text

    try:
        return train_tokenizer(cfg.tokenizer, counted(), cfg.vocab_size)
    except UserError:
        if seen[0]:
            raise
        raise _no_text(cfg, units[0].source) from None


def _no_text(cfg: DataConfig, source: Source) -> UserError:
    field = (
        f"no record has a {cfg.text_field!r} field with text (set data.text_field)"
        if source.kind != "text"
        else "the files are empty"
    )
    return UserError(f"the corpus is empty: {source.describe()}: {field}")


def _make_plan(
    cfg: DataConfig, data_dir: Path, tokenizer: Tokenizer | None, log: Callable[[str], None]
) -> tuple[Plan, dict | None]:
    """Resolve the source, fingerprint it; under the folder lock, return the current meta if up to date, else fix the tokenizer."""
    source = resolve_source(cfg, data_dir, log)
    units = _units(source)
    settings = _settings(cfg, source, tokenizer)
    ident = [u.identity() for u in units]
    fingerprint = hashlib.sha256(repr([ident, source.name, settings]).encode()).hexdigest()
    parts = data_dir / PARTS
    with FileLock(data_dir / LOCK, f"prepare of {data_dir}", log):
        meta = _current_meta(data_dir, fingerprint)
        if meta:
            return Plan(
                fingerprint, settings, load_tokenizer(data_dir / "tokenizer.json"), units, meta.get("eot_id")
            ), meta
        plan_file = parts / "plan.json"
        old = read_json(plan_file, "prepare plan") if plan_file.is_file() else {}
        if old.get("fingerprint") != fingerprint or not (parts / "tokenizer.json").is_file():
            if (data_dir / "meta.json").is_file():
                (data_dir / "meta.json").unlink()  # a rebuild starts: the folder must not look valid until it is done
            shutil.rmtree(parts, ignore_errors=True)
            tok = tokenizer or (
                train_tokenizer("gpt2", [], 0) if cfg.tokenizer == "gpt2" else _train_sampled(cfg, units, log)
            )
            tok.save(parts / "tokenizer.json")
            atomic_write_json(plan_file, {"fingerprint": fingerprint, "units": len(units), "settings": settings})
        tok = load_tokenizer(parts / "tokenizer.json")
    return Plan(fingerprint, settings, tok, units, _eot_id(tok) if cfg.eot else None), None


def _current_meta(data_dir: Path, fingerprint: str) -> dict | None:
    """meta.json when it has `fingerprint` and every shard is there with its size."""
    path = data_dir / "meta.json"
    if not path.is_file() or not (data_dir / "tokenizer.json").is_file():
        return None
    try:
        meta = read_json(path, "meta file")
        if meta.get("fingerprint") != fingerprint or meta.get("layout") != LAYOUT:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        ok = all(_shard_ok(data_dir, s, itemsize) for split in SPLITS for s in meta["shards"][split])
    except (UserError, KeyError, TypeError, ValueError):
        return None
    return meta if ok else None


# ----------------------------------------------------------------------------- prepare


def prepare_sharded(
    cfg: DataConfig,
    data_dir: Path,
    tokenizer: Tokenizer | None,
    sft: bool,
    recipe: str,
    log: Callable[[str], None],
    block_size: int,
) -> dict | None:
    """Build the shards this worker owns; the last worker writes meta.json. Returns meta, or None when other workers
    (data.prepare_world > 1) still have units to finish. Any OS failure is one line."""
    if sft:
        raise UserError(
            "sharded data (data.shard_tokens > 0) holds text for pretraining, not SFT pairs: prepare SFT data with data.shard_tokens=0"
        )
    if recipe:
        raise UserError(
            "data.recipe works on the single-array layout: set data.shard_tokens=0, or give the records as .jsonl / parquet files"
        )
    if is_manifest(cfg.source):
        return adopt(cfg, data_dir, log, block_size)
    if cfg.val_tokens <= 0:
        raise UserError(
            "sharded data needs data.val_tokens > 0: the first N tokens of the stream are the val split (e.g. --data.val_tokens=1000000)"
        )
    if block_size and cfg.shard_tokens < block_size + 1:
        raise UserError(
            f"data.shard_tokens={cfg.shard_tokens} is smaller than block_size + 1 = {block_size + 1}: a training window never straddles two shards"
        )
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data.dir {data_dir} is a file, not a folder: move it away or choose another --data.dir")
    try:
        return _prepare(cfg, data_dir, tokenizer, log, block_size)
    except UserError:
        raise
    except Exception as e:
        failure = _os_failure(e)
        if failure is None:
            raise
        raise _os_error_line(failure, data_dir) from None


def _prepare(
    cfg: DataConfig, data_dir: Path, tokenizer: Tokenizer | None, log: Callable[[str], None], block_size: int
) -> dict | None:
    t0 = time.time()
    plan, meta = _make_plan(cfg, data_dir, tokenizer, log)
    if meta:
        _check_sizes(meta, block_size)
        log(f"{data_dir} is up to date ({_summary(meta)}); nothing to do")
        return meta
    mine = [u for u in plan.units if u.index % cfg.prepare_world == cfg.prepare_rank]
    pool = None
    if cfg.num_proc > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            cfg.num_proc, initializer=_init_worker, initargs=(str(data_dir / PARTS / "tokenizer.json"),)
        )
    try:
        for unit in mine:
            _prepare_unit(unit, plan, cfg, data_dir, pool, log)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    with FileLock(data_dir / LOCK, f"prepare of {data_dir}", log):
        meta = _current_meta(data_dir, plan.fingerprint)
        if meta:  # another worker finished last and wrote it
            log(f"{data_dir} is complete ({_summary(meta)})")
            return meta
        pending = _pending_units(data_dir, plan)
        if pending:
            shown = ", ".join(map(str, pending[:8])) + (" ..." if len(pending) > 8 else "")
            log(
                f"worker {cfg.prepare_rank} of {cfg.prepare_world} is done; input files {shown} are still being prepared by other workers: the last to finish writes meta.json"
            )
            return None
        meta = _write_manifest(cfg, data_dir, plan, t0, log)
    _check_sizes(meta, block_size)
    log(f"prepared {data_dir} in {meta['seconds']:.1f} s: {_summary(meta)}")
    return meta


def _read_record(data_dir: Path, plan: Plan, unit: Unit) -> dict | None:
    path = data_dir / PARTS / f"unit_{unit.index:05d}.json"
    if not path.is_file():
        return None
    try:
        record = read_json(path, "unit record")
    except UserError:
        return None  # unreadable: the unit is prepared again
    return record if record.get("fingerprint") == plan.fingerprint else None


def _prepare_unit(
    unit: Unit, plan: Plan, cfg: DataConfig, data_dir: Path, pool: Any, log: Callable[[str], None]
) -> None:
    """Prepare one unit, continuing after its last complete shard; one worker at a time per unit (a lock file)."""
    lock = FileLock(
        data_dir / PARTS / f"unit_{unit.index:05d}.lock", f"prepare of {unit.describe()}", log=lambda _: None
    ).acquire()
    try:
        record = _read_record(data_dir, plan, unit)
        fresh = {
            "fingerprint": plan.fingerprint,
            "unit": unit.index,
            "shards": [],
            "state": _fresh_state(),
            "done": False,
        }
        record = _resume_point(data_dir, record, np.dtype(plan.dtype).itemsize) if record else fresh
        if record is not None:
            _write_unit(unit, record, plan, cfg, data_dir, pool, log)
    finally:
        lock.release(remove=True)


def _write_unit(
    unit: Unit, record: dict, plan: Plan, cfg: DataConfig, data_dir: Path, pool: Any, log: Callable[[str], None]
) -> None:
    for stale in data_dir.glob(f".*_{unit.index:05d}_*.bin.tmp*"):
        stale.unlink(missing_ok=True)  # a killed writer's temporary file
    state = record["state"]
    if record["shards"] or state["row"]:
        log(f"{unit.describe()}: {len(record['shards'])} shard(s) already written; continuing at row {state['row']:,}")
    writer = UnitWriter(data_dir, unit.index, record, cfg.shard_tokens, cfg.val_tokens)
    resumed = state["counted"]  # the first piece is already in the counters
    try:
        pieces = _pieces(unit, cfg, state["row"])
        for piece, ids in _encoded(pieces, plan.tokenizer, pool, cfg.num_proc, (cfg.unknown, plan.eot, plan.dtype)):
            writer.add(piece, ids, count=not resumed)
            resumed = False
        writer.finish()
    finally:
        writer.abort()
    n = sum(sh["tokens"] for sh in record["shards"])
    log(f"{unit.describe()}: {n:,} tokens in {len(record['shards'])} shard(s)")


def _pending_units(data_dir: Path, plan: Plan) -> list[int]:
    itemsize = np.dtype(plan.dtype).itemsize
    pending = []
    for unit in plan.units:
        record = _read_record(data_dir, plan, unit)
        if record is None or _resume_point(data_dir, record, itemsize) is not None:
            pending.append(unit.index)
    return pending


def _write_manifest(cfg: DataConfig, data_dir: Path, plan: Plan, t0: float, log: Callable[[str], None]) -> dict:
    """meta.json (the manifest) and tokenizer.json, from every unit's record; shard files no record names are removed."""
    records = [_read_record(data_dir, plan, u) for u in plan.units]
    shards: dict[str, list] = {s: [] for s in SPLITS}
    totals = {"docs": {"train": 0, "val": 0}, "missing": 0, "empty": 0}
    for record in records:
        for sh in record["shards"]:
            shards[sh["split"]].append({k: sh[k] for k in ("name", "tokens", "sha256")})
        st = record["state"]
        for split in SPLITS:
            totals["docs"][split] += st["docs"][split]
        totals["missing"] += st["missing"]
        totals["empty"] += st["empty"]
    tokens = {s: sum(sh["tokens"] for sh in shards[s]) for s in SPLITS}
    if totals["docs"]["train"] + totals["docs"]["val"] == 0:
        raise _no_text(cfg, plan.units[0].source)
    if tokens["train"] == 0:
        raise UserError(
            f"the corpus is empty: {plan.units[0].source.describe()} holds no tokens once encoded (after the val split's data.val_tokens)"
        )
    if totals["missing"]:
        log(f"warning: {totals['missing']:,} records have no {cfg.text_field!r} field (or null): they add no text")
    tok = plan.tokenizer
    meta = {
        "format": FORMAT,
        "layout": LAYOUT,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": plan.dtype,
        "tokens": tokens,
        "documents": totals["docs"],
        "sft": False,
        "shard_tokens": cfg.shard_tokens,
        "val_tokens": cfg.val_tokens,
        "eot_id": plan.eot,
        "shards": shards,
        "source": {
            "spec": cfg.source,
            "kind": plan.units[0].source.kind,
            "units": [u.identity() for u in plan.units],
            "hub": plan.units[0].source.name or None,
        },
        "tokenizer_fingerprint": tok.fingerprint(),
        "versions": _versions(),
        "empty_documents": totals["empty"],
        "records_without_text": totals["missing"],
        "fingerprint": plan.fingerprint,
        "settings": plan.settings,
        "seconds": round(time.time() - t0, 2),
    }
    named = {sh["name"] for s in SPLITS for sh in shards[s]}
    for path in data_dir.iterdir():
        if SHARD_FILE.fullmatch(path.name) and path.name not in named:
            path.unlink()  # a shard of an earlier build that this one does not have
    with StagedFiles() as staged:
        staged.write(data_dir / "tokenizer.json", tok.save)
        staged.write(data_dir / "meta.json", lambda tmp: atomic_write_json(tmp, meta))
        staged.commit()  # meta.json last
    return meta


def _check_sizes(meta: dict, block_size: int) -> None:
    for split in SPLITS:
        check_split_size(split, meta["tokens"][split], block_size)


def _summary(meta: dict) -> str:
    t, n = meta["tokens"], {s: len(meta["shards"][s]) for s in SPLITS}
    text = f"train {t['train']:,} tokens in {n['train']} shard(s), val {t['val']:,} tokens in {n['val']}; vocab {meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}"
    if meta.get("base"):
        text += f"; shards from {meta['base']}"
    if meta.get("records_without_text"):
        text += f"; {meta['records_without_text']:,} records without text"
    return text


# ----------------------------------------------------------------------------- adopting another folder's shards


def adopt(cfg: DataConfig, data_dir: Path, log: Callable[[str], None], block_size: int) -> dict:
    """data.source = PATH/meta.json or URL/meta.json of a sharded folder: its manifest and tokenizer, with `"base"`
    saying where the shards are (a folder: read in place; a URL: fetched on demand into data_dir)."""
    spec = cfg.source.strip()
    base = spec.rsplit("/", 1)[0] + "/" if is_url(spec) else str(Path(spec).expanduser().resolve().parent)
    if not is_url(spec) and Path(base) == data_dir.resolve():
        raise UserError(
            f"data.source names the manifest of data.dir itself ({spec}): leave data.source empty-handed, or point data.dir elsewhere"
        )
    raw = read_url(spec if is_url(spec) else str(Path(spec).expanduser()), "shard manifest")
    try:
        meta = json.loads(raw)
        ok = (
            isinstance(meta, dict)
            and meta.get("layout") == LAYOUT
            and all(isinstance(meta.get(k), str) for k in ("fingerprint", "dtype"))
        )
        manifest_shards(meta, "train")
        manifest_shards(meta, "val")
    except (json.JSONDecodeError, UnicodeDecodeError, UserError):
        ok = False
    if not ok:
        raise UserError(
            f"data.source {spec} is not the meta.json of a sharded dist_gpt folder (prepared with data.shard_tokens > 0)"
        )
    tok_raw = read_url(join(base, "tokenizer.json"), "tokenizer")
    with FileLock(data_dir / LOCK, f"prepare of {data_dir}", log):
        local = data_dir / "meta.json"
        current = read_json(local, "meta file") if local.is_file() else {}
        tok_file = data_dir / "tokenizer.json"
        if (
            current.get("fingerprint") == meta["fingerprint"]
            and current.get("base") == base
            and tok_file.is_file()
            and tok_file.read_bytes() == tok_raw
        ):
            _check_sizes(current, block_size)
            log(f"{data_dir} is up to date ({_summary(current)}); nothing to do")
            return current
        tmp = data_dir / f".tokenizer.json.check{os.getpid()}"
        atomic_write_bytes(tmp, tok_raw)
        try:
            tok = load_tokenizer(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        if tok.fingerprint() != meta.get("tokenizer_fingerprint"):
            raise UserError(
                f"the tokenizer.json beside {spec} is not the one its meta.json names: re-upload the folder as prepared"
            )
        meta["base"] = base
        _check_sizes(meta, block_size)
        with StagedFiles() as staged:
            staged.write(data_dir / "tokenizer.json", lambda t: t.write_bytes(tok_raw))
            staged.write(local, lambda t: atomic_write_json(t, meta))
            staged.commit()
    how = "fetched on demand" if is_url(base) else "read in place"
    log(f"{data_dir} uses the shards of {base} ({how}): {_summary(meta)}")
    return meta
