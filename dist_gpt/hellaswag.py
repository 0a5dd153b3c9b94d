"""HellaSwag-style multiple choice: which ending of a context does the model find likeliest?

    python launch/evaluate.py --run runs/gpt2_124m --task hellaswag                       # downloads the val set when online
    python launch/evaluate.py --run runs/gpt2_124m --task hellaswag --data hellaswag_val.jsonl

Each item is a context and (usually four) endings, one of them right (`label`). Every ending is scored
in "completion style": the tokens of context + " " + ending go through the model, and the ending's tokens
are scored by their log-probabilities given everything before them. `acc` picks the ending with the
largest summed log-probability, `acc_norm` the one with the largest mean log-probability per ending
token (a long ending is not penalised for being long). Per token, not per character: that is the
normalisation of llm.c's completion-style HellaSwag, whose published figure for GPT-2 124M on the
10,042 validation items is acc 28.59%, acc_norm 29.55% (lm-evaluation-harness, which scores
"multiple-choice style" and normalises by characters, reports 28.92% / 31.14%); and for a char
tokenizer a token is a character anyway. A context longer than block_size is cut from the left; an
ending longer than block_size - 1 tokens is scored on the tokens that fit.

Rows of the file (jsonl): {"ctx": str (or "ctx_a" + "ctx_b"), "endings": [str, ...], "label": int}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_gpt.config import clip
from dist_gpt.errors import UserError

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE = Path("data/hellaswag")  # where the downloaded validation file is kept
REFERENCE = (
    "GPT-2 124M: acc 28.59%, acc_norm 29.55% on the 10,042 validation items (llm.c, the same completion-style scoring)"
)

Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)


@dataclass
class Item:
    context: str
    endings: list[str]
    label: int


@dataclass
class Row:
    """One ending of one item, ready for the model: inputs and targets (each <= block_size), the last `scored` targets are the ending's."""

    tokens: list[int]
    scored: int


@dataclass
class HellaSwagResult:
    run: str
    data: str
    items: int
    acc: float
    acc_norm: float
    reference: str = REFERENCE


# ----------------------------------------------------------------------------- the file


def read_items(path: Path) -> list[Item]:
    """The items of a HellaSwag jsonl file; a UserError names the first bad line."""
    if not path.is_file():
        raise UserError(f"--data: no such file: {path} (the HellaSwag validation jsonl)")
    items = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if line.strip():
                    items.append(_item(line, f"{path}:{number}"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not UTF-8 text (near byte {e.start} of a line): is it the HellaSwag jsonl?"
            ) from None
    if not items:
        raise UserError(f"{path} holds no items: it should be HellaSwag jsonl, one item per line")
    return items


def _item(line: str, where: str) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}): each line must be one HellaSwag item") from None
    if not isinstance(row, dict):
        raise UserError(f"{where} is {clip(row)}, not a JSON object with ctx, endings and label")
    context = row.get("ctx")
    if context is None and isinstance(row.get("ctx_a"), str) and isinstance(row.get("ctx_b"), str):
        context = f"{row['ctx_a']} {row['ctx_b']}".strip()
    endings, label = row.get("endings"), row.get("label")
    if not isinstance(context, str):
        raise UserError(f"{where} has no text in 'ctx' (or 'ctx_a' and 'ctx_b')")
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of at least two strings, got {clip(endings)}")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        hint = " (the HellaSwag test split has no labels; use the validation file)" if label is None else ""
        raise UserError(
            f"{where}: 'label' must be the index of the right ending, 0 to {len(endings) - 1}, got {clip(label)}{hint}"
        )
    return Item(context, list(endings), label)


def find_data(path: str, log: Callable[[str], None] = print) -> Path:
    """--data FILE, or the cached validation file, downloaded first when the network is on."""
    if path:
        return Path(path).expanduser()
    cached = CACHE / Path(VAL_URL).name
    if cached.is_file():
        return cached
    if any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        raise UserError(
            f"no HellaSwag file at {cached} and the network is off: download {VAL_URL} elsewhere and pass --data FILE.jsonl"
        )
    from dist_gpt.prepare import download  # the toolkit's one downloader (atomic, resumes nothing half-written)

    return download(VAL_URL, "", CACHE, log)


# ----------------------------------------------------------------------------- scoring


def item_rows(item: Item, tokenizer: Any, block_size: int, unknown: str = "error") -> list[Row]:
    """One Row per ending: context + " " + ending, left-truncated to block_size + 1 tokens."""
    context = tokenizer.encode_array(item.context, unknown=unknown).tolist()
    rows = []
    for ending in item.endings:
        end = tokenizer.encode_array(" " + ending, unknown=unknown).tolist()
        tokens = (context + end)[-(block_size + 1) :]
        rows.append(Row(tokens, min(len(end), len(tokens) - 1)))
    return rows


def batches(rows: list[Row], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, mask) (B, T): inputs padded with 0 at the right (causal attention: padding changes nothing before
    it), targets, and 1 where a target is an ending token."""
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        T = max(max(len(r.tokens) - 1 for r in chunk), 1)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)
        for b, r in enumerate(chunk):
            n = len(r.tokens) - 1
            if n > 0:
                x[b, :n] = torch.tensor(r.tokens[:-1])
                y[b, :n] = torch.tensor(r.tokens[1:])
                mask[b, n - r.scored : n] = True
        yield x, y, mask


@torch.no_grad()
def score_rows(
    forward: Forward, rows: list[Row], batch_size: int, device: torch.device | str = "cpu"
) -> list[tuple[float, int]]:
    """(summed log-probability, scored tokens) of each row's ending."""
    out = []
    for x, y, mask in batches(rows, batch_size):
        logits = forward(x.to(device)).float()  # (B, T, V)
        logp = logits.log_softmax(-1).gather(-1, y.to(device).unsqueeze(-1)).squeeze(-1)  # (B, T)
        sums = (logp * mask.to(device)).sum(-1)
        out += list(zip(sums.tolist(), mask.sum(-1).tolist(), strict=True))
    return out


def choose(scores: list[tuple[float, int]]) -> tuple[int, int]:
    """The ending with the largest summed log-probability, and the one with the largest mean per token
    (an ending with no scored token is never chosen). Ties go to the first."""
    total = [s if n else float("-inf") for s, n in scores]
    mean = [s / n if n else float("-inf") for s, n in scores]
    return max(range(len(total)), key=total.__getitem__), max(range(len(mean)), key=mean.__getitem__)


def predict(
    forward: Forward,
    items: list[Item],
    tokenizer: Any,
    block_size: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    unknown: str = "error",
) -> list[tuple[int, int]]:
    """(choice by total, choice by per-token mean) for every item; the forward passes batch rows across items."""
    rows = [item_rows(item, tokenizer, block_size, unknown) for item in items]
    flat = [r for item in rows for r in item]
    scores = score_rows(forward, flat, batch_size, device)
    choices, start = [], 0
    for item in rows:
        choices.append(choose(scores[start : start + len(item)]))
        start += len(item)
    return choices


def accuracy(items: list[Item], choices: list[tuple[int, int]]) -> tuple[float, float]:
    """(acc, acc_norm)."""
    n = len(items)
    return sum(c[0] == it.label for it, c in zip(items, choices, strict=True)) / n, sum(
        c[1] == it.label for it, c in zip(items, choices, strict=True)
    ) / n


def format_result(r: HellaSwagResult) -> str:
    rows = [
        ("run", r.run),
        ("data", r.data),
        ("items", f"{r.items:,}"),
        ("acc", f"{r.acc:.4f} (largest summed log-probability of the ending)"),
        ("acc_norm", f"{r.acc_norm:.4f} (largest mean log-probability per ending token)"),
        ("reference", r.reference),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)
