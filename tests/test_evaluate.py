"""launch/evaluate.py: every target scored exactly once, the same numbers every time, bits per char/byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

from dist_gpt.batches import open_split
from dist_gpt.checkpoint import save_weights
from dist_gpt.config import Config, GPTConfig, save_config
from dist_gpt.errors import UserError
from dist_gpt.evaluate import Tokens, batches, evaluate, file_tokens, main, scored_text_size, split_tokens, windows
from dist_gpt.model import GPT, IGNORE_INDEX
from dist_gpt.prepare import prepare
from dist_gpt.rundir import load_run
from dist_gpt.tokenizers import train_tokenizer


def scored_targets(data: Tokens, block_size: int, batch_size: int) -> list[int]:
    """The flat positions of the targets the batches score (ids are positions, so y says where it is)."""
    out: list[int] = []
    for x, y in batches(data, windows(data.starts, block_size), batch_size):
        assert x.shape == y.shape and x.shape[1] <= block_size
        out += y[y != IGNORE_INDEX].tolist()
    return out


@pytest.mark.parametrize("block_size", [1, 4, 7, 32])
def test_every_target_scored_exactly_once(block_size):
    starts = np.array([0, 10, 11, 13, 40, 41, 70], dtype=np.int64)  # documents of 10, 1, 2, 27, 1, 29 tokens
    data = Tokens(np.arange(70), starts)
    firsts = set(starts[:-1].tolist())
    expected = [i for i in range(70) if i not in firsts]  # each document's first token has no context
    for batch_size in (1, 3, 64):
        assert sorted(scored_targets(data, block_size, batch_size)) == expected


def test_window_layout():
    """9 targets in windows of 4: two full windows, then the last 4 inputs with only the final target new."""
    assert windows(np.array([0, 10]), 4).tolist() == [[0, 4, 0], [4, 4, 0], [5, 4, 3]]
    assert windows(np.array([0, 3]), 4).tolist() == [[0, 2, 0]]  # shorter than a block: one short window
    assert windows(np.array([0, 9]), 4).tolist() == [[0, 4, 0], [4, 4, 0]]


def test_sft_scores_masked_targets_inside_their_pair():
    ids = np.arange(20)
    mask = np.zeros(20, dtype=np.uint8)
    mask[[3, 4, 5, 12, 13, 19]] = 1  # responses
    data = Tokens(ids, np.array([0, 8, 20]), mask)
    assert sorted(scored_targets(data, 4, 2)) == [3, 4, 5, 12, 13, 19]
    for x, y in batches(data, windows(data.starts, 4), 8):
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            seen = [t for t in row_x if t] + [t for t in row_y if t != IGNORE_INDEX]
            assert all(t < 8 for t in seen) or all(t >= 8 for t in seen)  # a window never mixes pairs


def test_matches_the_model_loss_and_is_deterministic():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)).eval()
    ids = torch.randint(0, 11, (8 * 5 + 1,))  # 40 targets: exactly 5 windows
    data = Tokens(ids.numpy(), np.array([0, len(ids)]))
    nll, count, n_windows = evaluate(model, data, 8, batch_size=2)
    assert (count, n_windows) == (40, 5)
    with torch.no_grad():
        _, reference = model(ids[:-1].view(5, 8), ids[1:].view(5, 8))
    assert nll / count == pytest.approx(reference.item(), rel=1e-6)
    assert evaluate(model, data, 8, batch_size=2) == (nll, count, n_windows)  # bit-identical on a second call
    # batching changes nothing but rounding
    assert evaluate(model, data, 8, batch_size=5)[0] == pytest.approx(nll, rel=1e-6)

    tail = Tokens(ids[:-3].numpy(), np.array([0, len(ids) - 3]))  # 37 targets: the last window scores 5 of its 8
    nll_tail, count_tail, _ = evaluate(model, tail, 8)
    with torch.no_grad():
        logits, _ = model(ids[29:37].view(1, 8))
    last5 = F.cross_entropy(logits[0, 3:], ids[33:38], reduction="sum").item()
    first32 = evaluate(model, Tokens(ids[:33].numpy(), np.array([0, 33])), 8)[0]  # the 4 full windows
    assert count_tail == 37
    assert nll_tail == pytest.approx(first32 + last5, rel=1e-6)


def test_chars_and_bytes_of_the_scored_text(shakespeare):
    text = "ROMEO: ¿Qué?\n" + shakespeare.read_text()[:3000] + "\n漢字 😀 end\n"
    bpe = train_tokenizer("bpe", [text], vocab_size=300)
    data = Tokens(np.asarray(bpe.encode(text)), np.array([0, len(bpe.encode(text))]))
    first = bpe.decode(data.ids[:1].tolist())
    assert scored_text_size(data, bpe) == (len(text) - len(first), len((text[len(first) :]).encode()))
    char = train_tokenizer("char", [text], 0)
    ids = char.encode_array(text)
    assert scored_text_size(Tokens(ids, np.array([0, len(ids)])), char) == (len(text) - 1, len(text[1:].encode()))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare) -> Path:
    """A tiny run with prepared char data (the run's config points at it)."""
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(shakespeare.read_text()[:30_000])
    cfg = Config()
    cfg.data.source, cfg.data.dir = str(root / "corpus.txt"), str(root / "data")
    prepare(cfg.data, data_dir=Path(cfg.data.dir), log=lambda _m: None)
    tok = train_tokenizer("char", [(root / "corpus.txt").read_text()], 0)
    cfg.model = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    save_config(cfg, root / "run" / "config.yaml")
    tok.save(root / "run" / "tokenizer.json")
    save_weights(GPT(cfg.model).state_dict(), root / "run" / "model.safetensors")
    return root / "run"


def test_cli_on_the_prepared_split(run_dir):
    result = run_script("evaluate.py", "--run", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    val = open_split(Path(run_dir).parent / "data", "val")
    assert r["tokens"] == len(val) - 1 == r["characters"] == r["bytes"]  # ASCII text, one token per character
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_token"] == pytest.approx(r["loss"] / math.log(2)) and r["bits_per_char"] == pytest.approx(
        r["bits_per_token"]
    )
    vocab = load_run(run_dir).tokenizer.vocab_size
    assert abs(r["loss"] - math.log(vocab)) < 0.5  # an untrained model: about ln(vocab)

    table = run_script("evaluate.py", "--run", str(run_dir), "--split", "train")
    assert table.returncode == 0, table.stderr
    assert "train split" in table.stdout and "bits/char" in table.stdout and "perplexity" in table.stdout


def test_text_file_and_errors(run_dir, tmp_path):
    text = "To be, or not to be: that is the question.\n" * 10  # 430 characters
    (tmp_path / "a.txt").write_text(text)
    r = main(["--run", str(run_dir), "--data.source", str(tmp_path / "a.txt"), "--batch_size", "3"])
    # 26 full windows of 16, then one for the last 13 targets
    assert r.tokens == len(text) - 1 == 429 and r.windows == 27

    (tmp_path / "b.txt").write_text("ROMEO: {unknown} chars\n")
    with pytest.raises(UserError, match=r"'\{'.*data.unknown"):
        main(["--run", str(run_dir), "--data.source", str(tmp_path / "b.txt")])
    assert (
        main(["--run", str(run_dir), "--data.source", str(tmp_path / "b.txt"), "--data.unknown", "drop"]).tokens
        == len("ROMEO: unknown chars\n") - 1
    )

    (tmp_path / "c.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        file_tokens(tmp_path / "c.txt", None, "error")
    with pytest.raises(UserError, match="not at"):
        main(["--run", str(run_dir), "--data.dir", str(tmp_path)])
    other = train_tokenizer("char", ["abc"], 0)
    data_dir = Path(run_dir).parent / "data"
    with pytest.raises(UserError, match="different tokenizer"):
        split_tokens(data_dir, "val", other)
