"""The GPU code paths, reproduced on CPU: torch.compile, FSDP2 through the trainer, DDP + compile accumulation, the
loss dtype under FSDP2 bf16, bf16 autocast and fused AdamW through the trainer, the fp16 loss scaler in checkpoints,
the current device's CUDA RNG only, the MFU peak table.

Accelerate's FSDP plugin needs CUDA, so the FSDP runs below patch `Accelerator.prepare_model` to apply what Accelerate
applies on a GPU (its own `fsdp2_prepare_model`, with our FSDP plugin policy) and otherwise run `launch/pretrain.py`
unchanged. torch.compile runs with the `eager` backend (DIST_GPT_COMPILE_BACKEND): the same wrapper as inductor's
(an OptimizedModule around the model), without minutes of C++ compilation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from safetensors.torch import load_file

from dist_gpt.config import GPTConfig
from dist_gpt.model import GPT
from dist_gpt.rundir import load_run
from dist_gpt.runtime import peak_flops

SMOKE = ["--config", "configs/smoke.yaml", "--train.sample_tokens=8"]
EAGER = {"DIST_GPT_COMPILE_BACKEND": "eager"}

# The trainer under FSDP2 on CPU: Accelerate's own FSDP2 wrapping (fully_shard on every Block, then the root) with the
# plugin and mixed-precision policy dist_gpt gives Accelerate on a GPU. Then launch/pretrain.py as usual.
FSDP_PRETRAIN = """
import os, sys
import accelerate
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from dist_gpt import runtime
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

def sharded_prepare(self, model, device_placement=None, evaluation_mode=False):
    plugin = runtime.fsdp_plugin(self.mixed_precision)
    plugin.set_auto_wrap_policy  # the same plugin class a GPU run gets; wrap every Block as well as the root
    plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = "transformer_based_wrap", ["Block"]
    self.state.fsdp_plugin = plugin
    model = fsdp2_prepare_model(self, model)
    self._models.append(model)
    return model

accelerate.Accelerator.prepare_model = sharded_prepare
main(pretrain, sys.argv[1:])
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    import os

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", **(env or {})},
    )


def plain_keys() -> set[str]:
    return set(GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).state_dict())


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# ----------------------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory, shakespeare) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("compiled")
    args = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp / 'data'}",
        f"--run.out_dir={tmp / 'run'}",
        "--train.compile=true",
        "--train.max_steps=10",
    ]
    out = run_script("pretrain.py", *args, env=EAGER)
    assert out.returncode == 0, out.stderr
    assert "compile true" in out.stderr and "OptimizedModule" in out.stderr  # really compiled
    return tmp, tmp / "run"


def test_compiled_run_saves_plain_weights_everywhere(compiled_run):
    _, run_dir = compiled_run
    assert set(load_file(run_dir / "model.safetensors")) == plain_keys()
    for checkpoint in (run_dir / "checkpoints").iterdir():
        assert set(load_file(checkpoint / "model.safetensors")) == plain_keys()
        assert all("_orig_mod" not in k for k in load_file(checkpoint / "optimizer.safetensors"))
    load_run(run_dir)  # strict load into a plain GPT


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_compiled_run_samples_evaluates_exports_and_finetunes(compiled_run, sonnets):
    tmp, run_dir = compiled_run
    sample = run_script("sample.py", "--run", str(run_dir), "--prompt", "ROMEO:", "--max_new_tokens", "20")
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:"), sample.stderr
    evaluate = run_script("evaluate.py", "--run", str(run_dir), "--json")
    assert evaluate.returncode == 0, evaluate.stderr
    # the whole split vs 4 batches
    assert abs(json.loads(evaluate.stdout)["loss"] - metrics(run_dir)[10]["val_loss"]) < 0.3
    export = run_script("export_hf.py", "--run", str(run_dir), "--out", str(tmp / "hf"))
    assert export.returncode == 0, export.stderr
    finetune = run_script(
        "finetune.py",
        *(
            "--config",
            "configs/finetune_sonnets.yaml",
            f"--finetune.init_from={run_dir}",
            f"--data.source={sonnets}",
            "--data.unknown=drop",
        ),
        *(
            f"--data.dir={tmp / 'sonnets'}",
            f"--run.out_dir={tmp / 'ft'}",
            "--train.max_steps=3",
            "--train.time_budget_s=0",
            "--train.compile=true",
        ),
        *("--train.eval_iters=2", "--train.sample_tokens=0", "--log.wandb=false"),
        env=EAGER,
    )
    assert finetune.returncode == 0, finetune.stderr
    assert set(load_file(tmp / "ft" / "model.safetensors")) == plain_keys()


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_compiled_run_resumes_exactly(tmp_path, shakespeare):
    common = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        "--train.compile=true",
        "--train.max_steps=12",
        "--train.checkpoint_interval=6",
    ]
    whole = run_script("pretrain.py", *common, f"--run.out_dir={tmp_path / 'whole'}", env=EAGER)
    assert whole.returncode == 0, whole.stderr
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000012")  # as if killed after step 6's checkpoint
    again = run_script("pretrain.py", *common, f"--run.out_dir={tmp_path / 'cut'}", env=EAGER)
    assert again.returncode == 0 and "step_000006" in again.stderr, again.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # CPU: bit-exact, compiled or not


# ----------------------------------------------------------------------------- DDP + compile: one all-reduce per step

COUNTING_PRETRAIN = """
import json, os, sys
import accelerate
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

calls = [0]
original = accelerate.Accelerator.prepare_model
def counting_prepare(self, model, device_placement=None, evaluation_mode=False):
    model = original(self, model, device_placement, evaluation_mode)
    ddp = getattr(model, "_orig_mod", model)  # compiled: the DDP module is inside the compile wrapper
    def hook(state, bucket):
        calls[0] += 1
        import torch.distributed as dist
        fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    ddp.register_comm_hook(None, hook)
    return model
accelerate.Accelerator.prepare_model = counting_prepare
try:
    main(pretrain, sys.argv[2:])
finally:
    with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as f:
        json.dump(calls[0], f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("compile_on", ["false", "true"])
def test_ddp_accumulation_all_reduces_once_per_step(tmp_path, shakespeare, compile_on):
    script = tmp_path / "counting.py"
    script.write_text(COUNTING_PRETRAIN)
    counts = {}
    for accum in (1, 4):
        args = [
            *SMOKE,
            f"--data.source={shakespeare}",
            f"--data.dir={tmp_path / 'data'}",
            f"--run.out_dir={tmp_path / f'run{accum}'}",
        ]
        args += [
            f"--train.grad_accum={accum}",
            "--train.max_steps=5",
            "--train.eval_interval=100",
            f"--train.compile={compile_on}",
        ]
        out = torchrun(script, str(tmp_path / f"count{accum}"), *args, env=EAGER)
        assert out.returncode == 0, out.stderr[-3000:]
        counts[accum] = json.loads((tmp_path / f"count{accum}.0").read_text())
    # 4 micro-batches per step, still one gradient all-reduce per bucket per step
    assert counts[1] > 0 and counts[4] == counts[1]


# ----------------------------------------------------------------------------- FSDP2 through the trainer


@pytest.mark.slow
def test_fsdp2_trainer_checkpoints_after_eval_resumes_and_saves_a_plain_model(tmp_path, shakespeare):
    script = tmp_path / "fsdp_pretrain.py"
    script.write_text(FSDP_PRETRAIN)
    common = [*SMOKE, f"--data.source={shakespeare}", f"--data.dir={tmp_path / 'data'}", "--train.max_steps=12"]
    common += [
        "--train.eval_interval=4",
        "--train.checkpoint_interval=4",
        "--train.eval_iters=3",
        "--train.keep_checkpoints=3",
    ]  # 3 batches on 2 ranks
    whole = torchrun(script, *common, f"--run.out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "FSDPGPT" in whole.stderr  # sharded, really
    run_dir = tmp_path / "whole"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_000004",
        "step_000008",
        "step_000012",
    ]  # each right after an eval
    assert set(load_file(run_dir / "model.safetensors")) == plain_keys()
    load_run(run_dir)  # strict, into a plain GPT

    shutil.copytree(run_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000012")
    again = torchrun(script, *common, f"--run.out_dir={tmp_path / 'cut'}")
    assert again.returncode == 0 and "step_000008" in again.stderr, again.stderr[-3000:]
    whole_m, cut_m = metrics(run_dir), metrics(tmp_path / "cut")
    assert cut_m[12]["val_loss"] == pytest.approx(whole_m[12]["val_loss"], abs=1e-4)
    a, b = load_file(run_dir / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # one process, no FSDP, the same global batches
    plain = run_script("pretrain.py", *common, f"--run.out_dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr
    assert metrics(tmp_path / "plain")[12]["val_loss"] == pytest.approx(whole_m[12]["val_loss"], abs=0.05)


FSDP_LOSS = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from dist_gpt.config import GPTConfig
from dist_gpt.model import GPT
from dist_gpt.runtime import fsdp_mixed_precision

dist.init_process_group("gloo")
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
reference = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
reference.load_state_dict(model.state_dict())
policy = fsdp_mixed_precision("bf16")
for block in model.transformer.h:
    fully_shard(block, mp_policy=policy)
fully_shard(model, mp_policy=policy)
x = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(1))
_, loss = model(x, x, return_logits=False)
logits, _ = reference.to(torch.bfloat16)(x)  # what FSDP2's param_dtype=bf16 computes: every weight and activation in bf16
by_hand = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten())
if dist.get_rank() == 0:
    json.dump({"dtype": str(loss.dtype), "loss": loss.item(), "by_hand": by_hand.item(), "bf16": loss.bfloat16().item()}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_bf16_loss_is_computed_and_returned_in_fp32(tmp_path):
    script = tmp_path / "fsdp_loss.py"
    script.write_text(FSDP_LOSS)
    out = torchrun(script, str(tmp_path / "loss.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "loss.json").read_text())
    assert r["dtype"] == "torch.float32"
    assert r["loss"] != r["bf16"]  # not rounded to bf16 (4.1875 for 4.1804, as it was)
    assert r["loss"] == pytest.approx(r["by_hand"], abs=2e-3)  # the cross-entropy of bf16 logits, in fp32


# ----------------------------------------------------------------------------- mixed precision, fused AdamW, loss scaler


def test_bf16_autocast_and_fused_adamw_through_the_trainer(tmp_path, shakespeare):
    args = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--train.max_steps=6",
    ]
    out = run_script("pretrain.py", *args, "--train.mixed_precision=bf16")
    assert out.returncode == 0, out.stderr
    assert "precision bf16" in out.stderr and "fused AdamW" in out.stderr
    rows = metrics(tmp_path / "run")
    assert rows[6]["val_loss"] < rows[0]["val_loss"]
    # fp32 master weights
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "run" / "model.safetensors").values())


SCALER_PRETRAIN = """
import sys
import torch
import accelerate
from dist_gpt.cli import main
from dist_gpt.stages import pretrain

init = accelerate.Accelerator.__init__
def with_scaler(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.scaler = torch.amp.GradScaler("cpu", init_scale=float(sys.argv[1]), growth_interval=2)  # as fp16 on a GPU has
accelerate.Accelerator.__init__ = with_scaler
main(pretrain, sys.argv[2:])
"""


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_loss_scaler_is_saved_and_restored(tmp_path, shakespeare):
    script = tmp_path / "scaler.py"
    script.write_text(SCALER_PRETRAIN)
    args = [
        *SMOKE,
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--train.checkpoint_interval=3",
    ]
    first = subprocess.run(
        [sys.executable, str(script), "1024", *args, "--train.max_steps=6"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    trainer = json.loads((tmp_path / "run" / "checkpoints" / "step_000006" / "trainer.json").read_text())
    saved = trainer["parts"]["scaler"]
    assert saved["scale"] == 1024 * 2**3  # grew every 2 finite steps: 6 steps
    # resumed with a fresh scaler of another initial scale: the checkpoint's scale wins and keeps growing
    second = subprocess.run(
        [sys.executable, str(script), "1", *args, "--train.max_steps=8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0 and "step_000006" in second.stderr, second.stderr
    resumed = json.loads((tmp_path / "run" / "checkpoints" / "step_000008" / "trainer.json").read_text())["parts"][
        "scaler"
    ]
    assert resumed["scale"] == 1024 * 2**4


# ----------------------------------------------------------------------------- small things a GPU would show


def test_rng_state_holds_the_current_cuda_device_only(monkeypatch):
    from dist_gpt.checkpoint import RNGState

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state was saved"))
    state = RNGState().state_dict()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restored onto every device"))
    RNGState().load_state_dict(state)
    assert len(restored) == 1


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA GeForce RTX 4080", None),
    ],
)
def test_mfu_peak_matches_whole_names(name, entry):
    found = peak_flops(name)
    assert (found[1] if found else None) == entry


def test_mfu_counts_an_untied_embedding_as_a_lookup():
    tied = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16))
    untied = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_weights=False))
    # untied adds an LM head of the embedding's size (a matmul) but its wte lookup costs no FLOPs: the same count
    assert untied.estimate_flops_per_token() == tied.estimate_flops_per_token()
