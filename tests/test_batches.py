"""Batches: the loaders over a prepared split (shapes, reproducibility, one global stream, resume, eval batches)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from dist_gpt.batches import BatchLoader, eval_batches, open_split
from dist_gpt.config import DataConfig
from dist_gpt.errors import UserError
from dist_gpt.prepare import prepare


def quiet(_: str) -> None:
    pass


def build(source, data_dir: Path, block_size: int = 0, **data_keys) -> dict:
    """`prepare` with DataConfig(source=source, **data_keys), quietly."""
    return prepare(DataConfig(source=str(source), **data_keys), data_dir=data_dir, log=quiet, block_size=block_size)


@pytest.fixture(scope="module")
def char_dir(shakespeare, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    build(shakespeare, out, block_size=256)
    return out


@pytest.fixture(scope="module")
def train_split(char_dir):
    return open_split(char_dir, "train")


def take(loader: BatchLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(n)]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_loader_shapes_and_shift(train_split, mode):
    loader = BatchLoader(train_split, block_size=32, batch_size=8, seed=1, mode=mode)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    haystack = np.asarray(train_split.tokens).tobytes()
    for row_x, row_y in zip(x, y, strict=True):  # x and y's last token: block_size + 1 consecutive tokens of the split
        assert haystack.find(torch.cat([row_x, row_y[-1:]]).numpy().astype(np.uint16).tobytes()) >= 0
    if mode == "sequential":
        tokens = torch.from_numpy(np.asarray(train_split.tokens[:80]).astype(np.int64))
        assert torch.equal(x[0], tokens[:32]) and torch.equal(x[1], tokens[32:64]) and torch.equal(y[0], tokens[1:33])


def test_loader_is_reproducible_and_ranks_differ(train_split):
    a = take(BatchLoader(train_split, 32, 8, seed=7), 3)
    b = take(BatchLoader(train_split, 32, 8, seed=7), 3)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    other_seed = take(BatchLoader(train_split, 32, 8, seed=8), 1)[0]
    rank1 = take(BatchLoader(train_split, 32, 8, seed=7, rank=1, world_size=2), 1)[0]
    rank0 = take(BatchLoader(train_split, 32, 8, seed=7, rank=0, world_size=2), 1)[0]
    assert not torch.equal(a[0], other_seed) and not torch.equal(rank0, rank1)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_one_global_stream_8_eq_4_plus_4_eq_2x4(train_split, mode):
    one = take(BatchLoader(train_split, 16, 8, seed=3, mode=mode), 1)[0]
    halves = torch.cat(take(BatchLoader(train_split, 16, 4, seed=3, mode=mode), 2))
    ranks = torch.cat(
        [take(BatchLoader(train_split, 16, 4, seed=3, rank=r, world_size=2, mode=mode), 1)[0] for r in range(2)]
    )
    assert torch.equal(one, halves) and torch.equal(one, ranks)


def test_state_dict_resumes_exactly_with_any_world_size(train_split):
    loader = BatchLoader(train_split, 16, 4, seed=5)
    take(loader, 1500)  # past a few generator blocks
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 3)
    resumed = BatchLoader(train_split, 16, 4, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(take(resumed, 3), expected, strict=True))
    # the same stream continued by two processes with half the batch each
    two = [BatchLoader(train_split, 16, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([loader.next_batch()[0] for loader in two]), expected[0])
    with pytest.raises(UserError, match="seed"):
        BatchLoader(train_split, 16, 4, seed=6).load_state_dict(state)


def test_sequential_walks_each_window_once_per_epoch(tmp_path):
    (tmp_path / "c.txt").write_text("".join(chr(ord("a") + i % 26) for i in range(641)), encoding="utf-8")
    build(tmp_path / "c.txt", tmp_path / "out", val_fraction=0.5)
    split = open_split(tmp_path / "out", "train")  # 320 tokens: 19 windows of 16 (and the last one's target)
    ranks = [BatchLoader(split, 16, 2, seed=0, rank=r, world_size=2, mode="sequential") for r in range(2)]
    seen = []
    for _ in range(5):  # 5 steps x 2 ranks x 2 samples: the 19 windows once each, then the first again
        for loader in ranks:
            seen += [row.tolist() for row in loader.next_batch()[0]]
    windows = [split.tokens[16 * w : 16 * w + 16].tolist() for w in range(19)]
    assert seen == windows + windows[:1]


def test_eval_batches_are_fixed_and_independent_of_world_size(train_split):
    one = list(eval_batches(train_split, 16, 4, n_batches=5, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, eval_batches(train_split, 16, 4, 5, seed=1), strict=True))
    by_rank = {r: list(eval_batches(train_split, 16, 4, 5, seed=1, rank=r, world_size=2)) for r in range(2)}
    assert len(by_rank[0]) == 3 and len(by_rank[1]) == 2
    for b, (x, _) in enumerate(one):
        assert torch.equal(by_rank[b % 2][b // 2][0], x)
    # not the training stream
    assert not torch.equal(one[0][0], BatchLoader(train_split, 16, 4, seed=1).next_batch()[0])


def test_a_split_shorter_than_a_block_is_one_error(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    build(tmp_path / "c.txt", tmp_path / "out")
    with pytest.raises(UserError, match=r"the val split has 10 tokens, fewer than block_size \+ 1 = 17"):
        BatchLoader(open_split(tmp_path / "out", "val"), block_size=16, batch_size=2, seed=0)
    with pytest.raises(UserError, match=r"the val split has 10 tokens, fewer than block_size \+ 1 = 17"):
        eval_batches(open_split(tmp_path / "out", "val"), 16, 2, n_batches=1, seed=0)


def test_reading_batches_does_not_import_datasets():
    code = "import dist_gpt.batches, sys; assert 'datasets' not in sys.modules, 'datasets was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
