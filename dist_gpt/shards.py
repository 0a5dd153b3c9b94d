"""Sharded token data: fixed-size token files plus one manifest, read lazily, fetched on demand.

    split = open_sharded(data_dir, "train", meta)        # batches.open_split does this for a sharded folder
    window = split.read(3, np.array([0, 4096]), 257)     # (2, 257) tokens of shard 3, from offsets 0 and 4096

A sharded folder (prepared with `data.shard_tokens > 0`, see streaming.py) holds `tokenizer.json`, the shard
files and `meta.json`, which is the manifest: besides the single-array meta (tokenizer, vocab size, dtype,
token counts, fingerprints) it says `"layout": "shards"` and lists every shard in stream order:

    "shards": {"train": [{"name": "train_00000_0000.bin", "tokens": 100000000, "sha256": "..."}, ...],
               "val":   [{"name": "val_00000_0000.bin", "tokens": 10485761, "sha256": "..."}]}

A shard is raw token ids (meta's dtype), nothing else. Where a shard's bytes come from:
- the folder itself (a local disk or a shared filesystem every node mounts): memory-mapped in place;
- `meta["base"]`, written when a run adopts another folder's manifest (`data.source=.../meta.json`):
  a local folder is read in place; an http(s):// or file:// URL is fetched into the run's data folder;
- a shard's own `"url"` (absolute, or relative to the base), when the manifest lists one.
Fetched shards are checked against the manifest's SHA-256 (a mismatch is retried, then one error), fetched
a few ahead of the reader by a background thread, and deleted behind it when `data.disk_budget_gb` would
be exceeded. Shards read in place are checked once per process, when first opened (and their sizes when
the split is opened), so a missing or corrupt shard is one clear error, never silent garbage.
Several processes of one node may share the data folder: a per-shard lock makes one of them fetch it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np

from dist_gpt.errors import UserError
from dist_gpt.io import FileLock, disk_error, fsync_dir, read_error, sha256_file

LAYOUT = "shards"
FETCH_TRIES = 4  # downloads of one shard before giving up (a checksum mismatch counts as a failed try)
FETCH_BACKOFF_S = 1.0  # wait before the second try; doubles for each further one
FETCH_TIMEOUT_S = 60.0
URL_SCHEMES = ("http://", "https://", "file://")


def is_url(location: str) -> bool:
    return location.startswith(URL_SCHEMES)


def shard_name(split: str, unit: int, index: int) -> str:
    """The file of a unit's (input file's) index-th shard: train_00003_0001.bin."""
    return f"{split}_{unit:05d}_{index:04d}.bin"


@dataclass(frozen=True)
class Shard:
    name: str
    tokens: int
    sha256: str
    url: str = ""  # where to fetch it from, when the manifest lists it (absolute, or relative to the base)


# ----------------------------------------------------------------------------- writing


class ShardFile:
    """One shard written as tokens arrive: a temporary name in the folder, hashed on the way, renamed when done.

    with ShardFile(folder / "train_00000_0000.bin") as f:
        f.write(ids)               # any number of times
        sha = f.commit()           # fsync, rename into place; leaving the block without commit removes the temp file
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.digest, self.tokens = hashlib.sha256(), 0
        try:
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (open across write() calls; closed by commit or __exit__)
        except OSError as e:
            raise disk_error(self.path, e) from None

    def write(self, ids: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(ids)).cast("B")
        try:
            self.file.write(data)
        except OSError as e:
            raise disk_error(self.path, e) from None
        self.digest.update(data)
        self.tokens += len(ids)

    def commit(self) -> str:
        """Make the shard durable under its name; returns its SHA-256."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise disk_error(self.path, e) from None
        return self.digest.hexdigest()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- fetching


class FetchError(Exception):
    """A download that failed; `final` when retrying cannot help (the server says the file is not there)."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


def _download(url: str, dest: Path, size: int, sha256: str) -> None:
    """`url` -> `dest` (through a temporary name), checked against size and SHA-256."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}_{threading.get_ident()}")
    digest, got = hashlib.sha256(), 0
    try:
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 22):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except urllib.error.HTTPError as e:
            raise FetchError(f"HTTP {e.code} {e.reason}", final=e.code in (403, 404, 410)) from None
        except FileNotFoundError as e:
            if e.filename and Path(e.filename) == tmp:
                raise
            raise FetchError("no such file", final=True) from None
        except urllib.error.URLError as e:
            final = isinstance(e.reason, FileNotFoundError)
            raise FetchError("no such file" if final else str(e.reason), final=final) from None
        except (HTTPException, TimeoutError, ConnectionError) as e:
            raise FetchError(f"{type(e).__name__}: {e}") from None
        if got != size or digest.hexdigest() != sha256:
            raise FetchError(
                f"got {got:,} bytes with SHA-256 {digest.hexdigest()[:16]}..., the manifest says {size:,} bytes, {sha256[:16]}..."
            )
        os.replace(tmp, dest)
    except OSError as e:
        raise disk_error(dest, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(
    url: str, dest: Path, size: int, sha256: str, log: Callable[[str], None] = print, tries: int = FETCH_TRIES
) -> None:
    """Download with retries (`tries`, exponential backoff); a UserError naming the shard when it cannot be had."""
    for attempt in range(tries):
        try:
            _download(url, dest, size, sha256)
            return
        except FetchError as e:
            if e.final:
                raise UserError(
                    f"shard {dest.name} is missing at {url} ({e}): the manifest lists a shard the server does not have; re-upload it"
                ) from None
            if attempt == tries - 1:
                raise UserError(
                    f"could not fetch shard {dest.name} from {url} after {tries} tries (last: {e}); check the server, or re-upload a corrupt copy"
                ) from None
            wait = FETCH_BACKOFF_S * 2**attempt
            log(f"warning: fetching {dest.name} from {url} failed ({e}); retrying in {wait:g} s")
            time.sleep(wait)


def read_url(url: str, what: str) -> bytes:
    """A small file (a manifest, a tokenizer) from a URL or a local path, with the same retries."""
    if not is_url(url):
        try:
            return Path(url).read_bytes()
        except OSError as e:
            raise read_error(Path(url), e) from None
    last = ""
    for attempt in range(FETCH_TRIES):
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code in (403, 404, 410):
                break
        except urllib.error.URLError as e:
            last = str(e.reason)
            if isinstance(e.reason, FileNotFoundError):
                break
        except (HTTPException, TimeoutError, ConnectionError) as e:
            last = f"{type(e).__name__}: {e}"
        if attempt < FETCH_TRIES - 1:
            time.sleep(FETCH_BACKOFF_S * 2**attempt)
    raise UserError(f"could not read the {what} at {url} ({last}): check the address and that the server is up")


def join(base: str, name: str) -> str:
    """`name` (a file name or a URL) resolved against a base folder or URL."""
    if is_url(name) or not base:
        return name
    if is_url(base):
        return urllib.parse.urljoin(base.rstrip("/") + "/", name)
    return str(Path(base) / name)


# ----------------------------------------------------------------------------- the store: where each shard's bytes are


class ShardStore:
    """Local paths of a manifest's shards, fetched first when they live elsewhere; memory-maps opened once.

    `plan(names)` tells the store which shards the reader needs now and next: the missing ones are fetched
    by a background thread, in that order; when a fetch would take the fetched shards past `budget_bytes`,
    fetched shards outside the plan (and not pinned) are deleted first. Shards read in place are never deleted.
    """

    def __init__(self, folder: Path, base: str, dtype: str, budget_bytes: int = 0, log: Callable[[str], None] = print):
        self.folder, self.base, self.dtype, self.budget, self.log = (
            Path(folder),
            base,
            np.dtype(dtype),
            budget_bytes,
            log,
        )
        self.shards: dict[str, Shard] = {}
        self.pinned: set[str] = set()
        self.wanted: set[str] = set()
        self._maps: dict[str, np.ndarray] = {}
        self._checked: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._reserved: dict[str, int] = {}  # bytes of the fetches under way in this process
        self._guard = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._thread: threading.Thread | None = None

    def add(self, shards: Iterable[Shard], pin: bool = False) -> None:
        for s in shards:
            self.shards[s.name] = s
            if pin:
                self.pinned.add(s.name)

    def url(self, shard: Shard) -> str | None:
        """Where to fetch `shard` from, or None when it is read in place."""
        if shard.url:
            return join(self.base, shard.url)
        return join(self.base, shard.name) if is_url(self.base) else None

    def path(self, shard: Shard) -> Path:
        """The local file: in the base folder (read in place) or in the data folder (fetched, or prepared here)."""
        if self.base and not is_url(self.base) and not shard.url:
            return Path(self.base) / shard.name
        return self.folder / shard.name

    def nbytes(self, shard: Shard) -> int:
        return shard.tokens * self.dtype.itemsize

    def check_present(self, shards: list[Shard], split: str) -> None:
        """Shards read in place must all be there, complete (a cheap size check; the SHA-256 is checked on first use)."""
        for s in shards:
            if self.url(s) is not None:
                continue
            p = self.path(s)
            size = p.stat().st_size if p.is_file() else -1
            if size != self.nbytes(s):
                what = (
                    "is missing" if size < 0 else f"has {size:,} bytes, not the {self.nbytes(s):,} the manifest lists"
                )
                raise UserError(
                    f"the {split} shard {p} {what}: run `python launch/prepare.py` again with the same settings (it rebuilds the missing shards)"
                )

    # --- reading

    def array(self, name: str) -> np.ndarray:
        """The shard's tokens, memory-mapped (fetched and verified first when needed)."""
        m = self._maps.get(name)
        if m is not None:
            return m
        shard = self.shards[name]
        self.wanted.add(name)
        self.ensure(shard)
        path = self.path(shard)
        if name not in self._checked:
            self._verify(shard, path)
        try:
            m = np.memmap(path, dtype=self.dtype, mode="r") if shard.tokens else np.zeros(0, self.dtype)
        except OSError as e:
            raise read_error(path, e) from None
        self._maps[name] = m
        return m

    def _verify(self, shard: Shard, path: Path) -> None:
        """Size and SHA-256 against the manifest, once per process; a fetched copy that fails is fetched again."""
        try:
            ok = path.stat().st_size == self.nbytes(shard) and sha256_file(path) == shard.sha256
        except OSError as e:
            raise read_error(path, e) from None
        if not ok and self.url(shard) is not None:
            path.unlink(missing_ok=True)
            self.ensure(shard)
            ok = True  # a fresh download is verified as it is written
        if not ok:
            raise UserError(
                f"shard {path} is corrupt (its size or SHA-256 differs from meta.json's): delete it and run `python launch/prepare.py` "
                "again with the same settings (only that input file's shards are rebuilt)"
            )
        self._checked.add(shard.name)

    # --- fetching

    def ensure(self, shard: Shard, background: bool = False) -> None:
        """Make `shard` local: nothing to do for a shard read in place or already here, else fetch it now.
        In the background: one try, quietly (the reader retries, saying so, if it needs the shard before it is here)."""
        url = self.url(shard)
        path = self.path(shard)
        if url is None or (path.is_file() and path.stat().st_size == self.nbytes(shard)):
            return
        with self._shard_lock(shard.name):
            lock = FileLock(self.folder / f".{shard.name}.fetch.lock", f"fetch of {shard.name}", log=lambda _: None)
            lock.acquire()  # another process of this node may be fetching it
            try:
                if path.is_file() and path.stat().st_size == self.nbytes(shard):
                    return
                # room is made and reserved in one go, so two fetches of this process never both take it
                with self._guard:
                    self._make_room(self.nbytes(shard), shard.name)
                    self._reserved[shard.name] = self.nbytes(shard)
                try:
                    fetch(
                        url,
                        path,
                        self.nbytes(shard),
                        shard.sha256,
                        (lambda _: None) if background else self.log,
                        1 if background else FETCH_TRIES,
                    )
                finally:
                    with self._guard:
                        self._reserved.pop(shard.name, None)
                self._checked.add(shard.name)
            finally:
                lock.release(remove=True)

    def _shard_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def fetched(self) -> list[Shard]:
        """The shards of this store that were fetched into the data folder and are there now."""
        return [s for s in self.shards.values() if self.url(s) is not None and self.path(s).is_file()]

    def _make_room(self, need: int, for_name: str) -> None:
        """Delete fetched shards that are neither wanted nor pinned until `need` more bytes fit in the budget."""
        if not self.budget:
            return
        here = [s for s in self.fetched() if s.name not in self._reserved]
        used = sum(self.nbytes(s) for s in here) + sum(self._reserved.values())
        for s in here:
            if used + need <= self.budget:
                return
            if s.name in self.wanted or s.name in self.pinned or s.name == for_name:
                continue
            self.path(s).unlink(missing_ok=True)
            self._maps.pop(s.name, None)
            self._checked.discard(s.name)
            used -= self.nbytes(s)
        if used + need > self.budget:
            raise UserError(
                f"data.disk_budget_gb={self.budget / 1e9:g} cannot hold the shards needed at once ({(used + need) / 1e9:.2f} GB: the one being read, "
                f"data.prefetch_shards ahead and the val split): raise data.disk_budget_gb or lower data.prefetch_shards"
            )

    def plan(self, names: list[str]) -> None:
        """The reader needs `names` now and next, in that order: keep them, fetch the missing ones in the background."""
        self.wanted = set(names)
        missing = [n for n in names if self.url(self.shards[n]) is not None and not self.path(self.shards[n]).is_file()]
        if not missing:
            return
        for n in missing:
            if n not in self._queued:
                self._queued.add(n)
                self._queue.put(n)
        if self._thread is None:
            self._thread = threading.Thread(
                target=_prefetch, args=(weakref.ref(self), self._queue), name="shard-prefetch", daemon=True
            )
            self._thread.start()


def _prefetch(store_ref: weakref.ref, names: queue.Queue) -> None:
    """The background fetcher of a store: ends once the store is gone."""
    while True:
        try:
            name = names.get(timeout=1.0)
        except queue.Empty:
            if store_ref() is None:
                return
            continue
        store = store_ref()
        if store is None:
            return
        if name in store.wanted:
            with contextlib.suppress(Exception):  # the reader meets any failure itself, when it needs the shard
                store.ensure(store.shards[name], background=True)
        store._queued.discard(name)
        del store


# ----------------------------------------------------------------------------- a split


class ShardTokens:
    """The split's shards as one token sequence (what `TokenSplit.tokens` is for one array), read lazily.

    Supports len(), integer and slice indexing, and integer-array indexing; np.asarray() reads it all into memory.
    """

    def __init__(self, split: ShardedSplit):
        self.split = split
        self.dtype = split.store.dtype

    def __len__(self) -> int:
        return len(self.split)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        flat = idx.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range for a split of {len(self):,} tokens")
        shard = np.searchsorted(self.split.starts, flat, side="right") - 1
        out = np.empty(len(flat), dtype=self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.split.array(int(s))[flat[sel] - self.split.starts[s]]
        return out.reshape(idx.shape)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self._gather(np.arange(start, stop, step))
            parts = []
            s = max(int(np.searchsorted(self.split.starts, start, side="right")) - 1, 0)
            while start < stop:
                lo = start - int(self.split.starts[s])
                take = min(stop - start, int(self.split.sizes[s]) - lo)
                if take > 0:
                    parts.append(np.asarray(self.split.array(s)[lo : lo + take]))
                    start += take
                s += 1
            return np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self._gather(np.array([k]))[0]
        return self._gather(np.asarray(key, dtype=np.int64))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[0 : len(self)]
        return a.astype(dtype) if dtype is not None else a


class ShardedSplit:
    """One split of a sharded folder: its shards in stream order, memory-mapped lazily (fetched when remote).

    `len(split)` is its token count, `split.sizes` the tokens of each shard, `split.read(i, starts, n)` windows of
    shard i, and `split.tokens` the shards as one lazy sequence (for the evaluator).
    """

    sharded = True
    sft = False
    mask = None
    offsets = None
    pairs = 0
    ahead = 0  # shards to fetch ahead of the one being read (data.prefetch_shards)

    def __init__(self, name: str, shards: list[Shard], store: ShardStore):
        self.name, self.shards, self.store = name, shards, store
        self.sizes = np.array([s.tokens for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def tokens(self) -> ShardTokens:
        return ShardTokens(self)

    def array(self, i: int) -> np.ndarray:
        return self.store.array(self.shards[i].name)

    def read(self, i: int, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64: windows of shard i beginning at `starts`."""
        idx = starts[:, None] + np.arange(length)
        return self.array(i)[idx].astype(np.int64)

    def plan(self, shard_indices: list[int]) -> None:
        """The reader's next shards, in order (the store fetches ahead and may delete others)."""
        self.store.plan([self.shards[i].name for i in shard_indices])


def manifest_shards(meta: dict, split: str) -> list[Shard]:
    try:
        return [
            Shard(str(s["name"]), int(s["tokens"]), str(s["sha256"]), str(s.get("url", "")))
            for s in meta["shards"][split]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"meta.json's shard list is malformed ({type(e).__name__}: {e}): prepare the data again"
        ) from None


def open_sharded(
    data_dir: Path, split: str, meta: dict, budget_gb: float = 0.0, log: Callable[[str], None] = print
) -> ShardedSplit:
    """A split of a sharded folder. Its shards read in place must all be present and of the right size."""
    store = ShardStore(Path(data_dir), str(meta.get("base", "")), meta["dtype"], int(budget_gb * 1e9), log)
    shards = manifest_shards(meta, split)
    store.add(manifest_shards(meta, "val"), pin=True)  # the val split is read at every evaluation: never deleted
    store.add(shards, pin=split == "val")
    store.check_present(shards, split)
    return ShardedSplit(split, shards, store)
