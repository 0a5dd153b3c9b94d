"""Precision and kernel decisions (dist_gpt/hardware.py): capability facts, forced switches, the probe cache, CUDA rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

import dist_gpt.hardware as hw
from dist_gpt.config import GPTConfig, TrainConfig
from dist_gpt.errors import UserError
from dist_gpt.model import GPT

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n"
XEON = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: fpu avx2 avx512f avx512bw\n"
ZEN5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def small_model(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=17, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0), **kw})


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=4), **kw})


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """Every test: its own cache folder, no switches set."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(hw.CPU_BF16_ENV, raising=False)
    monkeypatch.delenv(hw.PROBE_ENV, raising=False)


def record_probes(monkeypatch) -> list[tuple]:
    """The arguments of every probe decide() runs from now on (the probe still runs)."""
    calls = []
    real = hw._by_probe
    monkeypatch.setattr(hw, "_by_probe", lambda *a: calls.append(a) or real(*a))
    return calls


def fake_cpu(monkeypatch, tmp_path, text: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    real = hw.cpu_info
    monkeypatch.setattr(hw, "cpu_info", lambda: real(str(path)))


# ----------------------------------------------------------------------------- capability facts


@pytest.mark.parametrize(
    ("text", "name", "native", "described"),
    [
        (EPYC, "AMD EPYC", False, "AMD EPYC: AVX2, no AVX-512, so no bf16 instructions"),
        (XEON, "Intel(R) Xeon(R) Platinum 8480+", True, "Intel(R) Xeon(R) Platinum 8480+: AMX-BF16, AVX512-BF16"),
        (
            SKYLAKE,
            "Intel(R) Xeon(R) Gold 6148",
            False,
            "Intel(R) Xeon(R) Gold 6148: AVX-512 without BF16, so no bf16 instructions",
        ),
        (ZEN5, "AMD EPYC (family 26, model 2)", True, "AMD EPYC (family 26, model 2): AVX512-BF16"),
        (GRAVITON, None, True, ": BF16"),
    ],
)
def test_cpu_info_reads_bf16_flags(tmp_path, text, name, native, described):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    info = hw.cpu_info(str(path))
    assert info.native_bf16 is native and not info.forced
    if name:
        assert info.name == name
    assert info.describe().endswith(described)


def test_module_prints_this_cpu_for_benchmark_headers():
    out = subprocess.run(
        [sys.executable, "-m", "dist_gpt.hardware"], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == hw.cpu_info().describe() and out.stdout.count("\n") == 1
    bad = subprocess.run(
        [sys.executable, "-m", "dist_gpt.hardware"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, hw.CPU_BF16_ENV: "yes"},
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert (
        bad.stderr
        == "error: DIST_GPT_CPU_BF16 must be 0 (no bf16 instructions) or 1 (fast bf16), got 'yes'; unset it to detect\n"
    )


def test_cpu_bf16_switch_overrides_the_flags(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(XEON)
    monkeypatch.setenv(hw.CPU_BF16_ENV, "0")
    info = hw.cpu_info(str(path))
    assert info.native_bf16 is False and info.forced == "0"
    assert "treated as a CPU without bf16 instructions (DIST_GPT_CPU_BF16=0)" in info.describe()
    monkeypatch.setenv(hw.CPU_BF16_ENV, "1")
    path.write_text(EPYC)
    assert hw.cpu_info(str(path)).native_bf16 is True
    monkeypatch.setenv(hw.CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match="DIST_GPT_CPU_BF16 must be 0 .* or 1"):
        hw.cpu_info(str(path))


# ----------------------------------------------------------------------------- CPU decisions


def test_forced_no_bf16_gives_fp32_everywhere(monkeypatch):
    monkeypatch.setenv(hw.CPU_BF16_ENV, "0")
    monkeypatch.setenv(hw.PROBE_ENV, "0")
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")
    assert (d.precision, d.attn_impl, d.ns_dtype, d.warnings) == ("no", "sdpa", torch.float32, [])
    assert d.reasons[0].startswith("precision fp32: this CPU has no bf16 instructions, so bf16 would be emulated")
    assert any(r.startswith("Muon Newton-Schulz in fp32: bf16 would be emulated") for r in d.reasons)


def test_forced_fast_bf16_gives_bf16_matmul_and_bf16_newton_schulz(monkeypatch):
    monkeypatch.setenv(hw.CPU_BF16_ENV, "1")
    monkeypatch.setattr(hw, "_by_probe", lambda *a: pytest.fail("DIST_GPT_CPU_BF16=1 must not measure"))
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")
    assert (d.precision, d.attn_impl, d.ns_dtype, d.warnings) == ("bf16", "matmul", torch.bfloat16, [])
    assert d.reasons[0].startswith("precision bf16: bf16 instructions (") and d.reasons[0].endswith(
        "treated as a CPU with fast bf16 (DIST_GPT_CPU_BF16=1))"
    )
    # explicit choices stand; SDPA at a small width keeps fp32 (bf16 SDPA's backward cancels the gain)
    d = hw.decide(small_model(attn_impl="sdpa"), train_cfg(), "cpu")
    assert (d.precision, d.attn_impl) == ("no", "sdpa") and "n_embd < 256" in d.reasons[0]
    d = hw.decide(small_model(attn_impl="sdpa", n_embd=256), train_cfg(mixed_precision="auto"), "cpu")
    assert (d.precision, d.attn_impl) == ("bf16", "sdpa")


def test_no_bf16_cpu_measures_the_attention_kernel_in_fp32_only(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, EPYC)
    calls = record_probes(monkeypatch)
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")
    assert [a[4:] for a in calls] == [(["no"], ["sdpa", "matmul"], False)]
    assert d.precision == "no" and d.ns_dtype == torch.float32 and d.attn_impl in ("sdpa", "matmul")
    assert (
        d.reasons[1].startswith(f"attention {d.attn_impl}: ")
        and "forward + backward at (4, 2, 16, 16) in fp32" in d.reasons[1]
        and " s probe of this model's attention sublayer (AMD EPYC: AVX2" in d.reasons[1]
    )


def test_probe_compares_precisions_where_bf16_may_be_native(monkeypatch, tmp_path):
    """A CPU with bf16 flags gets both precisions measured; the choice follows the timings (faked here: no timing asserts)."""
    fake_cpu(monkeypatch, tmp_path, XEON)
    speed = {"no": 0.01, "bf16": 0.004}  # seconds per call: bf16 2.5x faster
    last = {}
    real_fwd_bwd = hw._fwd_bwd

    def recording_fwd_bwd(module, x, precision):
        run = real_fwd_bwd(module, x, precision)
        return lambda: (last.update(precision=precision), run())

    monkeypatch.setattr(hw, "_fwd_bwd", recording_fwd_bwd)
    monkeypatch.setattr(
        hw, "_seconds", lambda fn, deadline, give_up_after=float("inf"): (fn(), speed[last["precision"]])[1]
    )
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")
    assert (d.precision, d.attn_impl, d.ns_dtype) == ("bf16", "sdpa", torch.bfloat16)  # equal kernel times: sdpa
    assert (
        d.reasons[0].startswith("precision bf16: 2.50x fp32's speed in a ") and "AMX-BF16, AVX512-BF16" in d.reasons[0]
    )
    assert d.reasons[1].startswith("attention sdpa: matmul only 1.00x its speed (needs 1.1x)")
    speed["bf16"] = 0.0095  # 1.05x: not clearly faster
    hw.cache_path().unlink()
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")
    assert (d.precision, d.ns_dtype) == (
        "no",
        torch.float32,
    ) and "precision fp32: bf16 only 1.05x its speed (needs 1.15x)" in d.reasons[0]


def test_probe_times_whole_batches_of_about_probe_tokens(monkeypatch, tmp_path):
    """Per-call costs that do not grow with the batch must not be multiplied up: the probe runs b sequences, not one."""
    fake_cpu(monkeypatch, tmp_path, XEON)
    shapes = []
    real_fwd_bwd = hw._fwd_bwd
    monkeypatch.setattr(
        hw, "_fwd_bwd", lambda module, x, precision: shapes.append(tuple(x.shape)) or real_fwd_bwd(module, x, precision)
    )
    hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")  # batch 4 of 16 tokens: all of it
    assert set(shapes) == {(4, 16, 32)} and len(shapes) == 6  # 2 precisions x 2 kernels, then the MLP in both
    shapes.clear()
    hw.decide(small_model(attn_impl="auto"), train_cfg(batch_size=1000), "cpu")  # a large batch: PROBE_TOKENS of it
    assert set(shapes) == {(hw.PROBE_TOKENS // 16, 16, 32)}
    shapes.clear()
    hw.decide(small_model(attn_impl="auto", block_size=4 * hw.PROBE_TOKENS), train_cfg(batch_size=2), "cpu")
    assert set(shapes) == {(1, 4 * hw.PROBE_TOKENS, 32)}  # a sequence longer than PROBE_TOKENS: one


def test_probe_timing_leaves_out_the_warm_up_and_gives_up_on_a_slow_candidate():
    calls = []

    def slow_first_call():  # kernel creation on the first call, as oneDNN's bf16 primitives on some CPUs
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.2)

    assert hw._seconds(slow_first_call, deadline=time.perf_counter() + 10) < 0.1 and len(calls) == 4
    calls.clear()
    assert hw._seconds(lambda: calls.append(time.sleep(0.02)), time.perf_counter() + 10, give_up_after=0.001) >= 0.02
    assert len(calls) == 2  # the warm-up and one timed call, no more


def test_a_decision_of_an_earlier_probe_version_is_measured_again(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, XEON)
    calls = record_probes(monkeypatch)
    model, train = small_model(attn_impl="auto"), train_cfg()
    hw.decide(model, train, "cpu")
    hw.decide(model, train, "cpu")
    assert len(calls) == 1
    monkeypatch.setattr(hw, "PROBE_VERSION", hw.PROBE_VERSION + 1)
    hw.decide(model, train, "cpu")
    assert len(calls) == 2


def test_forced_bf16_on_a_cpu_without_bf16_warns_once_with_the_fix(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, EPYC)
    monkeypatch.setattr(hw, "_by_probe", lambda *a: pytest.fail("emulated bf16 is not worth timing"))
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(mixed_precision="bf16", optimizer="muon"), "cpu")
    # the user's choice stands; Muon stays fp32
    assert (d.precision, d.attn_impl, d.ns_dtype) == (
        "bf16",
        "sdpa",
        torch.float32,
    )
    assert d.warnings == [
        "train.mixed_precision=bf16 on a CPU without bf16 instructions (AMD EPYC: AVX2, no AVX-512, so no bf16 instructions): "
        "bf16 is emulated, 5-15x slower than fp32 in matmuls (training and evaluation); use train.mixed_precision=auto"
    ]
    d = hw.decide(small_model(attn_impl="sdpa"), train_cfg(mixed_precision="fp16"), "cpu")  # nothing left to measure
    assert d.precision == "no" and d.reasons == ["precision fp32: set by train.mixed_precision"]
    assert d.warnings == [
        "train.mixed_precision=fp16 does nothing useful on a CPU; training in fp32 (train.mixed_precision=auto picks bf16 where it is fast)"
    ]


def test_probe_leaves_the_training_rng_alone(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, EPYC)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    hw.decide(small_model(attn_impl="auto", dropout=0.5), train_cfg(), "cpu")
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- the cache


def test_cache_hit_miss_and_corrupt_cache(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, EPYC)
    calls = record_probes(monkeypatch)
    model, train = small_model(attn_impl="auto"), train_cfg()
    first = hw.decide(model, train, "cpu")  # miss: measures and writes
    assert len(calls) == 1 and hw.cache_path().is_file()
    second = hw.decide(model, train, "cpu")  # hit
    assert len(calls) == 1 and (second.precision, second.attn_impl) == (first.precision, first.attn_impl)
    assert second.reasons[: len(first.reasons)] == first.reasons and "cached in" in second.reasons[-1]
    hw.decide(small_model(attn_impl="auto", n_embd=64), train, "cpu")  # another shape: another entry
    assert len(calls) == 2 and len(json.loads(hw.cache_path().read_text())["entries"]) == 2
    for garbage in ("{not json", "[1, 2]", '{"entries": {"x": 1}}', "\xff\xfe"):
        hw.cache_path().write_text(garbage)
        assert hw.decide(model, train, "cpu").attn_impl in ("sdpa", "matmul")
    assert len(calls) == 6 and len(json.loads(hw.cache_path().read_text())["entries"]) == 1  # rewritten whole
    key = next(iter(json.loads(hw.cache_path().read_text())["entries"]))
    hw.cache_path().write_text(
        json.dumps({"entries": {key: {"precision": "fp8", "attn_impl": "sdpa", "ns_dtype": "fp32", "reasons": []}}})
    )
    hw.decide(model, train, "cpu")
    assert len(calls) == 7  # an entry with impossible values is a miss


def test_unwritable_cache_is_ignored(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, EPYC)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be created under a file
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(), "cpu")
    assert d.attn_impl in ("sdpa", "matmul") and not (blocker / "dist_gpt").exists()


def test_no_probe_switch_measures_nothing_and_touches_no_cache(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, tmp_path, XEON)
    monkeypatch.setenv(hw.PROBE_ENV, "0")
    monkeypatch.setattr(hw, "_by_probe", lambda *a: pytest.fail("DIST_GPT_PROBE=0 must not measure"))
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cpu")
    assert (d.precision, d.attn_impl, d.ns_dtype) == ("bf16", "matmul", torch.bfloat16)
    assert d.reasons[0].endswith("AMX-BF16, AVX512-BF16; no measurement)") and not hw.cache_path().exists()


# ----------------------------------------------------------------------------- CUDA


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str, emulates_bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: emulates_bf16 or capability >= (8, 0)
    )


def test_cuda_native_bf16_is_compute_capability_8(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cuda")
    assert (d.precision, d.attn_impl, d.ns_dtype, d.warnings) == ("bf16", "sdpa", torch.bfloat16, [])
    assert d.reasons[0] == "precision bf16: NVIDIA A100-SXM4-80GB (compute capability 8.0) has native bf16"


def test_cuda_v100_gets_fp16_not_emulated_bf16(monkeypatch):
    fake_gpu(monkeypatch, (7, 0), "Tesla V100-SXM2-16GB")  # torch.cuda.is_bf16_supported() says True: emulation
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon"), "cuda")
    assert (d.precision, d.attn_impl, d.ns_dtype, d.warnings) == ("fp16", "sdpa", torch.float32, [])
    assert d.reasons[0].startswith(
        "precision fp16 with loss scaling: Tesla V100-SXM2-16GB (compute capability 7.0) has no native bf16"
    )
    forced = hw.decide(small_model(), train_cfg(mixed_precision="bf16"), "cuda")
    assert forced.precision == "bf16" and forced.warnings == [
        "train.mixed_precision=bf16 on Tesla V100-SXM2-16GB (compute capability 7.0): bf16 is emulated there and runs several times slower; "
        "use train.mixed_precision=auto (fp16 with loss scaling)"
    ]
    fake_gpu(monkeypatch, (6, 1), "GeForce GTX 1080", emulates_bf16=False)
    with pytest.raises(UserError, match="has no bf16; use train.mixed_precision=auto"):
        hw.decide(small_model(), train_cfg(mixed_precision="bf16"), "cuda")


# ----------------------------------------------------------------------------- the rest


def test_bigram_needs_no_probe(monkeypatch):
    monkeypatch.setattr(hw, "_by_probe", lambda *a: pytest.fail("nothing to measure"))
    d = hw.decide(GPTConfig(kind="bigram", vocab_size=17), train_cfg(), "cpu")
    assert (d.precision, d.reasons) == ("no", ["precision fp32: the bigram model has no matmuls to speed up"])


def test_decisions_round_trip_through_json(monkeypatch):
    monkeypatch.setenv(hw.CPU_BF16_ENV, "1")
    d = hw.decide(small_model(attn_impl="auto"), train_cfg(optimizer="muon", mixed_precision="bf16"), "cpu")
    assert hw.Decisions.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_model_treats_attn_impl_auto_as_sdpa():
    idx = torch.randint(0, 17, (2, 16))
    logits = {}
    for impl in ("auto", "sdpa"):
        torch.manual_seed(0)
        logits[impl] = GPT(small_model(attn_impl=impl))(idx)[0]
    assert torch.equal(logits["auto"], logits["sdpa"])


FAULTS = """
import resource, sys, torch
from dist_gpt.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a 64 MB activation, allocated, written and freed once per "step"
    torch.ones(16 * 2**20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="page-fault counts as Linux reports them")
def test_freed_training_memory_is_reused_not_faulted_in_again():
    """keep_freed_memory: a buffer freed and allocated again every step costs page faults once, not every step."""
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=REPO, check=True)
        kept, faults = out.stdout.split()
        runs[mode] = (kept, int(faults))
    pages = 16 * 2**20 * 4 // 4096  # one buffer's pages
    assert runs["keep"][0] == "True"
    assert runs["default"][1] > 10 * pages  # glibc maps and faults in each one again
    assert runs["keep"][1] < 2 * pages  # faulted in once, then reused
