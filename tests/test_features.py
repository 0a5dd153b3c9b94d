"""What GPT-2-scale users expect (issue 18): activation checkpointing, profiling and memory snapshots, the
warmup-stable-decay schedule and extending a run, W&B's environment variables and a sweep; none of it on by default.

End-to-end runs go through `launch/pretrain.py` as a user runs it; the multi-process and multi-run ones are marked slow.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, run_script
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from dist_gpt.config import Config, LogConfig, TrainConfig, checkpoint_every, help_text, load_config, step_range
from dist_gpt.errors import UserError
from dist_gpt.model import GPT, Block, GPTConfig
from dist_gpt.optim import lr_at, make_optimizer
from dist_gpt.profiling import Profiler
from dist_gpt.rundir import load_run
from dist_gpt.runtime import check_recompute_backend, checkpoint_blocks, make_accelerator
from dist_gpt.tracking import Tracker, wandb_init_args

WRAPPED = "_checkpoint_wrapped_module"
SMOKE = ["--config", "configs/smoke.yaml", "--train.sample_tokens=8"]


def tiny_gpt(n_layer: int = 3, dropout: float = 0.1, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=n_layer, n_head=2, n_embd=16, dropout=dropout))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 17, (4, 9), generator=gen)
    return idx[:, :-1], idx[:, 1:]


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def learning(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl without the timings: what the run learned, step by step."""
    keys = ("train_loss", "lr", "tokens", "val_loss", "eval_train_loss")
    return {step: {k: r.get(k) for k in keys} for step, r in metrics(run_dir).items()}


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize(
    "spec, wrapped",
    [("none", []), ("full", [0, 1, 2, 3, 4]), ("every_2", [0, 2, 4]), ("every_3", [0, 3]), ("every_9", [0])],
)
def test_checkpoint_blocks_wraps_every_nth_block(spec, wrapped):
    model = tiny_gpt(n_layer=5)
    blocks = list(model.transformer.h)
    assert checkpoint_blocks(model, spec) == len(wrapped)
    kinds = [type(m).__name__ for m in model.transformer.h]
    assert kinds == ["CheckpointWrapper" if i in wrapped else "Block" for i in range(5)]
    assert [m for m in model.modules() if isinstance(m, Block)] == blocks  # the same Blocks, wrapped or not
    if spec == "none":  # the default path: nothing wraps anything
        assert not any(WRAPPED in name for name, _ in model.named_modules())


@pytest.mark.parametrize("spec", ["full", "every_2"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(spec):
    """Dropout on: the recomputation replays the same masks (the RNG state is saved and restored)."""
    plain = tiny_gpt(dropout=0.1)
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed, spec)
    x, y = batch()
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)
        loss = model(x, y)[1]
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in plain.named_parameters()}
    recomputed = {n.replace(f"{WRAPPED}.", ""): p.grad for n, p in checkpointed.named_parameters()}
    assert recomputed.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(recomputed[name], grad), name


def test_activation_checkpointing_recomputes_in_backward():
    """The wrapped Blocks run their forward twice per step (once more in the backward pass), the others once."""
    model = tiny_gpt(n_layer=4, dropout=0.0)
    calls = [0] * 4
    for i, block in enumerate(model.transformer.h):

        def counted(x, i=i, forward=block.forward):
            calls[i] += 1
            return forward(x)

        block.forward = counted
    checkpoint_blocks(model, "every_2")
    x, y = batch()
    model(x, y)[1].backward()
    assert calls == [2, 1, 2, 1]


def test_checkpointed_model_saves_and_loads_plain_gpt_names():
    plain_keys = set(tiny_gpt().state_dict())
    model = tiny_gpt()
    checkpoint_blocks(model, "full")
    assert set(model.state_dict()) == plain_keys
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert set(full) == plain_keys
    opt = make_optimizer(model, TrainConfig())
    x, y = batch()
    model(x, y)[1].backward()
    opt.step()
    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert set(opt_state["state"]) <= plain_keys and len(opt_state["state"]) == len(list(model.parameters()))
    fresh = tiny_gpt(seed=5)
    fresh.load_state_dict(model.state_dict())  # strict, into a plain GPT
    back = tiny_gpt(seed=6)
    checkpoint_blocks(back, "every_2")
    back.load_state_dict(fresh.state_dict())  # and a plain state dict into a checkpointed GPT
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))


def test_checkpointed_model_generates_like_the_plain_one():
    plain = tiny_gpt().eval()
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed, "full")
    prompt = torch.tensor([[1, 2, 3]])
    outs = [m.generate(prompt, 5, generator=torch.Generator().manual_seed(3)) for m in (plain, checkpointed)]
    assert torch.equal(outs[0], outs[1])


def test_eager_compile_backend_would_recompute_other_dropout_masks(monkeypatch):
    monkeypatch.setenv("DIST_GPT_COMPILE_BACKEND", "eager")
    cfg = load_config(
        None, ["--train.activation_checkpointing=full", "--model.dropout=0.1", "--train.compile=true"], "pretrain"
    )
    with pytest.raises(UserError, match="recomputes checkpointed Blocks with other dropout masks"):
        make_accelerator(cfg)
    for fine in ("--model.dropout=0", "--train.compile=false", "--train.activation_checkpointing=none"):
        check_recompute_backend(
            load_config(
                None,
                ["--train.activation_checkpointing=full", "--model.dropout=0.1", "--train.compile=true", fine],
                "pretrain",
            )
        )
    monkeypatch.setenv("DIST_GPT_COMPILE_BACKEND", "aot_eager")
    check_recompute_backend(cfg)


def test_activation_checkpointing_mistakes(monkeypatch):
    with pytest.raises(UserError, match="no Transformer Blocks to recompute"):
        checkpoint_blocks(GPT(GPTConfig(kind="bigram", vocab_size=17, block_size=8)), "full")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(UserError, match="fsdp_activation_checkpointing: false"):
        checkpoint_blocks(tiny_gpt(), "full")
    assert checkpoint_blocks(tiny_gpt(), "none") == 0  # off: nothing to clash with


# ----------------------------------------------------------------------------- config keys


def test_new_keys_are_off_by_default_and_in_help():
    t, log = TrainConfig(), LogConfig()
    assert (t.activation_checkpointing, t.lr_decay, log.profile_steps, log.memory_history) == (
        "none",
        "cosine",
        "",
        False,
    )
    text = help_text("pretrain")
    for key in (
        "--train.activation_checkpointing",
        "--train.decay_fraction",
        "--train.decay_shape",
        "--log.profile_steps",
        "--log.memory_history",
    ):
        assert key in text
    assert "cosine|linear|constant|wsd" in text and "every_N" in text


def test_new_keys_parse():
    assert [checkpoint_every(s) for s in ("none", "full", "every_1", "every_4")] == [0, 1, 1, 4]
    assert step_range("") is None and step_range(" 3 - 7 ") == (3, 7) and step_range("5-5") == (5, 5)
    cfg = load_config(
        None,
        [
            "--train.lr_decay=wsd",
            "--train.decay_fraction=0.1",
            "--log.profile_steps=10-15",
            "--train.activation_checkpointing=every_2",
        ],
        "pretrain",
    )
    assert (
        cfg.train.lr_decay,
        cfg.train.decay_fraction,
        cfg.log.profile_steps,
        cfg.train.activation_checkpointing,
    ) == ("wsd", 0.1, "10-15", "every_2")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--train.activation_checkpointing=some"],
            "train.activation_checkpointing: 'some' is not none, full or every_N",
        ),
        (["--train.activation_checkpointing=every_0"], "is not none, full or every_N with N >= 1"),
        (["--train.activation_checkpointing=every_"], "is not none, full or every_N with N >= 1"),
        (["--log.profile_steps=5"], "log.profile_steps: '5' is not a step range A-B with 1 <= A <= B, e.g. 10-15"),
        (["--log.profile_steps=7-3"], "is not a step range A-B"),
        (["--log.profile_steps=0-3"], "is not a step range A-B"),
        (["--log.profile_steps=a-b"], "is not a step range A-B"),
        (
            ["--log.profile_steps=10-20", "--train.max_steps=15"],
            "log.profile_steps=10-20 ends after train.max_steps=15",
        ),
        (["--train.decay_fraction=0"], "train.decay_fraction must be in (0, 1], got 0.0"),
        (["--train.decay_fraction=1.5"], "train.decay_fraction must be in (0, 1]"),
        (
            ["--train.lr_decay=wsd", "--train.max_steps=100", "--train.warmup_steps=90"],
            "train.warmup_steps=90 runs into the decay, which takes the last 20",
        ),
        (["--train.decay_shape=cosine"], "not one of linear, 1-sqrt"),
    ],
)
def test_bad_new_values_are_one_clear_error(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides, "pretrain")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_profile_window_may_pass_max_steps_under_a_time_budget():
    cfg = load_config(
        None, ["--log.profile_steps=10-20", "--train.max_steps=15", "--train.time_budget_s=60"], "pretrain"
    )
    assert cfg.log.profile_steps == "10-20"


# ----------------------------------------------------------------------------- warmup-stable-decay


def wsd(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            **dict(
                lr=1.0,
                min_lr=0.1,
                warmup_steps=2,
                max_steps=20,
                lr_decay="wsd",
                decay_fraction=0.25,
                decay_shape="linear",
            ),
            **kw,
        }
    )


def test_wsd_warms_up_holds_then_decays_to_min_lr():
    t = wsd()
    lrs = [lr_at(s, 0.0, t) for s in range(20)]
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])  # the warmup every schedule shares
    assert lrs[2:15] == [1.0] * 13  # stable
    # the last 5 steps (25%) decay linearly; the last at min_lr
    assert lrs[15:] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])
    sqrt = [lr_at(s, 0.0, wsd(decay_shape="1-sqrt")) for s in range(15, 20)]
    assert sqrt == pytest.approx([1 - 0.9 * (k / 5) ** 0.5 for k in range(1, 6)])  # 1-sqrt drops faster at first
    assert lr_at(25, 0.0, t) == pytest.approx(0.1)  # past the end: min_lr


def test_wsd_stable_phase_does_not_depend_on_max_steps_but_cosine_does():
    """Why a WSD run can be extended: until its decay starts, its rate is that of any longer WSD run."""
    short, long = wsd(max_steps=20), wsd(max_steps=100)
    assert [lr_at(s, 0.0, short) for s in range(15)] == [lr_at(s, 0.0, long) for s in range(15)]
    cos_short, cos_long = (
        TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=20),
        TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=100),
    )
    assert lr_at(10, 0.0, cos_short) < lr_at(10, 0.0, cos_long) - 0.3


def test_wsd_under_a_time_budget_decays_in_the_last_share_of_the_time():
    t = wsd(max_steps=10**9, time_budget_s=100.0)
    assert lr_at(50, 70.0, t) == 1.0  # stable until 75 s
    assert lr_at(50, 87.5, t) == pytest.approx(0.55)  # half-way through the last 25 s
    assert lr_at(50, 100.0, t) == pytest.approx(0.1)


@pytest.mark.slow
def test_extending_a_stable_wsd_checkpoint_equals_the_longer_run_from_the_start(tmp_path, shakespeare):
    """The documented recipe (README, "Extending a run"): a 12-step WSD run's step-8 checkpoint (still stable) copied into
    a new run directory and resumed with train.max_steps=24 retrains nothing and ends bit for bit where a 24-step run
    planned from the start ends; the two agree at every shared stable step."""
    common = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        "--train.lr_decay=wsd",
        "--train.decay_fraction=0.25",
    ]
    common += [
        "--train.checkpoint_interval=4",
        "--train.keep_checkpoints=10",
        "--train.eval_interval=4",
        "--model.dropout=0.1",
    ]
    planned = run_script("pretrain.py", *common, "--train.max_steps=24", f"--run.out_dir={tmp_path / 'planned'}")
    short = run_script("pretrain.py", *common, "--train.max_steps=12", f"--run.out_dir={tmp_path / 'short'}")
    assert planned.returncode == 0 and short.returncode == 0, planned.stderr + short.stderr
    p, s = learning(tmp_path / "planned"), learning(tmp_path / "short")
    assert all(s[k] == p[k] for k in range(1, 10))  # stable: identical, whatever the planned length
    # the short run decayed at its end, the long one not yet
    assert s[12]["lr"] == pytest.approx(3e-4) and p[12]["lr"] == 3e-3

    branch = tmp_path / "extended"  # the stable checkpoint, branched into a run directory of its own
    (branch / "checkpoints").mkdir(parents=True)
    for name in (".dist_gpt_run", "config.yaml", "tokenizer.json"):
        shutil.copy2(tmp_path / "short" / name, branch / name)
    shutil.copytree(tmp_path / "short" / "checkpoints" / "step_000008", branch / "checkpoints" / "step_000008")
    extended = run_script("pretrain.py", *common, "--train.max_steps=24", f"--run.out_dir={branch}")
    assert extended.returncode == 0, extended.stderr
    assert "resuming from" in extended.stderr and "step_000008" in extended.stderr
    e = learning(branch)
    assert min(e) == 9  # nothing retrained
    assert all(e[k] == p[k] for k in range(9, 25))
    a, b = load_file(branch / "model.safetensors"), load_file(tmp_path / "planned" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- profiling and memory snapshots


def profiler(
    tmp_path: Path, steps: str = "", cuda: bool = False, first_step: int = 1, history: bool = False
) -> Profiler:
    return Profiler(
        LogConfig(profile_steps=steps, memory_history=history),
        tmp_path / "profile",
        rank=0,
        main=True,
        cuda=cuda,
        first_step=first_step,
    )


def work() -> None:
    a = torch.randn(32, 32, requires_grad=True)
    (a @ a).sum().backward()


def test_profiling_off_creates_no_profiler_and_touches_no_memory_history(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("called on the default path")

    monkeypatch.setattr(torch.profiler, "profile", forbidden)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", forbidden)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", forbidden)
    p = profiler(tmp_path, cuda=True)  # even on CUDA, with log.memory_history off
    for n in range(1, 30):
        with p.step(n):
            work()
    p.close()
    assert p.prof is None and not (tmp_path / "profile").exists()


def test_profile_window_writes_a_trace_of_those_steps_and_prints_the_top_operators(tmp_path, capsys):
    p = profiler(tmp_path, "3-4")
    for n in range(1, 7):
        with p.step(n):
            work()
    p.close()
    trace = tmp_path / "profile" / "steps_3-4_rank0.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 3", "step 4"} <= names and not names & {
        "step 1",
        "step 2",
        "step 5",
        "step 6",
    }  # step 2 was the unrecorded warm-up
    assert "aten::mm" in names
    err = capsys.readouterr().err
    assert (
        "profile of steps 3-4 (rank 0), operators by self_cpu_time_total" in err
        and "Self CPU" in err
        and "aten::mm" in err
    )
    assert f"profiler trace written to {trace}" in err
    assert sorted(os.listdir(tmp_path / "profile")) == [trace.name]  # no temporary file left


def test_memory_history_on_a_cpu_says_it_does_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **kw: pytest.fail("no CUDA here"))
    profiler(tmp_path, history=True)
    assert (
        "log.memory_history records the CUDA allocator's history; this run is not on a GPU" in capsys.readouterr().err
    )


def test_profile_window_and_resume(tmp_path, capsys):
    after = profiler(tmp_path / "a", "3-4", first_step=9)  # resumed past the window
    assert (
        after.window is None and "resumes at step 9, after those steps; nothing is profiled" in capsys.readouterr().err
    )
    # resumed inside it: the rest of the window, no warm-up step to spare
    inside = profiler(tmp_path / "b", "3-6", first_step=5)
    assert inside.window == (5, 6) and inside.start_at == 5
    for n in range(5, 8):
        with inside.step(n):
            work()
    assert (tmp_path / "b" / "profile" / "steps_5-6_rank0.pt.trace.json").is_file()


def test_a_run_stopped_inside_the_window_writes_what_it_recorded(tmp_path):
    p = profiler(tmp_path, "2-9")
    for n in range(1, 4):
        with p.step(n):
            work()
    p.close()
    names = {
        e.get("name")
        for e in json.loads((tmp_path / "profile" / "steps_2-9_rank0.pt.trace.json").read_text())["traceEvents"]
    }
    assert {"step 2", "step 3"} <= names


def test_out_of_memory_in_a_step_is_one_line(tmp_path):
    p = profiler(tmp_path)
    with pytest.raises(UserError) as e, p.step(4):
        raise torch.OutOfMemoryError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.\nmore detail"
        )
    message = str(e.value)
    assert message.startswith(
        "step 4 ran out of CPU memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.)"
    )
    assert (
        "lower train.batch_size" in message and "train.activation_checkpointing=full" in message and "\n" not in message
    )
    assert not (tmp_path / "profile").exists()  # no snapshot on CPU


def test_out_of_memory_on_cuda_writes_a_memory_snapshot_first(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **kw: recorded.append(kw))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: Path(path).write_bytes(b"snapshot"))
    p = profiler(tmp_path, cuda=True)
    with pytest.raises(UserError) as e, p.step(2):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    snapshot = tmp_path / "profile" / "memory_oom_step2_rank0.pickle"
    assert snapshot.read_bytes() == b"snapshot" and not recorded
    assert (
        f"memory snapshot in {snapshot} (open it at https://pytorch.org/memory_viz; rerun with --log.memory_history=true"
        in str(e.value)
    )
    assert str(e.value).startswith("step 2 ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    with_history = profiler(tmp_path / "h", cuda=True, history=True)  # log.memory_history: recorded from the start
    assert recorded == [{"max_entries": 100_000}]
    with pytest.raises(UserError) as e, with_history.step(7):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    assert "memory_viz)" in str(e.value) and "rerun with" not in str(e.value)


def test_out_of_memory_with_an_unwritable_snapshot_still_says_what_happened(tmp_path, monkeypatch):
    def full_disk(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", full_disk)
    p = profiler(tmp_path, cuda=True)
    with pytest.raises(UserError) as e, p.step(3):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    assert "step 3 ran out of GPU memory" in str(e.value) and "no memory snapshot (disk full while writing" in str(
        e.value
    )


OOM_PRETRAIN = """
import sys, torch
from dist_gpt import model
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

forward, calls = model.GPT.forward, [0]
def oom_forward(self, idx, targets=None, return_logits=True):
    if self.training and targets is not None:
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")
    return forward(self, idx, targets, return_logits)
model.GPT.forward = oom_forward
main(pretrain, sys.argv[1:])
"""


def test_out_of_memory_through_the_launcher(tmp_path, shakespeare):
    script = tmp_path / "oom_pretrain.py"
    script.write_text(OOM_PRETRAIN)
    args = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--train.checkpoint_interval=2",
    ]
    out = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: step 3 ran out of CPU memory (DefaultCPUAllocator: can't allocate memory")
        and "train.activation_checkpointing=full" in last
    )
    assert "Traceback" not in out.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [
        "step_000002"
    ]  # the last good checkpoint stays


# ----------------------------------------------------------------------------- end to end: profile, AC + compile, plain names


@pytest.fixture(scope="module")
def profiled_and_checkpointed(
    tmp_path_factory, shakespeare
) -> tuple[Path, subprocess.CompletedProcess, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("features")
    common = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp / 'data'}",
        "--train.max_steps=10",
        "--model.dropout=0.1",
        "--train.checkpoint_interval=5",
    ]
    plain = run_script("pretrain.py", *common, f"--run.out_dir={tmp / 'plain'}", "--log.profile_steps=3-5")
    ac = run_script(
        "pretrain.py",
        *common,
        f"--run.out_dir={tmp / 'ac'}",
        "--train.activation_checkpointing=full",
        "--train.compile=true",
        env={"DIST_GPT_COMPILE_BACKEND": "aot_eager"},  # AOTAutograd, as inductor, without compiling C++
    )
    assert plain.returncode == 0, plain.stderr
    assert ac.returncode == 0, ac.stderr
    return tmp / "plain", plain, tmp / "ac", ac


def test_profile_steps_through_the_launcher(profiled_and_checkpointed):
    run_dir, out, _, _ = profiled_and_checkpointed
    trace = run_dir / "profile" / "steps_3-5_rank0.pt.trace.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"step 3", "step 4", "step 5"} <= names and "step 6" not in names
    assert "operators by self_cpu_time_total" in out.stderr and "aten::addmm" in out.stderr


def test_activation_checkpointing_under_compile_trains_like_the_plain_run(profiled_and_checkpointed):
    plain_dir, _, ac_dir, ac = profiled_and_checkpointed
    assert "OptimizedModule" in ac.stderr and "activation checkpointing (full): 2 of 2 Blocks recompute" in ac.stderr
    plain, checkpointed = metrics(plain_dir), metrics(ac_dir)
    for step in (0, 10):
        assert checkpointed[step]["val_loss"] == pytest.approx(plain[step]["val_loss"], abs=1e-5)
    keys = set(load_file(plain_dir / "model.safetensors"))
    assert set(load_file(ac_dir / "model.safetensors")) == keys
    for checkpoint in (ac_dir / "checkpoints").iterdir():
        assert set(load_file(checkpoint / "model.safetensors")) == keys
        assert not any(WRAPPED in k or "_orig_mod" in k for k in load_file(checkpoint / "optimizer.safetensors"))
    load_run(ac_dir)  # strict, into a plain GPT
    assert not (ac_dir / "profile").exists() and "Blocks recompute" not in profiled_and_checkpointed[1].stderr


FSDP_PRETRAIN = """
import sys
import accelerate
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from dist_gpt import runtime
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

def sharded_prepare(self, model, device_placement=None, evaluation_mode=False):
    plugin = runtime.fsdp_plugin(self.mixed_precision)
    plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = "transformer_based_wrap", ["Block"]
    self.state.fsdp_plugin = plugin
    model = fsdp2_prepare_model(self, model)
    self._models.append(model)
    return model

accelerate.Accelerator.prepare_model = sharded_prepare
main(pretrain, sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["DistributedDataParallel", "FSDPGPT"])
def test_activation_checkpointing_under_ddp_and_fsdp2(tmp_path, shakespeare, wrapper):
    """2 processes (gloo): with every_2 the losses and the saved model equal those of the same launch without it."""
    script = tmp_path / "pretrain.py"
    script.write_text(
        FSDP_PRETRAIN
        if wrapper == "FSDPGPT"
        else "import sys\nfrom dist_gpt.cli import main\nfrom dist_gpt.stages import pretrain\nmain(pretrain, sys.argv[1:])\n"
    )
    common = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        "--train.max_steps=6",
        "--train.eval_interval=3",
        "--model.n_layer=3",
    ]
    common += ["--model.dropout=0.1"]
    outs = {}
    for name, extra in (("plain", []), ("ac", ["--train.activation_checkpointing=every_2"])):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(script),
            *common,
            *extra,
        ]
        outs[name] = subprocess.run(
            cmd + [f"--run.out_dir={tmp_path / name}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "ACCELERATE_USE_CPU": "1"},
        )
        assert outs[name].returncode == 0, outs[name].stderr[-3000:]
        assert wrapper in outs[name].stderr
    assert "2 of 3 Blocks recompute" in outs["ac"].stderr
    plain, ac = metrics(tmp_path / "plain"), metrics(tmp_path / "ac")
    for step in (0, 3, 6):
        assert ac[step]["val_loss"] == pytest.approx(plain[step]["val_loss"], abs=1e-5)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ac" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    load_run(tmp_path / "ac")


# ----------------------------------------------------------------------------- W&B


def cfg_with(*overrides: str) -> Config:
    return load_config(None, list(overrides), "pretrain")


def test_wandb_defaults_without_environment(tmp_path):
    project, kw = wandb_init_args(cfg_with(), tmp_path / "myrun", "abc123", env={})
    assert project == "dist_gpt"
    assert kw == {"name": "myrun", "id": "abc123", "resume": "allow", "dir": str(tmp_path / "myrun")}


def test_wandb_environment_is_respected(tmp_path):
    env = {
        "WANDB_DIR": "/scratch/wandb",
        "WANDB_PROJECT": "gpt2",
        "WANDB_ENTITY": "lab",
        "WANDB_RUN_GROUP": "ablation-3",
        "WANDB_NAME": "lr-3e-4",
    }
    project, kw = wandb_init_args(cfg_with(), tmp_path / "myrun", "abc123", env=env)
    assert project == "gpt2"
    assert kw == {
        "name": "lr-3e-4",
        "id": "abc123",
        "resume": "allow",
        "dir": "/scratch/wandb",
        "entity": "lab",
        "group": "ablation-3",
    }
    # explicit settings win over the variables; a sweep agent's run id wins over ours
    project, kw = wandb_init_args(
        cfg_with("--log.project=mine", "--log.run_name=named"),
        tmp_path / "r",
        "abc123",
        env={**env, "WANDB_RUN_ID": "sweeprun"},
    )
    assert (project, kw["name"], kw["id"]) == ("mine", "named", "sweeprun")


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.init: tuple | None = None

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.init = (project, config, init_kwargs)


def test_tracker_no_longer_overrides_wandb_dir(tmp_path, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    acc, run = (
        FakeAccelerator(),
        SimpleNamespace(path=tmp_path / "run", metrics=tmp_path / "m.jsonl", samples=tmp_path / "s.jsonl"),
    )
    tracker = Tracker(acc, run, cfg_with("--log.wandb=true", "--log.progress=false"), 0, 0.0, "abc123")
    tracker.bar.close()
    project, _, init = acc.init
    assert init["wandb"]["dir"] == str(tmp_path / "elsewhere") and os.environ["WANDB_DIR"] == str(
        tmp_path / "elsewhere"
    )
    assert f"logging offline into {tmp_path / 'elsewhere' / 'wandb'}" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.delenv("WANDB_MODE")
    Tracker(acc, run, cfg_with("--log.wandb=true", "--log.progress=false"), 0, 0.0, "abc123").bar.close()
    # nothing set: RUN_DIR/wandb, offline
    assert acc.init[2]["wandb"]["dir"] == str(tmp_path / "run") and "WANDB_DIR" not in os.environ
    assert f"logging offline into {tmp_path / 'run' / 'wandb'}" in capsys.readouterr().err


@pytest.mark.slow
def test_wandb_dir_through_the_launcher(tmp_path, shakespeare):
    args = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--log.wandb=true",
    ]
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb_home"),
        "WANDB_RUN_GROUP": "grp-ablation-7f3",
        "WANDB_PROJECT": "proj-gpt2-9c1",
    }
    out = run_script("pretrain.py", *args, "--train.max_steps=3", env=env)
    assert out.returncode == 0, out.stderr
    runs = list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not (tmp_path / "run" / "wandb").exists()
    record = next(
        runs[0].glob("run-*.wandb")
    ).read_bytes()  # W&B's own record of the run: the group and project went in
    assert b"grp-ablation-7f3" in record and b"proj-gpt2-9c1" in record


# ----------------------------------------------------------------------------- the sweep example


def sweep() -> dict:
    return yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())


def test_sweep_parameters_are_config_keys():
    spec = sweep()
    assert spec["metric"] == {"name": "val_loss", "goal": "minimize"}
    params = spec["parameters"]
    assert len(params) >= 3
    for key, values in params.items():
        choices = values.get("values") or [values[k] for k in ("value", "min", "max") if k in values]
        for value in choices:  # a real key taking that value, or a UserError naming it
            assert key in load_config(None, [f"--{key}={value}"], "pretrain").explicit


def test_sweep_command_runs_pretrain_with_the_agent_arguments(tmp_path):
    """The command as `wandb agent` builds it (its own code turns the sampled parameters into ${args}), run through the
    shell with a stand-in `python` that records its arguments: pretrain's arguments parse, out_dir is per run."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = sweep()
    sampled = {
        key: {"value": (v.get("values") or [v.get("value", v.get("min"))])[0]} for key, v in spec["parameters"].items()
    }
    flags = create_sweep_command_args({"args": sampled})["args"]
    command = [c for item in spec["command"] for c in (flags if item == "${args}" else [item])]
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "WANDB_RUN_ID": "r4nd0m"}
    subprocess.run(command, cwd=REPO, env=env, check=True, timeout=60)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[0] == "launch/pretrain.py"
    config_file = argv[argv.index("--config") + 1]
    rest = argv[argv.index("--config") + 2 :]
    cfg = load_config(config_file, rest, "pretrain")
    assert cfg.run.out_dir == "runs/sweep/r4nd0m" and cfg.log.wandb is True
    assert set(sampled) <= cfg.explicit
    assert cfg.train.lr == pytest.approx(sampled["train.lr"]["value"])
