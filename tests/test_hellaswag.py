"""HellaSwag-style multiple choice: the file format, left truncation, batched scores equal to one-at-a-time
ones, and the exported transformers model choosing exactly what GPT chooses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from transformers import AutoModelForCausalLM

from dist_gpt.checkpoint import save_weights
from dist_gpt.config import Config, GPTConfig, save_config
from dist_gpt.errors import UserError
from dist_gpt.hellaswag import Item, accuracy, batches, choose, item_rows, predict, read_items, score_rows
from dist_gpt.hf import export_hf
from dist_gpt.model import GPT
from dist_gpt.rundir import load_run
from dist_gpt.tokenizers import train_tokenizer

FIXTURE = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"
BLOCK = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of a tiny random GPT (char tokenizer over the fixture's text), as pretrain leaves it."""
    path = tmp_path_factory.mktemp("hs") / "run"
    tok = train_tokenizer("char", [FIXTURE.read_text()], 0)
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # large enough that the endings get clearly different scores
    save_config(cfg, path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_weights(gpt.state_dict(), path / "model.safetensors")
    return path


def test_reads_the_fixture():
    items = read_items(FIXTURE)
    assert len(items) == 10 and all(len(it.endings) == 4 for it in items)
    assert [it.label for it in items] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert items[0].context == "A woman fills a kettle with water. she"
    assert items[4].context == "A gardener digs a row of small holes in the soil. she"  # from ctx_a + ctx_b (no ctx)


def test_rows_are_left_truncated_to_the_block(run_dir):
    tok = load_run(run_dir).tokenizer
    item = read_items(FIXTURE)[8]  # a context of 106 characters, endings of up to 36
    block = 48
    rows = item_rows(item, tok, block)
    for row, ending in zip(rows, item.endings, strict=True):
        end = tok.encode(" " + ending)
        assert len(row.tokens) == block + 1 and row.scored == len(end) and row.tokens[-len(end) :] == end
        # the context's end survives
        assert row.tokens[: -len(end)] == tok.encode(item.context)[-(block + 1 - len(end)) :]
    short = item_rows(Item("ab", ["cd"], 0), tok, BLOCK)[0]
    assert short.tokens == tok.encode("ab cd") and short.scored == 3
    long_end = item_rows(Item("a", ["b" * 100], 0), tok, BLOCK)[0]
    assert len(long_end.tokens) == BLOCK + 1 and long_end.scored == BLOCK  # only what fits is scored


def test_batched_scores_equal_one_row_at_a_time(run_dir):
    run = load_run(run_dir)
    model = run.model
    rows = [r for it in read_items(FIXTURE)[:4] for r in item_rows(it, run.tokenizer, BLOCK)]
    batched = score_rows(lambda x: model(x)[0], rows, batch_size=7)
    for row, (total, n) in zip(rows, batched, strict=True):
        x = torch.tensor([row.tokens[:-1]])
        with torch.no_grad():
            logp = model(x)[0].log_softmax(-1)[0, torch.arange(x.size(1)), torch.tensor(row.tokens[1:])]
        assert n == row.scored and total == pytest.approx(logp[-row.scored :].sum().item(), abs=1e-4)
    x, y, mask = next(batches(rows[:3], 3))
    assert x.shape == y.shape == mask.shape and mask.sum(-1).tolist() == [r.scored for r in rows[:3]]


def test_acc_sums_and_acc_norm_averages():
    assert choose([(-10.0, 10), (-6.0, 2), (-9.0, 3)]) == (1, 0)  # sums: -10, -6, -9; means: -1, -3, -3
    assert choose([(-1.0, 1), (-1.0, 1)]) == (0, 0)  # ties go to the first
    assert choose([(0.0, 0), (-5.0, 1)]) == (1, 1)  # an ending with nothing scored is never chosen
    items = [Item("c", ["a", "b"], 0), Item("c", ["a", "b"], 1)]
    assert accuracy(items, [(0, 1), (0, 1)]) == (0.5, 0.5)
    assert accuracy(items, [(0, 1), (1, 1)]) == (1.0, 0.5)


def test_the_transformers_export_makes_the_same_choices(run_dir, tmp_path):
    run = load_run(run_dir)
    items = read_items(FIXTURE)
    ours = predict(lambda x: run.model(x)[0], items, run.tokenizer, BLOCK, batch_size=8)
    # batching changes nothing
    assert predict(lambda x: run.model(x)[0], items, run.tokenizer, BLOCK, batch_size=1) == ours
    export_hf(run_dir, tmp_path / "hf", log=lambda _m: None)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = predict(lambda x: hf(x).logits, items, run.tokenizer, BLOCK, batch_size=8)
    assert theirs == ours
    assert len({c for pair in ours for c in pair}) > 1  # the random model does not choose one ending everywhere


def test_cli_reports_accuracy(run_dir):
    run = load_run(run_dir)
    items = read_items(FIXTURE)
    acc, acc_norm = accuracy(items, predict(lambda x: run.model(x)[0], items, run.tokenizer, BLOCK))
    out = run_script(
        "evaluate.py",
        "--run",
        str(run_dir),
        "--task",
        "hellaswag",
        "--data",
        str(FIXTURE),
        "--batch_size",
        "5",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["items"], result["acc"], result["acc_norm"]) == (10, acc, acc_norm)
    assert "29.55%" in result["reference"]
    table = run_script("evaluate.py", "--run", str(run_dir), "--task", "hellaswag", "--data", str(FIXTURE))
    assert table.returncode == 0 and f"acc_norm   {acc_norm:.4f}" in table.stdout


def test_bad_files(tmp_path):
    cases = {
        "not json": ("{", "x.jsonl:2 is not valid JSON"),
        "a list": ("[1]", "x.jsonl:2 is [1], not a JSON object"),
        "no context": (json.dumps({"endings": ["a", "b"], "label": 0}), "has no text in 'ctx'"),
        "one ending": (
            json.dumps({"ctx": "c", "endings": ["a"], "label": 0}),
            "'endings' must be a list of at least two strings",
        ),
        "label a bool": (
            json.dumps({"ctx": "c", "endings": ["a", "b"], "label": True}),
            "'label' must be the index of the right ending, 0 to 1, got True",
        ),
    }
    for what, (line, message) in cases.items():
        (tmp_path / "x.jsonl").write_text(
            json.dumps({"ctx": "c", "endings": ["a", "b"], "label": "1"}) + "\n" + line + "\n"
        )
        with pytest.raises(UserError) as e:
            read_items(tmp_path / "x.jsonl")
        assert message in str(e.value), what  # line 1 (a label given as text) is fine
    with pytest.raises(UserError, match="no such file"):
        read_items(tmp_path / "missing.jsonl")
