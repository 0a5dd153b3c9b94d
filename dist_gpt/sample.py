"""Sample text from a trained run: `python launch/sample.py --run RUN_DIR --prompt TEXT [...]`.

Only the samples go to stdout (each is the prompt followed by its continuation), so the output can be
piped; loading messages, timing and warnings go to stderr. One sample is streamed as it is produced.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

import torch

from dist_gpt.cli import ArgParser
from dist_gpt.config import clip
from dist_gpt.errors import UserError

SEPARATOR = "---------------"

DESCRIPTION = """\
Sample from a trained run. Loads RUN_DIR/model.safetensors, RUN_DIR/tokenizer.json and
RUN_DIR/config.yaml, and prints each sample (the prompt followed by its continuation) on stdout;
everything else goes to stderr. The same --seed gives the same output."""

EPILOG = """\
examples:
  python launch/sample.py --run runs/shakespeare_char --prompt "ROMEO:" --max_new_tokens 300
  python launch/sample.py --run runs/shakespeare_char --prompt $'\\n' --num_samples 3 --temperature 0.8 --top_k 50
  python launch/sample.py --run runs/sonnets_sft --chat --prompt "Write about the sea" --temperature 0"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="launch/sample.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run",
        required=True,
        metavar="RUN_DIR",
        help="run directory written by pretrain or finetune (holds model.safetensors, tokenizer.json, config.yaml)",
    )
    p.add_argument(
        "--prompt",
        required=True,
        metavar="TEXT",
        help="text to continue; every character must be known to the run's tokenizer",
    )
    p.add_argument(
        "--max_new_tokens",
        type=int,
        default=500,
        metavar="N",
        help="tokens to generate per sample, at most 1,000,000 (default: 500)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="divide the logits by T before sampling; 0 is greedy (always the likeliest token), otherwise T >= 1e-6 (default: 1.0)",
    )
    p.add_argument(
        "--top_k", type=int, default=None, metavar="K", help="sample only among the K likeliest tokens (default: all)"
    )
    p.add_argument(
        "--top_p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling: only the smallest set of likeliest tokens whose probability reaches P, 0 < P <= 1 (default: all)",
    )
    p.add_argument(
        "--num_samples",
        type=int,
        default=1,
        metavar="N",
        help="independent samples (at most 1024), generated as one batch and separated by a line of dashes (default: 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1337,
        metavar="S",
        help="random seed in [0, 2**63 - 1]; the same seed gives the same output (default: 1337)",
    )
    p.add_argument(
        "--no_kv_cache",
        action="store_true",
        help="recompute the whole context at every step instead of using the KV cache (slower; for comparison)",
    )
    p.add_argument("--device", default="cpu", help="where to run: cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the SFT template (for runs fine-tuned with finetune.kind=sft) and stop at the end of the response",
    )
    return p


MAX_NEW_TOKENS = 1_000_000  # per sample, one command
MAX_SAMPLES = 1024  # generated as one batch
MAX_SEED = 2**63 - 1


def parse_args(args: list[str]) -> argparse.Namespace:
    from dist_gpt.model import _check_sampling  # the model's own check of temperature, top_k and top_p

    opts = build_parser().parse_args(args)
    if not 0 <= opts.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max_new_tokens must be in [0, {MAX_NEW_TOKENS:,}], got {clip(opts.max_new_tokens)}")
    if not 1 <= opts.num_samples <= MAX_SAMPLES:
        raise UserError(
            f"--num_samples must be in [1, {MAX_SAMPLES}] (they are generated as one batch), got {clip(opts.num_samples)}"
        )
    if not 0 <= opts.seed <= MAX_SEED:
        raise UserError(f"--seed must be in [0, 2**63 - 1], got {clip(opts.seed)}")
    try:
        _check_sampling(opts.temperature, opts.top_k, opts.top_p)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    if not opts.prompt:
        raise UserError("--prompt is empty: give at least one character, e.g. --prompt $'\\n'")
    return opts


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device this machine has: cpu, cuda, cuda:N, or mps (Apple GPUs); anything else is a UserError."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {clip(name)} is not a device name (try cpu or cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {clip(name)}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {clip(name)}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {clip(name)}: no Apple GPU (MPS) is available here; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {clip(name)} is not supported: use cpu, cuda, cuda:N or mps")
    return device


def check_finite(model: torch.nn.Module, run_dir: Any) -> None:
    """NaN or inf weights give NaN probabilities: refuse them by name instead of failing in the sampler."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(
            f"{run_dir}/model.safetensors holds NaN or inf weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): the run diverged; sample an earlier checkpoint"
        )


def chat_prompt(prompt: str) -> tuple[str, str]:
    """The prompt wrapped in the SFT template, and the text that ends a response (both from dist_gpt.tokenizers)."""
    from dist_gpt.tokenizers import RESPONSE_END, render_prompt

    return render_prompt(prompt), RESPONSE_END


def encode_prompt(tokenizer: Any, text: str, vocab_size: int) -> list[int]:
    """The prompt's token ids, or a UserError naming the characters the tokenizer cannot encode."""
    missing = getattr(tokenizer, "missing", None)  # the char tokenizer knows a fixed set of characters
    if missing is not None and missing(text):
        unknown = list(missing(text))
        shown = ", ".join(repr(c) for c in unknown[:20]) + (
            f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        )
        raise UserError(
            f"the prompt has characters that the run's {tokenizer.kind} tokenizer does not know: {shown}; leave them out"
        )
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a longer --prompt")
    if max(ids) >= vocab_size:
        raise UserError(
            f"the prompt has token id {max(ids)}, outside the model's vocabulary of {vocab_size}; is tokenizer.json the run's own?"
        )
    return ids


class StreamPrinter:
    """Writes a continuation as its tokens arrive: only text that is final (no half UTF-8 character, no
    possible start of the stop string) is written, and nothing from the stop string on."""

    def __init__(self, tokenizer: Any, out: TextIO, stop: str | None = None):
        self.tokenizer, self.out, self.stop = tokenizer, out, stop
        self.ids: list[int] = []
        self.written = 0
        self.stopped = False

    def feed(self, token: int) -> bool:
        """Add one token; write what is now certain. True once the stop string has appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if self.stop and self.stop in text:
            self.stopped = True
            self._write(text[: text.index(self.stop)])
            return True
        self._write(text[: len(text) - self._held_back(text)])
        return False

    def finish(self) -> None:
        if not self.stopped:
            self._write(self.tokenizer.decode(self.ids))
        self.out.write("\n")
        self.out.flush()

    def _held_back(self, text: str) -> int:
        """Characters at the end of text that may still change: a partial UTF-8 sequence or a prefix of the stop string."""
        n = len(text) - len(text.rstrip("\ufffd"))
        if self.stop:
            n = max(n, max((k for k in range(1, len(self.stop)) if text.endswith(self.stop[:k])), default=0))
        return n

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            self.out.write(text[self.written :])
            self.out.flush()
            self.written = len(text)


def cut_at(text: str, stop: str | None) -> str:
    return text[: text.index(stop)] if stop and stop in text else text


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompt_text: str,
    ids: list[int],
    opts: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    stop: str | None = None,
) -> int:
    """Print opts.num_samples continuations of prompt_text (token ids `ids`); returns the number of tokens generated."""
    device = next(model.parameters()).device
    if len(ids) > model.config.block_size:
        print(
            f"warning: the prompt has {len(ids)} tokens, more than block_size {model.config.block_size}; the model sees the last {model.config.block_size}",
            file=err,
        )
    torch.manual_seed(opts.seed)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    idx = torch.tensor([ids] * opts.num_samples, dtype=torch.long, device=device)  # (N, T0)
    stream = model.generate_stream(
        idx,
        opts.max_new_tokens,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        generator=generator,
        use_cache=not opts.no_kv_cache,
    )

    if opts.num_samples == 1:  # stream the one sample as it comes
        out.write(prompt_text)
        out.flush()
        printer = StreamPrinter(tokenizer, out, stop)
        for token in stream:
            if printer.feed(int(token[0])):
                break
        printer.finish()
        return len(printer.ids)

    rows: list[list[int]] = [[] for _ in range(opts.num_samples)]
    for token in stream:
        for row, t in zip(rows, token.tolist(), strict=True):
            row.append(t)
        if stop and all(stop in tokenizer.decode(row) for row in rows):
            break
    for i, row in enumerate(rows):
        if i:
            out.write(SEPARATOR + "\n")
        out.write(prompt_text + cut_at(tokenizer.decode(row), stop) + "\n")
    out.flush()
    return len(rows[0]) * len(rows)


def sample(args: list[str]) -> None:
    """The `launch/sample.py` command: parse args, load the run, print the samples."""
    from dist_gpt.rundir import load_run

    opts = parse_args(args)
    device = resolve_device(opts.device)
    run = load_run(opts.run, device=str(device))
    check_finite(run.model, run.run_dir)
    prompt_text, stop = opts.prompt, None
    if opts.chat:
        prompt_text, stop = chat_prompt(opts.prompt)
    ids = encode_prompt(run.tokenizer, prompt_text, run.config.model.vocab_size)  # fails before anything is printed
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"loaded run {run.run_dir} ({n_params / 1e6:.2f}M parameters, {run.config.model.kind}, tokenizer {getattr(run.tokenizer, 'kind', '?')}) on {device}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    try:
        n_tokens = generate_samples(run.model, run.tokenizer, prompt_text, ids, opts, sys.stdout, sys.stderr, stop)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    elapsed = time.perf_counter() - start
    cache = "off" if opts.no_kv_cache else "on"
    print(
        f"{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / max(elapsed, 1e-9):.1f} tokens/s (KV cache {cache}, seed {opts.seed})",
        file=sys.stderr,
    )
