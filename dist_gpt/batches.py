"""Batches: prepared token arrays on disk -> (x, y) batches for the trainer and the evaluator.

    loader = BatchLoader(open_split("data/shakespeare_char", "train"), block_size=256, batch_size=64, seed=1337)
    x, y = loader.next_batch()  # int64 (B, T); y is x shifted by one

A prepared folder (see prepare.py) holds `train.bin`, `val.bin` (raw token ids, dtype from meta.json),
`tokenizer.json` and `meta.json`; SFT data adds `SPLIT.mask.bin` (uint8, 1 = a response token) and
`SPLIT.idx.bin` (int64 start offsets of the pairs, plus the end). Files that do not match meta.json
never count.

A loader walks ONE global stream of samples. Sample j is a window of block_size + 1 tokens
(random mode: a start drawn by a generator seeded by (seed, j // 1024); sequential mode: the j-th
non-overlapping window, wrapping) or, for SFT, a pair. On rank r a call takes samples
position + r*B ... position + r*B + B - 1, then position += world_size * B, so the samples seen do not
depend on how they are spread over processes, and `state_dict()` resumes exactly, with any world size.
Every rank must use the same seed.

A sharded folder (shards.py: many token files and a manifest) gives a `ShardedSplit` with the same
interface. A window never straddles two shards: shard i holds w_i = (n_i - 1) // block_size windows of
block_size + 1 tokens at stride block_size, and an epoch is the sum of the w_i samples. Sample j is in
epoch e = j // epoch_samples; shard and start are a pure function of (seed, j), so resume is exact on
any world size, as above:
- random: the shards of epoch e are read in a seeded permutation (seed, e); each shard's windows in a
  seeded permutation (seed, e, shard), all shifted by a seeded offset in [0, n_i - w_i * block_size).
  So an epoch reads every token of every shard once (but < block_size + 1 at a shard's ends), one
  shard after another, in random window order, and every epoch differs;
- sequential: shards in manifest order, windows in order from each shard's first token.
Evaluation batches of a sharded split are its first windows in order (the same every time), so a val
split of block_size * eval_iters * batch_size + 1 tokens is scored exactly once per evaluation.
While reading a shard, the loader tells the split which shards come next (data.prefetch_shards of them),
so remote shards arrive before they are needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_gpt.errors import UserError
from dist_gpt.io import read_json
from dist_gpt.shards import LAYOUT, ShardedSplit, open_sharded

if TYPE_CHECKING:
    import torch

    from dist_gpt.config import DataConfig

SPLITS = ("train", "val")
SAMPLE_BLOCK = 1024  # random draws per generator seed: sample j uses the generator of block j // SAMPLE_BLOCK
ORDER_TAG, WINDOW_TAG = 0x5348_4F52, 0x5348_5749  # seed-sequence tags of a sharded split's shard order and window order


# ----------------------------------------------------------------------------- reading


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{data_dir} holds no prepared data (meta.json is missing): run `python launch/prepare.py --config CONFIG`"
        )
    return read_json(path, "meta file")


@dataclass
class TokenSplit:
    """One prepared split: memory-mapped tokens and, for SFT, the loss mask and the pair offsets."""

    name: str
    tokens: np.ndarray
    mask: np.ndarray | None = None
    offsets: np.ndarray | None = None  # int64: start of each pair, then the end
    sharded = False

    @property
    def sft(self) -> bool:
        return self.offsets is not None

    @property
    def pairs(self) -> int:
        return len(self.offsets) - 1 if self.offsets is not None else 0

    def __len__(self) -> int:
        return len(self.tokens)


def split_files(meta: dict) -> dict[str, int]:
    """Expected size in bytes of each prepared array file."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    sizes = {}
    if meta.get("layout") == LAYOUT:
        return {s["name"]: s["tokens"] * itemsize for split in SPLITS for s in meta["shards"][split]}
    for split in SPLITS:
        n = meta["tokens"][split]
        sizes[f"{split}.bin"] = n * itemsize
        if meta.get("sft"):
            sizes[f"{split}.mask.bin"] = n
            sizes[f"{split}.idx.bin"] = (meta["documents"][split] + 1) * 8
    return sizes


def check_split_size(name: str, n_tokens: int, block_size: int) -> None:
    """A split must hold at least one window of block_size + 1 tokens (and at least 2 tokens)."""
    if n_tokens < max(block_size + 1, 2):
        raise UserError(
            f"the {name} split has {n_tokens:,} tokens, fewer than block_size + 1 = {block_size + 1}: "
            "use a larger corpus, change data.val_fraction, or lower model.block_size"
        )


def open_split(data_dir: str | Path, split: str, data: DataConfig | None = None) -> TokenSplit | ShardedSplit:
    """A prepared split, memory-mapped: one array, or shards (`data` gives a sharded split its disk budget and prefetch)."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    if meta.get("layout") == LAYOUT:
        sharded = open_sharded(data_dir, split, meta, budget_gb=data.disk_budget_gb if data else 0.0)
        sharded.ahead = data.prefetch_shards if data else 0
        return sharded
    for name, size in split_files(meta).items():
        path = data_dir / name
        if name.startswith(f"{split}.") and (not path.is_file() or path.stat().st_size != size):
            raise UserError(f"{path} is missing or does not match meta.json: run `python launch/prepare.py` again")
    tokens = np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
    if not meta.get("sft"):
        return TokenSplit(split, tokens)
    mask = np.memmap(data_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
    offsets = np.fromfile(data_dir / f"{split}.idx.bin", dtype=np.int64)
    return TokenSplit(split, tokens, mask, offsets)


# ----------------------------------------------------------------------------- batches


class _ShardWindows:
    """Sample j of a sharded split -> (shard, start of its window), a pure function of (seed, stream, j); see the module docstring."""

    def __init__(self, split: ShardedSplit, block_size: int, key: list[int], mode: str):
        self.T, self.key, self.mode, self.sizes = block_size, key, mode, split.sizes
        self.windows = np.maximum((split.sizes - 1) // block_size, 0)  # per shard: windows of T + 1 tokens at stride T
        self.usable = np.flatnonzero(self.windows > 0)
        self.per_epoch = int(self.windows.sum())
        if self.per_epoch == 0:
            raise UserError(
                f"no shard of the {split.name} split holds block_size + 1 = {block_size + 1} tokens (the largest has {int(split.sizes.max(initial=0)):,}), "
                "and a window never straddles two shards: prepare with a larger data.shard_tokens, or lower model.block_size"
            )
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._within: dict[tuple[int, int], tuple[np.ndarray, int]] = {}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards in epoch `epoch`'s reading order, and the windows before each (cumulative, then the total)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            order = (
                self.usable
                if self.mode == "sequential"
                else np.random.default_rng([*self.key, ORDER_TAG, epoch]).permutation(self.usable)
            )
            self._orders[epoch] = order, np.concatenate([[0], np.cumsum(self.windows[order])])
        return self._orders[epoch]

    def _shuffle(self, epoch: int, shard: int) -> tuple[np.ndarray, int]:
        """Shard `shard`'s window order in epoch `epoch`, and the offset of its first window."""
        key = (epoch, shard)
        if key not in self._within:
            if len(self._within) > 8:
                self._within.clear()
            rng = np.random.default_rng([*self.key, WINDOW_TAG, epoch, shard])
            w = int(self.windows[shard])
            self._within[key] = rng.permutation(w), int(rng.integers(0, self.sizes[shard] - w * self.T))
        return self._within[key]

    def _position(self, j: int) -> tuple[int, int]:
        """(epoch, place in that epoch's shard order) of sample j."""
        epoch, r = divmod(j, self.per_epoch)
        return epoch, int(np.searchsorted(self.order(epoch)[1], r, side="right")) - 1

    def locate(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, start) int64 arrays for the samples js."""
        epochs, r = np.divmod(js, self.per_epoch)
        shards, q = np.empty(len(js), dtype=np.int64), np.empty(len(js), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            order, cum = self.order(int(e))
            k = np.searchsorted(cum, r[sel], side="right") - 1
            shards[sel], q[sel] = order[k], r[sel] - cum[k]
        if self.mode == "sequential":
            return shards, q * self.T
        starts = np.empty(len(js), dtype=np.int64)
        for e, s in {(int(e), int(s)) for e, s in zip(epochs, shards, strict=True)}:
            sel = (epochs == e) & (shards == s)
            perm, shift = self._shuffle(e, s)
            starts[sel] = shift + perm[q[sel]] * self.T
        return shards, starts

    def ahead(self, j: int, n: int) -> list[int]:
        """The shard of sample j and the next n distinct shards the stream reads after it."""
        epoch, k = self._position(j)
        out: list[int] = []
        while len(out) < min(n + 1, len(self.usable)):
            order = self.order(epoch)[0]
            for s in order[k:].tolist():
                if s not in out:
                    out.append(s)
                if len(out) == min(n + 1, len(self.usable)):
                    break
            epoch, k = epoch + 1, 0
        return out


class _Sampler:
    """Sample j of a stream -> (x, y): a window of the tokens or an SFT pair, fixed by (seed, stream, j)."""

    def __init__(self, split: TokenSplit | ShardedSplit, block_size: int, seed: int, mode: str, stream: int):
        if mode not in ("random", "sequential"):
            raise UserError(f"data.loader must be random or sequential, got {mode!r}")
        self.split, self.T, self.mode = split, block_size, mode
        self.key = [seed % (1 << 64), stream]
        if split.sharded:
            self.windows = _ShardWindows(split, block_size, self.key, mode)
            return
        if split.sft:
            self.n = split.pairs
            if self.n < 1:
                raise UserError(
                    f"the {split.name} split has no prompt/response pairs: prepare it again with more pairs"
                )
        else:
            check_split_size(split.name, len(split), block_size)
            self.n = len(split) - block_size if mode == "random" else (len(split) - 1) // block_size
        self._blocks: dict[int, np.ndarray] = {}

    def _draw(self, js: np.ndarray) -> np.ndarray:
        """Random ints in [0, n) for samples js, SAMPLE_BLOCK draws per seeded generator."""
        out = np.empty(len(js), dtype=np.int64)
        blocks = js // SAMPLE_BLOCK
        for b in np.unique(blocks):
            if b not in self._blocks:
                if len(self._blocks) > 2:
                    self._blocks.clear()
                self._blocks[b] = np.random.default_rng([*self.key, int(b)]).integers(0, self.n, SAMPLE_BLOCK)
            sel = blocks == b
            out[sel] = self._blocks[b][js[sel] % SAMPLE_BLOCK]
        return out

    def batch(self, js: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self.split.sharded:
            shards, starts = self.windows.locate(js)
            seq = np.empty((len(js), self.T + 1), dtype=np.int64)
            for s in np.unique(shards):
                seq[shards == s] = self.split.read(int(s), starts[shards == s], self.T + 1)
            return torch.from_numpy(seq[:, :-1]), torch.from_numpy(seq[:, 1:])
        picks = self._draw(js) if self.mode == "random" else js % self.n
        T, tokens = self.T, self.split.tokens
        if not self.split.sft:
            starts = picks if self.mode == "random" else picks * T
            idx = starts[:, None] + np.arange(T)
            return torch.from_numpy(tokens[idx].astype(np.int64)), torch.from_numpy(tokens[idx + 1].astype(np.int64))
        # SFT: the pair's first T + 1 tokens; x padded with 0, y with -100, and -100 wherever the target is prompt
        starts, ends = self.split.offsets[picks], self.split.offsets[picks + 1]
        idx = starts[:, None] + np.arange(T + 1)
        inside = idx < ends[:, None]
        idx = np.minimum(idx, len(tokens) - 1)
        seq, mask = tokens[idx].astype(np.int64), self.split.mask[idx]
        keep = inside[:, 1:]
        x = np.where(keep, seq[:, :-1], 0)
        y = np.where(keep & (mask[:, 1:] == 1), seq[:, 1:], -100)
        return torch.from_numpy(x), torch.from_numpy(y)


class BatchLoader:
    """Batches of (x, y), int64 (batch_size, block_size), from one global stream of samples (see the module docstring)."""

    def __init__(
        self,
        split: TokenSplit | ShardedSplit,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "random",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size, self.mode = seed, rank, world_size, mode
        self._sampler = _Sampler(split, block_size, seed, mode, stream=0)
        self.position = 0  # samples the whole world has taken so far

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        js = self.position + self.rank * self.batch_size + np.arange(self.batch_size)
        if self.split.sharded:  # every rank plans the same shards: the one being read and the next ones
            self.split.plan(self._sampler.windows.ahead(self.position, self.split.ahead))
        self.position += self.world_size * self.batch_size
        return self._sampler.batch(js)

    @property
    def truncated(self) -> int:
        """SFT pairs longer than block_size + 1 tokens (their tails are never trained on)."""
        if not self.split.sft:
            return 0
        return int((np.diff(self.split.offsets) > self.block_size + 1).sum())

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "mode": self.mode, "split": self.split.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "mode"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"the checkpoint's data loader used {key}={state[key]!r}, this run {getattr(self, key)!r}: resume with the same setting"
                )
        self.position = int(state["position"])


def eval_batches(
    split: TokenSplit | ShardedSplit,
    block_size: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same n_batches batches at every evaluation (random windows; a sharded split's first windows in order);
    batch b is evaluated by rank b % world_size."""
    sampler = _Sampler(split, block_size, seed, "sequential" if split.sharded else "random", stream=1)
    return (sampler.batch(b * batch_size + np.arange(batch_size)) for b in range(rank, n_batches, world_size))


class DeviceBatches:
    """The loader's batches one ahead, copied to the device without blocking (pinned memory on CUDA), so the next batch
    is cut while the device still computes. Its state is that of the next batch to be used, so resume stays exact."""

    def __init__(self, loader: BatchLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.ahead: tuple[torch.Tensor, torch.Tensor] | None = None
        self.state_before_ahead = loader.state_dict()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ahead is None:
            self.ahead = self._fetch()
        batch, self.ahead = self.ahead, None
        self.ahead = self._fetch()
        return batch

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.state_before_ahead = self.loader.state_dict()
        x, y = self.loader.next_batch()
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return self.state_before_ahead if self.ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self.ahead = None
