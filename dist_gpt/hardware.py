"""Precision and kernel choices decided by what runs fast on the machine at hand.

`train.mixed_precision=auto`, `model.attn_impl=auto` and the dtype of Muon's Newton-Schulz iteration are
decided here, from capability facts (CPU flags, CUDA compute capability) and, on CPUs, a short measurement
at the model's shapes. The trainer calls it once, on the main process, after setting the thread count:

    decisions = decide(cfg.model, cfg.train, accelerator_device)
    for line in decisions.reasons: log(line)                # what was chosen and why
    for line in decisions.warnings: log(f"warning: {line}")  # a forced choice that is slow here
    cfg.train.mixed_precision = decisions.precision         # "bf16" | "fp16" | "no": what Accelerate runs
    cfg.model.attn_impl = decisions.attn_impl               # "sdpa" | "matmul", set before GPT(cfg.model)
    MuonAdamW(groups, ..., ns_dtype=decisions.ns_dtype)     # torch.bfloat16 | torch.float32
    # the other ranks: broadcast decisions.to_dict() from the main process, Decisions.from_dict() there

CPU. bf16 instructions are AVX512-BF16 or AMX-BF16 (x86) or BF16 (Arm). Without them torch emulates bf16
matmuls, about 14x slower than fp32 on an AVX2 AMD EPYC, so auto keeps fp32 there, Muon orthogonalises in
fp32, and only the attention kernel is measured (in fp32). With them, or where the CPU's flags cannot be
read, a probe of a few tenths of a second times the MLP sublayer and the attention sublayer of this model,
forward + backward on about PROBE_TOKENS tokens, in fp32 and bf16 and with both attention kernels, and the
fastest estimated training step wins: bf16 must be at least BF16_MARGIN faster, matmul attention
MATMUL_MARGIN faster than SDPA.
The decision is cached per machine in $XDG_CACHE_HOME/dist_gpt/hardware.json (~/.cache/dist_gpt/ without
XDG_CACHE_HOME), keyed by CPU model, flags, torch version, thread count and the model's shapes; a corrupt or
unwritable cache is ignored. Delete the file to measure again.

CUDA. Native bf16 means compute capability 8.0 or more (Ampere on); `torch.cuda.is_bf16_supported()` also
counts emulation (V100, T4), where auto picks fp16 with loss scaling. Attention auto is SDPA (fused kernels).

Environment switches (for tests, and for users who know better):
    DIST_GPT_CPU_BF16=0  treat the CPU as one without bf16 instructions: fp32, Newton-Schulz in fp32
    DIST_GPT_CPU_BF16=1  treat it as one with fast bf16: bf16 with matmul attention, Newton-Schulz in bf16 (no probe)
    DIST_GPT_PROBE=0     measure nothing: decide from capability alone (and read or write no cache)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_gpt.config import GPTConfig, TrainConfig
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write_json
from dist_gpt.model import MLP, CausalSelfAttention

CPU_BF16_ENV = "DIST_GPT_CPU_BF16"
PROBE_ENV = "DIST_GPT_PROBE"
BF16_MARGIN = 1.15  # bf16 must be this much faster than fp32 (the estimated step) to be chosen
MATMUL_MARGIN = 1.1  # matmul attention must be this much faster than SDPA (which needs less memory)
PROBE_BUDGET_S = 0.3  # measuring stops starting new timed runs after this; a probe this slow in fp32 is abandoned
PROBE_TOKENS = 1024  # tokens per probe call (whole sequences, at most a batch): fewer let fixed per-call costs,
# larger in bf16 (casts, small kernels), dominate the estimate; 1 sequence of the 4 x 128 speedrun model timed
# bf16 at 0.32x fp32 on an AVX512-BF16 EPYC where its real step ran 1.78x faster (BENCHMARKS.md, machine C)
CACHE_ENTRIES = 32  # decisions kept in the cache file, newest last
PROBE_VERSION = 2  # in the cache key: decisions of an earlier probe (1: one sequence, timed warm-up) are measured again
NS_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------- capability facts


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name and flags, and whether it has bf16 instructions (None: its flags could not be read)."""

    name: str
    flags: frozenset[str]
    native_bf16: bool | None
    forced: str = ""  # the DIST_GPT_CPU_BF16 value that set native_bf16, if any

    def describe(self) -> str:
        """'AMD EPYC: AVX2, no AVX-512, so no bf16 instructions', 'Intel Xeon ...: AMX-BF16, AVX512-BF16', ..."""
        if self.forced:
            kind = "with fast bf16" if self.native_bf16 else "without bf16 instructions"
            return f"{self.name}, treated as a CPU {kind} ({CPU_BF16_ENV}={self.forced})"
        f = self.flags
        if "asimd" in f:  # Arm's Features line
            return f"{self.name}: {'BF16' if 'bf16' in f else 'no BF16 instructions'}"
        bf16 = [label for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in f]
        if bf16:
            return f"{self.name}: {', '.join(bf16)}"
        if "avx512f" in f:
            return f"{self.name}: AVX-512 without BF16, so no bf16 instructions"
        if "avx2" in f:
            return f"{self.name}: AVX2, no AVX-512, so no bf16 instructions"
        if self.native_bf16 is None:
            return f"{self.name}: bf16 support unknown"
        return f"{self.name}: {'bf16 instructions' if self.native_bf16 else 'no bf16 instructions'}"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The first processor's name and flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo's text; on x86 the
    name ends with the family and model numbers, which tell apart CPUs sold under one name ('AMD EPYC')."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())  # the first processor's value of each key
    name = fields.get("model name", "")
    if name and fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name, frozenset((fields.get("flags") or fields.get("features") or "").split())


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> CpuInfo:
    """This CPU's capability facts, with DIST_GPT_CPU_BF16 applied."""
    try:
        name, flags = parse_cpuinfo(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        name, flags = "", frozenset()
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    if flags:
        native: bool | None = bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)
    else:  # no /proc/cpuinfo (macOS, ...): torch's own CPUID check for x86, else unknown
        native = (
            True
            if _torch_cpu_check("_is_avx512_bf16_supported") or _torch_cpu_check("_is_amx_tile_supported")
            else None
        )
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise UserError(
                f"{CPU_BF16_ENV} must be 0 (no bf16 instructions) or 1 (fast bf16), got {forced!r}; unset it to detect"
            )
        native = forced == "1"
    return CpuInfo(name, flags, native, forced)


def _torch_cpu_check(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private helpers in torch.cpu; absent in some builds
    try:
        return bool(check()) if check else False
    except Exception:
        return False


def cuda_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether this GPU runs bf16 natively (compute capability >= 8.0), and its description."""
    major, minor = torch.cuda.get_device_capability(device)
    return major >= 8, f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


# ----------------------------------------------------------------------------- decisions


@dataclass
class Decisions:
    """What to run, each with a one-line reason; `warnings` name a forced choice that is slow here and the fix."""

    precision: str  # "bf16" | "fp16" | "no"
    attn_impl: str  # "sdpa" | "matmul"
    ns_dtype: torch.dtype  # Muon's Newton-Schulz dtype
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ns_dtype": NS_NAMES[self.ns_dtype]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decisions:
        ns = {name: dtype for dtype, name in NS_NAMES.items()}[d["ns_dtype"]]
        return cls(d["precision"], d["attn_impl"], ns, list(d["reasons"]), list(d.get("warnings", [])))


def decide(model: GPTConfig, train: TrainConfig, device: torch.device | str) -> Decisions:
    """Precision, attention kernel and Newton-Schulz dtype for this model on `device`; explicit choices stand."""
    device = torch.device(device)
    if device.type == "cuda":
        return _decide_cuda(model, train, device)
    if device.type == "cpu":
        return _decide_cpu(model, train)
    precision = "no" if train.mixed_precision == "auto" else train.mixed_precision
    attn = "sdpa" if model.attn_impl == "auto" else model.attn_impl
    return Decisions(
        precision,
        attn,
        torch.float32,
        [f"{device.type}: no probe for this device; precision {precision}, attention {attn}"],
    )


def _decide_cuda(model: GPTConfig, train: TrainConfig, device: torch.device) -> Decisions:
    native, gpu = cuda_bf16(device)
    d = Decisions(
        "", "sdpa" if model.attn_impl == "auto" else model.attn_impl, torch.bfloat16 if native else torch.float32
    )
    choice = train.mixed_precision
    if choice == "auto":
        d.precision = "bf16" if native else "fp16"
        if native:
            d.reasons.append(f"precision bf16: {gpu} has native bf16")
        else:
            d.reasons.append(f"precision fp16 with loss scaling: {gpu} has no native bf16 (it would be emulated)")
    else:
        d.precision = choice
        d.reasons.append(f"precision {choice}: set by train.mixed_precision")
        if choice == "bf16" and not native:
            if not torch.cuda.is_bf16_supported():
                raise UserError(
                    f"train.mixed_precision=bf16 but {gpu} has no bf16; use train.mixed_precision=auto (fp16)"
                )
            d.warnings.append(
                f"train.mixed_precision=bf16 on {gpu}: bf16 is emulated there and runs several times slower; "
                "use train.mixed_precision=auto (fp16 with loss scaling)"
            )
    if model.attn_impl == "auto":
        d.reasons.append("attention sdpa: fused attention kernels on CUDA")
    if train.optimizer == "muon":
        d.reasons.append(
            f"Muon Newton-Schulz in {NS_NAMES[d.ns_dtype]}: {gpu} {'has' if native else 'has no'} native bf16"
        )
    return d


def _decide_cpu(model: GPTConfig, train: TrainConfig) -> Decisions:
    info = cpu_info()
    warnings = _cpu_warnings(info, train)
    if model.kind == "bigram":
        precision = "bf16" if train.mixed_precision == "bf16" else "no"
        why = "set by train.mixed_precision" if precision == "bf16" else "the bigram model has no matmuls to speed up"
        return Decisions(
            precision, "sdpa", torch.float32, [f"precision {'fp32' if precision == 'no' else 'bf16'}: {why}"], warnings
        )
    choice = "no" if train.mixed_precision == "fp16" else train.mixed_precision
    precisions = [choice] if choice != "auto" else (["no"] if info.native_bf16 is False else ["no", "bf16"])
    impls = ["sdpa", "matmul"] if model.attn_impl == "auto" else [model.attn_impl]
    probe_ns = train.optimizer == "muon" and info.native_bf16 is not False
    emulated = info.native_bf16 is False and precisions == [
        "bf16"
    ]  # forced bf16 without bf16 instructions: not worth timing
    if os.environ.get(PROBE_ENV, "1") == "0" or info.forced == "1" or emulated:
        d = _by_capability(model, info, choice, precisions, impls)
    elif len(precisions) == 1 and len(impls) == 1 and not probe_ns:
        d = _by_capability(model, info, choice, precisions, impls)  # nothing to measure
    else:
        key = _cache_key(info, model, train, precisions, impls, probe_ns)
        d = _cache_read(key)
        if d is None:
            d = _by_probe(model, train, info, choice, precisions, impls, probe_ns)
            if d is not None:
                _cache_write(key, d)
        if d is None:  # the probe was too slow to finish in its budget
            d = _by_capability(model, info, choice, precisions, impls)
            d.reasons.append(
                f"(no probe: one attention sublayer's forward + backward takes over {PROBE_BUDGET_S} s at this size)"
            )
    if train.optimizer == "muon" and not any(r.startswith("Muon") for r in d.reasons):
        why = {True: "bf16 instructions", False: "bf16 would be emulated", None: "bf16 not known to be fast"}[
            info.native_bf16
        ]
        d.reasons.append(f"Muon Newton-Schulz in {NS_NAMES[d.ns_dtype]}: {why} ({info.describe()})")
    d.warnings = warnings
    return d


def _cpu_warnings(info: CpuInfo, train: TrainConfig) -> list[str]:
    if train.mixed_precision == "fp16":
        return [
            "train.mixed_precision=fp16 does nothing useful on a CPU; training in fp32 (train.mixed_precision=auto picks bf16 where it is fast)"
        ]
    if train.mixed_precision == "bf16" and info.native_bf16 is False:
        return [
            f"train.mixed_precision=bf16 on a CPU without bf16 instructions ({info.describe()}): bf16 is emulated, "
            "5-15x slower than fp32 in matmuls (training and evaluation); use train.mixed_precision=auto"
        ]
    return []


def _fixed_precision_reason(info: CpuInfo, choice: str) -> str:
    """Why the precision needs no measurement: the config says so, or bf16 would be emulated."""
    if choice != "auto":
        return f"precision {'fp32' if choice == 'no' else choice}: set by train.mixed_precision"
    return f"precision fp32: this CPU has no bf16 instructions, so bf16 would be emulated ({info.describe()})"


def _by_capability(model: GPTConfig, info: CpuInfo, choice: str, precisions: list[str], impls: list[str]) -> Decisions:
    """Decisions without measuring: bf16 and matmul attention on CPUs with bf16 instructions (BENCHMARKS.md), else fp32 and SDPA."""
    why = f"({info.describe()})" if info.forced else f"({info.describe()}; no measurement)"
    if len(precisions) == 1:
        precision, p_reason = precisions[0], _fixed_precision_reason(info, choice)
    elif info.native_bf16 is None:
        precision, p_reason = "no", f"precision fp32: bf16 support unknown {why}"
    elif "matmul" in impls or model.n_embd >= 256:  # bf16 SDPA's backward is slow on CPUs at small widths
        precision, p_reason = "bf16", f"precision bf16: bf16 instructions {why}"
    else:
        precision, p_reason = (
            "no",
            f"precision fp32: bf16 SDPA's backward is slow on CPUs, which cancels bf16's gain at n_embd < 256 {why}",
        )
    d = Decisions(precision, impls[0], torch.bfloat16 if info.native_bf16 else torch.float32, [p_reason])
    if len(impls) > 1:
        fast_bf16 = precision == "bf16" and info.native_bf16
        d.attn_impl = "matmul" if fast_bf16 else "sdpa"
        because = "bf16 SDPA's backward is slow on CPUs" if fast_bf16 else "the default kernel"
        d.reasons.append(f"attention {d.attn_impl}: {because} {why}")
    return d


# ----------------------------------------------------------------------------- the probe


def _seconds(fn: Callable[[], None], deadline: float, give_up_after: float = math.inf) -> float:
    """Fastest of up to 3 timed calls of fn() after an untimed warm-up call (allocations, kernel creation);
    the first timed call's time alone if it took over give_up_after."""
    fn()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if best > give_up_after or time.perf_counter() > deadline:
            break
    return best


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    """One training forward + backward of `module` on x, under bf16 autocast when precision is bf16."""

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = module(x)
        out.float().sum().backward()

    return run


def _by_probe(
    model: GPTConfig,
    train: TrainConfig,
    info: CpuInfo,
    choice: str,
    precisions: list[str],
    impls: list[str],
    probe_ns: bool,
) -> Decisions | None:
    """Time the model's own attention and MLP sublayers, forward + backward; None if the first attention run exceeds the budget.

    Both run on the same b whole sequences (b*T about PROBE_TOKENS, at most the batch), and the estimated step time per
    layer is B/b * (attn(precision, kernel) + mlp(precision)). The MLP runs only when precisions are compared or for
    Muon: its bf16/fp32 speed ratio, matmuls of the same widths, also decides the Newton-Schulz dtype.
    """
    B, T, C = train.batch_size, model.block_size, model.n_embd
    b = max(1, min(B, PROBE_TOKENS // T))
    start = time.perf_counter()
    deadline = start + PROBE_BUDGET_S
    attn: dict[tuple[str, str], float] = {}
    mlp: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # dropout draws must not move the training RNG
        torch.manual_seed(0)
        x = torch.randn(b, T, C, requires_grad=True)
        for precision in precisions:
            for impl in impls:
                layer = CausalSelfAttention(dataclasses.replace(model, attn_impl=impl)).train()
                slowest = 3 * min(attn.values(), default=math.inf)  # a candidate 3x slower than the best is out
                attn[precision, impl] = _seconds(_fwd_bwd(layer, x, precision), deadline, slowest)
                if len(attn) == 1 and attn[precision, impl] > PROBE_BUDGET_S:
                    return None
        if len(precisions) > 1 or probe_ns:
            for precision in ("no", "bf16"):
                mlp[precision] = _seconds(
                    _fwd_bwd(MLP(model).train(), x, precision), deadline, 3 * mlp.get("no", math.inf)
                )
    took = time.perf_counter() - start

    def step(precision: str, impl: str) -> float:
        return B / b * (attn[precision, impl] + mlp.get(precision, 0.0))

    def best_impl(precision: str) -> str:
        if len(impls) == 1:
            return impls[0]
        return "matmul" if attn[precision, "sdpa"] >= MATMUL_MARGIN * attn[precision, "matmul"] else "sdpa"

    sublayers = "attention and MLP sublayers" if mlp else "attention sublayer"
    where = f"a {took:.2f} s probe of this model's {sublayers} ({info.describe()})"
    if len(precisions) > 1:
        speedup = step("no", best_impl("no")) / step("bf16", best_impl("bf16"))
        precision = "bf16" if speedup >= BF16_MARGIN else "no"
        if precision == "bf16":
            reasons = [f"precision bf16: {speedup:.2f}x fp32's speed in {where}"]
        else:
            reasons = [f"precision fp32: bf16 only {speedup:.2f}x its speed (needs {BF16_MARGIN}x) in {where}"]
    else:
        precision, reasons = precisions[0], [_fixed_precision_reason(info, choice)]
    impl = best_impl(precision)
    if len(impls) > 1:
        speedup = attn[precision, "sdpa"] / attn[precision, "matmul"]
        verdict = (
            f"{speedup:.2f}x sdpa's speed"
            if impl == "matmul"
            else f"matmul only {speedup:.2f}x its speed (needs {MATMUL_MARGIN}x)"
        )
        at = f"({B}, {model.n_head}, {T}, {C // model.n_head}) in {'bf16' if precision == 'bf16' else 'fp32'}"
        reasons.append(f"attention {impl}: {verdict}, forward + backward at {at}, in {where}")
    ns = torch.float32
    if probe_ns:
        speedup = mlp["no"] / mlp["bf16"]
        ns = torch.bfloat16 if speedup >= BF16_MARGIN else torch.float32
        reasons.append(f"Muon Newton-Schulz in {NS_NAMES[ns]}: bf16 matmuls {speedup:.2f}x fp32's speed in {where}")
    return Decisions(precision, impl, ns, reasons)


# ----------------------------------------------------------------------------- the per-machine cache


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "dist_gpt" / "hardware.json"


def _cache_key(
    info: CpuInfo, model: GPTConfig, train: TrainConfig, precisions: list[str], impls: list[str], probe_ns: bool
) -> str:
    shape = {
        k: getattr(model, k)
        for k in ("block_size", "n_embd", "n_head", "mlp_ratio", "activation", "dropout", "bias", "qk_norm", "pos_emb")
    }
    facts = {
        "probe": PROBE_VERSION,
        "cpu": info.name,
        "flags": hashlib.sha256(" ".join(sorted(info.flags)).encode()).hexdigest()[:16],
        "forced": info.forced,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": train.batch_size,
        "shape": shape,
        "compare": [train.mixed_precision, precisions, impls, probe_ns],
    }
    return json.dumps(facts, sort_keys=True)


def _cache_entries() -> dict[str, Any]:
    try:
        entries = json.loads(cache_path().read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _cache_read(key: str) -> Decisions | None:
    entry = _cache_entries().get(key)
    try:
        d = Decisions.from_dict(entry)
        if (
            d.precision not in ("no", "bf16")
            or d.attn_impl not in ("sdpa", "matmul")
            or not all(isinstance(r, str) for r in d.reasons)
        ):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    d.warnings = []
    d.reasons.append(f"(measured earlier on this machine: cached in {cache_path()}; delete it to measure again)")
    return d


def _cache_write(key: str, d: Decisions) -> None:
    entries = _cache_entries()
    entries.pop(key, None)
    entries[key] = {**d.to_dict(), "warnings": []}
    with contextlib.suppress(OSError, UserError):  # a cache we cannot write only costs a probe next time
        atomic_write_json(cache_path(), {"entries": dict(list(entries.items())[-CACHE_ENTRIES:])})


def _print_cpu(args: list[str]) -> None:
    from dist_gpt.cli import ArgParser  # only the command line needs it

    ArgParser(
        prog="python -m dist_gpt.hardware",
        description="Print one line naming this CPU and its bf16 instructions, as auto and the benchmarks see it "
        f"({CPU_BF16_ENV}=0|1 applied).",
    ).parse_args(args)
    print(cpu_info().describe())


if __name__ == "__main__":
    from dist_gpt.cli import main

    main(_print_cpu)
