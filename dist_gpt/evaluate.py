"""Evaluate a run on a whole split or any text file: loss, perplexity, bits per token, character and byte.

    python launch/evaluate.py --run runs/shakespeare_char                        # the run's prepared val split
    python launch/evaluate.py --run runs/shakespeare_char --split train --json
    python launch/evaluate.py --run runs/shakespeare_char --data.source=other.txt --data.unknown=replace

Deterministic: no random batches. A document (the split's token stream, or each SFT pair) of N tokens
has N - 1 targets (the first token has no context), each scored exactly once. Windows of block_size
inputs tile the document without overlap; when N - 1 is not a multiple of block_size, the last window
is the document's last block_size inputs, of which only the targets not yet scored count (so the tail
keeps a full context). A document shorter than block_size + 1 is one short window. SFT pairs score
their response tokens only, as in training, and a pair never sees another pair's tokens.

bits per token = loss / ln 2; bits per character (byte) = total bits / characters (UTF-8 bytes) of the
decoded scored tokens. The decode runs in chunks of DECODE_CHUNK tokens; for byte-level BPE a chunk
edge inside a multi-byte character counts it as U+FFFD (never for ASCII text).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dist_gpt.config import shorten
from dist_gpt.errors import UserError
from dist_gpt.hellaswag import HellaSwagResult, accuracy, find_data, format_result, predict, read_items
from dist_gpt.model import IGNORE_INDEX

DECODE_CHUNK = 1 << 20


@dataclass
class Tokens:
    """What is evaluated: a flat token array cut into documents; `mask` (1 = may be scored) for SFT data."""

    ids: np.ndarray
    starts: np.ndarray  # int64: where each document starts, then the end
    mask: np.ndarray | None = None


@dataclass
class Result:
    run: str
    data: str
    tokens: int  # targets scored
    windows: int
    block_size: int
    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_token: float
    characters: int
    bits_per_char: float
    bytes: int
    bits_per_byte: float


def windows(starts: np.ndarray, block_size: int) -> np.ndarray:
    """(W, 3) int64 rows (start, length, skip): inputs ids[start : start + length], targets one further on,
    the first `skip` targets already scored by an earlier window (see the module docstring)."""
    rows = []
    T = block_size
    for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        n_targets = hi - lo - 1
        if n_targets < 1:
            continue
        full, rest = divmod(n_targets, T)
        rows += [(lo + k * T, T, 0) for k in range(full)]
        if rest:
            rows.append((hi - 1 - T, T, T - rest) if full else (lo, rest, 0))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def batches(data: Tokens, spec: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) int64 (B, T_max): windows padded with 0 in x and IGNORE_INDEX in y; y is IGNORE_INDEX wherever a target is not scored."""
    last = len(data.ids) - 1
    for i in range(0, len(spec), batch_size):
        start, length, skip = spec[i : i + batch_size].T
        pos = np.arange(int(length.max()))
        idx = start[:, None] + pos  # (B, T)
        valid = pos < length[:, None]
        scored = valid & (pos >= skip[:, None])
        x = np.where(valid, data.ids[np.minimum(idx, last)].astype(np.int64), 0)
        target_idx = np.minimum(idx + 1, last)
        if data.mask is not None:
            scored &= data.mask[target_idx] == 1
        y = np.where(scored, data.ids[target_idx].astype(np.int64), IGNORE_INDEX)
        yield torch.from_numpy(x), torch.from_numpy(y)


def scored_text_size(data: Tokens, tokenizer: Any) -> tuple[int, int]:
    """Characters and UTF-8 bytes of the decoded scored tokens (every token but each document's first; SFT: masked in)."""
    scored = np.ones(len(data.ids), dtype=bool)
    scored[data.starts[:-1][data.starts[:-1] < len(data.ids)]] = False
    if data.mask is not None:
        scored &= np.asarray(data.mask) == 1
    # run starts and ends, alternating
    edges = np.flatnonzero(np.diff(np.concatenate([[0], scored.astype(np.int8), [0]])))
    chars = nbytes = 0
    for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        for a in range(lo, hi, DECODE_CHUNK):
            text = tokenizer.decode(data.ids[a : min(hi, a + DECODE_CHUNK)].tolist())
            chars += len(text)
            nbytes += len(text.encode("utf-8", "surrogatepass"))
    return chars, nbytes


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Tokens, block_size: int, batch_size: int = 32) -> tuple[float, int, int]:
    """Total negative log-likelihood (nats), scored targets and windows of `data` under `model` (eval mode, fp32)."""
    model.eval()
    device = next(model.parameters()).device
    spec = windows(data.starts, block_size)
    total, count = 0.0, 0
    for x, y in batches(data, spec, batch_size):
        logits, _ = model(x.to(device))
        y = y.to(device)
        total += F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((y != IGNORE_INDEX).sum())
    return total, count, len(spec)


def summarize(
    run: str, what: str, nll: float, count: int, n_windows: int, block_size: int, chars: int, nbytes: int
) -> Result:
    if count == 0:
        raise UserError(f"{what} has no token to score (it needs at least two tokens)")
    loss, bits = nll / count, nll / math.log(2)
    return Result(
        run=run,
        data=what,
        tokens=count,
        windows=n_windows,
        block_size=block_size,
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_token=loss / math.log(2),
        characters=chars,
        bits_per_char=bits / chars if chars else float("nan"),
        bytes=nbytes,
        bits_per_byte=bits / nbytes if nbytes else float("nan"),
    )


# ----------------------------------------------------------------------------- where the tokens come from


def split_tokens(data_dir: Path, split: str, tokenizer: Any) -> Tokens:
    """A prepared split as one document (text) or one document per pair (SFT); its tokenizer must be the run's."""
    from dist_gpt.batches import load_meta, open_split

    meta = load_meta(data_dir)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        raise UserError(
            f"{data_dir} was prepared with a different tokenizer than the run's: evaluate that text with --data.source=PATH instead"
        )
    s = open_split(data_dir, split)
    if s.sft:
        return Tokens(np.asarray(s.tokens), np.asarray(s.offsets, dtype=np.int64), np.asarray(s.mask))
    ids = s.tokens if s.sharded else np.asarray(s.tokens)  # shards: one lazy sequence, read window by window
    return Tokens(ids, np.array([0, len(ids)], dtype=np.int64))


def file_tokens(path: Path, tokenizer: Any, unknown: str) -> Tokens:
    """A UTF-8 text file encoded with the run's tokenizer (`unknown`: a char vocabulary's missing characters)."""
    if not path.is_file():
        raise UserError(f"--data.source: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte offset {e.start}): convert it to UTF-8") from None
    ids = tokenizer.encode_array(text, unknown=unknown)
    return Tokens(np.asarray(ids), np.array([0, len(ids)], dtype=np.int64))


# ----------------------------------------------------------------------------- the command


MAX_BATCH = 4096  # windows (or HellaSwag endings) per forward pass


def build_parser() -> argparse.ArgumentParser:
    from dist_gpt.cli import ArgParser

    p = ArgParser(
        prog="launch/evaluate.py",
        description=__doc__.split("\n\n")[0] + " Deterministic: every token of the split or file, once. "
        "--task hellaswag scores HellaSwag-style multiple choice instead (dist_gpt/hellaswag.py).",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory written by pretrain or finetune")
    p.add_argument(
        "--task",
        default="lm",
        choices=("lm", "hellaswag"),
        help="lm: loss and bits on a split or file (default); hellaswag: multiple-choice accuracy",
    )
    p.add_argument("--split", default="val", choices=("val", "train"), help="prepared split to evaluate (default: val)")
    p.add_argument(
        "--data.source",
        dest="source",
        default="",
        metavar="PATH",
        help="evaluate this text file instead, encoded with the run's tokenizer",
    )
    p.add_argument(
        "--data.dir",
        dest="data_dir",
        default="",
        metavar="DIR",
        help="prepared data folder (default: the run's data.dir, or data/<data.name>)",
    )
    p.add_argument(
        "--data.unknown",
        dest="unknown",
        default="error",
        choices=("error", "drop", "replace"),
        help="characters outside a char vocabulary: error, drop, or replace (default: error)",
    )
    p.add_argument(
        "--data",
        dest="items",
        default="",
        metavar="FILE.jsonl",
        help="--task hellaswag: the HellaSwag jsonl (default: data/hellaswag/hellaswag_val.jsonl, downloaded when online)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=32,
        metavar="B",
        help=f"windows (or endings) per forward pass, at most {MAX_BATCH} (default: 32); changes speed, not the result",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def parse_args(args: list[str]) -> argparse.Namespace:
    opts = build_parser().parse_args(args)
    if not 1 <= opts.batch_size <= MAX_BATCH:
        raise UserError(f"--batch_size must be in [1, {MAX_BATCH}], got {opts.batch_size}")
    if opts.task == "hellaswag" and (opts.source or opts.data_dir):
        raise UserError("--data.source and --data.dir are for --task lm; --task hellaswag reads --data FILE.jsonl")
    if opts.task == "lm" and opts.items:
        raise UserError(
            "--data FILE.jsonl is the HellaSwag file: add --task hellaswag (for a text file use --data.source=PATH)"
        )
    return opts


@contextmanager
def out_of_memory_is_user_error(batch_size: int) -> Iterator[None]:
    """A forward pass that does not fit becomes one line that says what to lower."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError) and "memory" not in text.lower():
            raise
        raise UserError(
            f"out of memory at --batch_size {batch_size}: lower --batch_size ({shorten(text.splitlines()[0])})"
        ) from None


def format_table(r: Result) -> str:
    rows = [
        ("run", r.run),
        ("data", r.data),
        ("tokens", f"{r.tokens:,} scored in {r.windows:,} windows of up to {r.block_size}"),
        ("loss", f"{r.loss:.4f} nats/token"),
        ("perplexity", f"{r.perplexity:.3f}"),
        ("bits/token", f"{r.bits_per_token:.4f}"),
        ("bits/char", f"{r.bits_per_char:.4f} ({r.characters:,} characters)"),
        ("bits/byte", f"{r.bits_per_byte:.4f} ({r.bytes:,} UTF-8 bytes)"),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def main(args: list[str]) -> Result | HellaSwagResult:
    """The `launch/evaluate.py` command."""
    from dist_gpt.rundir import load_run
    from dist_gpt.sample import resolve_device

    opts = parse_args(args)
    device = resolve_device(opts.device)
    if opts.task == "hellaswag":
        return hellaswag(opts, device)
    run = load_run(opts.run, device=str(device))
    tok, T = run.tokenizer, run.config.model.block_size
    if opts.source:
        data, what = (
            file_tokens(Path(opts.source).expanduser(), tok, opts.unknown),
            f"{opts.source} ({tok.kind} tokenizer)",
        )
    else:
        data_dir = Path(opts.data_dir).expanduser() if opts.data_dir else run.config.data_dir
        if not (data_dir / "meta.json").is_file():
            raise UserError(
                f"the run's prepared data is not at {data_dir}: pass --data.dir=DIR (the prepared folder) or --data.source=PATH (a text file)"
            )
        data = split_tokens(data_dir, opts.split, tok)
        what = (
            f"{data_dir} ({opts.split} split{', SFT responses' if data.mask is not None else ''}, {tok.kind} tokenizer)"
        )
    with out_of_memory_is_user_error(opts.batch_size):
        nll, count, n_windows = evaluate(run.model, data, T, opts.batch_size)
    chars, nbytes = scored_text_size(data, tok)
    result = summarize(str(run.run_dir), what, nll, count, n_windows, T, chars, nbytes)
    print(json.dumps(asdict(result)) if opts.json else format_table(result), file=sys.stdout, flush=True)
    return result


def hellaswag(opts: argparse.Namespace, device: torch.device) -> HellaSwagResult:
    """--task hellaswag: accuracy of the run's model on the items of --data."""
    from dist_gpt.rundir import load_run

    path = find_data(opts.items, log=lambda m: print(m, file=sys.stderr))
    items = read_items(path)  # a bad file fails before the model loads
    run = load_run(opts.run, device=str(device))
    model = run.model.eval()
    with out_of_memory_is_user_error(opts.batch_size):
        choices = predict(
            lambda x: model(x)[0],
            items,
            run.tokenizer,
            run.config.model.block_size,
            opts.batch_size,
            device,
            opts.unknown,
        )
    acc, acc_norm = accuracy(items, choices)
    result = HellaSwagResult(run=str(run.run_dir), data=str(path), items=len(items), acc=acc, acc_norm=acc_norm)
    print(json.dumps(asdict(result)) if opts.json else format_result(result), file=sys.stdout, flush=True)
    return result
