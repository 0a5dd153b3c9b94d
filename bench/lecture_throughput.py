"""The lecture model's training step: dist_gpt's GPT against nanoGPT's, in one process, interleaved (issue 14, part C).

One step = forward, backward, gradient clipping and an AdamW step, on the same random batch, for the lecture
model (6 x 6 x 384, block 256, dropout 0.2, vocab 65): dist_gpt's `GPT` with `trainer.make_optimizer`, and
nanoGPT's `GPT` with its `configure_optimizers` (nanoGPT's model.py is copied unmodified from $NANOGPT, default
../shared/anchors/nanogpt, into a temporary folder and imported from there). Variants isolate the model
differences: dist_gpt with exact GELU (nanoGPT's nn.GELU()) and/or without biases (nanoGPT's default bias=False).

Time per step is the process CPU time (time.process_time) by default: with --threads 1 that is the work done,
little moved by other processes on a shared machine, where wall time is not; --clock wall for a quiet machine.
--profile prints, per model, torch.profiler's self CPU time grouped into matmul, dropout, GELU, softmax,
LayerNorm, loss, optimizer and the rest, as shares of the step (shares compare; absolute times under load do not).

    python bench/lecture_throughput.py --threads 1 --batch 8 --rounds 10
    python bench/lecture_throughput.py --threads 1 --batch 8 --rounds 2 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_gpt.config import GPTConfig, TrainConfig  # noqa: E402
from dist_gpt.model import GPT  # noqa: E402
from dist_gpt.optim import make_optimizer  # noqa: E402

LECTURE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, vocab_size=65)
CATEGORIES = {  # profiler op name fragments -> category, first match wins
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "dropout": ("bernoulli", "dropout", "aten::div_"),
    "GELU": ("gelu",),
    "loss": ("cross_entropy", "nll_loss", "log_softmax"),
    "softmax / attention": ("softmax", "scaled_dot_product", "attention", "isneginf", "aten::where", "aten::all"),
    "LayerNorm": ("layer_norm",),
    "optimizer": ("lerp", "addcdiv", "aten::sqrt", "_foreach", "adam"),
}


def import_nanogpt(src: Path) -> tuple[type, type]:
    """nanoGPT's GPT and GPTConfig from an unmodified copy of its model.py in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="nanogpt_model_"))
    shutil.copy(src / "model.py", tmp / "nanogpt_model.py")
    sys.path.insert(0, str(tmp))
    import nanogpt_model

    return nanogpt_model.GPT, nanogpt_model.GPTConfig


def build(nanogpt: tuple[type, type]) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """The models to compare, each with its own optimizer, from the same seed."""

    def ours(exact_gelu: bool = False, bias: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(**LECTURE, bias=bias, attn_impl="sdpa", activation="gelu_exact" if exact_gelu else "gelu")
        )
        return model, make_optimizer(model, TrainConfig(lr=1e-3, beta2=0.99, weight_decay=0.1))

    def theirs(bias: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        NanoGPT, NanoConfig = nanogpt
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts
            model = NanoGPT(NanoConfig(**LECTURE, bias=bias))
            return model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    return {
        "dist_gpt (tanh GELU, biases)": ours(),
        "dist_gpt, exact GELU": ours(exact_gelu=True),
        "dist_gpt, no biases": ours(bias=False),
        "dist_gpt, exact GELU, no biases": ours(exact_gelu=True, bias=False),
        "nanoGPT (exact GELU, no biases)": theirs(),
        "nanoGPT with biases": theirs(bias=True),
    }


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def category(op: str) -> str:
    return next((name for name, parts in CATEGORIES.items() if any(p in op for p in parts)), "other")


def profile_shares(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Self CPU time per category as a share of the total, over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {name: value / whole for name, value in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (the lecture trains with 64)")
    p.add_argument("--rounds", type=int, default=10, help="timed steps per model, interleaved")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--profile", action="store_true", help="also print op shares by category (2 steps per model)")
    p.add_argument("--nanogpt", default=str(REPO.parent / "shared" / "anchors" / "nanogpt"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    models = build(import_nanogpt(Path(args.nanogpt)))
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randint(0, LECTURE["vocab_size"], (args.batch, LECTURE["block_size"]), generator=gen) for _ in range(2)
    )
    for model, opt in models.values():
        train_step(model, opt, x, y)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, opt) in models.items():
            start = clock()
            train_step(model, opt, x, y)
            times[name].append(clock() - start)

    tokens = args.batch * LECTURE["block_size"]
    ref = min(times["nanoGPT (exact GELU, no biases)"])
    shape = f"batch {args.batch} x {LECTURE['block_size']}"
    print(
        f"# torch {torch.__version__}, {args.threads} threads, {shape}, {args.rounds} rounds, {args.clock} time per step"
    )
    print("| model | min ms | median ms | tokens/s (min) | vs nanoGPT (min) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        print(
            f"| {name} | {min(ts) * 1e3:.0f} | {statistics.median(ts) * 1e3:.0f} | {tokens / min(ts):,.0f} | {ref / min(ts):.3f}x |"
        )
    if args.profile:
        shares = {name: profile_shares(lambda m=m, o=o: train_step(m, o, x, y), 2) for name, (m, o) in models.items()}
        names = [*CATEGORIES, "other"]
        print("\n| model | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for name, s in shares.items():
            print(f"| {name} | " + " | ".join(f"{100 * s.get(c, 0.0):.1f}%" for c in names) + " |")


if __name__ == "__main__":
    main()
