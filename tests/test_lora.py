"""LoRA finetuning: only the adapters train, the saved model is the merged plain GPT (same logits as
base + adapter), the adapter is saved alone too, and a LoRA run resumes bit for bit (also under DDP)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from safetensors.torch import load_file

from dist_gpt import lora
from dist_gpt.checkpoint import list_checkpoints, save_weights
from dist_gpt.config import Config, GPTConfig, load_config, save_config
from dist_gpt.errors import UserError
from dist_gpt.model import GPT
from dist_gpt.rundir import RunDir, load_run
from dist_gpt.stages import check_finetune_resume
from dist_gpt.tokenizers import train_tokenizer

SHAPE = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(REPO / "configs/accelerate/cpu.yaml"),
]


def randomize_adapters(model: torch.nn.Module) -> None:
    """peft starts B at zero (the adapter adds nothing); give A and B values so merging has something to do."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, shakespeare) -> Path:
    """A run directory as pretrain leaves it (config, tokenizer, weights), with untrained weights: enough to adapt."""
    run_dir = tmp_path_factory.mktemp("parent")
    tok = train_tokenizer("char", [shakespeare.read_text()], 0)
    cfg = Config(model=GPTConfig(**{**SHAPE.__dict__, "vocab_size": tok.vocab_size}))
    torch.manual_seed(0)
    save_config(cfg, run_dir / "config.yaml")
    tok.save(run_dir / "tokenizer.json")
    save_weights(GPT(cfg.model).state_dict(), run_dir / "model.safetensors")
    return run_dir


def test_merge_gives_the_live_models_logits_and_changes_nothing():
    torch.manual_seed(0)
    base = GPT(SHAPE)
    plain_keys = set(base.state_dict())
    model = lora.attach(base, rank=4, alpha=8.0, dropout=0.0).eval()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }
    randomize_adapters(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model.state_dict(), scale=8.0 / 4)
    assert set(merged) == plain_keys
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())  # merging is functional
    plain = GPT(SHAPE).eval()
    plain.load_state_dict(merged)
    x = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=0, atol=2e-5)
        assert not torch.allclose(plain(x)[0], GPT(SHAPE).eval()(x)[0])  # the adapters do change the function


def lora_args(parent: Path, tmp_path: Path, sonnets: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", "configs/finetune_sonnets.yaml", f"--finetune.init_from={parent}", "--finetune.lora_rank=4", "--finetune.lora_dropout=0.1",
        f"--data.source={sonnets}", f"--data.dir={tmp_path / 'data'}", f"--run.out_dir={tmp_path / name}",
        "--train.time_budget_s=0", "--train.max_steps=6", "--train.checkpoint_interval=3", "--train.eval_interval=3", "--train.eval_iters=2",
        "--train.batch_size=8", "--train.lr=1e-2", "--train.warmup_steps=0", "--train.sample_tokens=0", "--log.wandb=false", "--log.progress=false", *extra,
    ]  # fmt: skip


def check_lora_run(parent: Path, run_dir: Path) -> None:
    """Only adapters moved; model.safetensors is their merge; adapter.safetensors holds them alone."""
    base = load_file(parent / "model.safetensors")
    # the training module: base layers + adapters
    trained = load_file(list_checkpoints(run_dir / "checkpoints")[0] / "model.safetensors")
    adapters = {k for k in trained if ".lora_" in k}
    assert len(adapters) == 2 * 4 * SHAPE.n_layer  # A and B for c_attn, attn.c_proj, c_fc, mlp.c_proj
    for key, w in trained.items():
        if key not in adapters:
            assert torch.equal(w, base[key.replace(".base_layer.", ".")]), key
    assert all(trained[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # B starts at 0: it trained

    merged = load_file(run_dir / "model.safetensors")
    expected = lora.merged_state_dict(trained, scale=16.0 / 4)
    assert merged.keys() == base.keys() and all(torch.equal(merged[k], v) for k, v in expected.items())
    assert {k for k in base if not torch.equal(merged[k], base[k])} == {
        k for k in base if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
    }
    live = lora.attach(GPT(SHAPE), rank=4, alpha=16.0, dropout=0.1).eval()
    live.load_state_dict(trained)
    x = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_run(run_dir).model(x)[0], live(x)[0], rtol=0, atol=2e-5)

    adapter = load_file(run_dir / "adapter.safetensors")
    assert adapter.keys() == adapters and all(torch.equal(adapter[k], trained[k]) for k in adapters)
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config == {
        "kind": "lora",
        "rank": 4,
        "alpha": 16.0,
        "scale": 4.0,
        "dropout": 0.1,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "adapter_name": "default",
        "base": str(parent),
    }


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_lora_run_trains_adapters_exports_merged_and_resumes_exactly(parent, tmp_path, sonnets):
    out = run_script("finetune.py", *lora_args(parent, tmp_path, sonnets, "run"))
    assert out.returncode == 0, out.stderr
    assert "(0.004M trainable)" in out.stderr  # 2 layers x (512 + 256 + 640 + 640) adapter weights
    run_dir = tmp_path / "run"
    check_lora_run(parent, run_dir)

    # drop the last checkpoint and rerun the same command: it resumes at step 3 and ends with the same bytes
    first = {name: (run_dir / name).read_bytes() for name in ("model.safetensors", "adapter.safetensors")}
    shutil.rmtree(list_checkpoints(run_dir / "checkpoints")[0])
    again = run_script("finetune.py", *lora_args(parent, tmp_path, sonnets, "run"))
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "step_000003" in again.stderr
    assert {name: (run_dir / name).read_bytes() for name in first} == first

    # the same directory with other LoRA settings cannot resume it
    for extra, ok in (
        (["--finetune.lora_rank=4"], True),
        (["--finetune.lora_rank=8"], False),
        (["--finetune.lora_rank=0"], False),
    ):
        cfg = load_config(
            "configs/finetune_sonnets.yaml",
            [f"--finetune.init_from={parent}", "--finetune.lora_dropout=0.1", *extra],
            "finetune",
        )
        if ok:
            check_finetune_resume(cfg, RunDir(path=run_dir, stage="finetune", resume_from=run_dir))
        else:
            with pytest.raises(
                UserError, match=f"holds a finetune with finetune.lora_rank=4 and this command asks for {extra[0][-1]}"
            ):
                check_finetune_resume(cfg, RunDir(path=run_dir, stage="finetune", resume_from=run_dir))


@pytest.mark.slow
def test_lora_under_two_process_ddp(parent, tmp_path, sonnets):
    from test_pretrain import free_port

    launcher = [*ACCELERATE, "--main_process_port", str(free_port())]
    out = run_script(
        "finetune.py", *lora_args(parent, tmp_path, sonnets, "run"), launcher=launcher, env={"OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr
    assert (
        "world size 2 (MULTI_CPU, DistributedDataParallel)" in out.stderr
        and "weights identical on all 2 ranks" in out.stderr
    )
    run_dir = tmp_path / "run"
    check_lora_run(parent, run_dir)
    # resumed under DDP from its step-3 checkpoint, it ends with the same bytes
    first = {name: (run_dir / name).read_bytes() for name in ("model.safetensors", "adapter.safetensors")}
    shutil.rmtree(list_checkpoints(run_dir / "checkpoints")[0])
    launcher = [*ACCELERATE, "--main_process_port", str(free_port())]
    again = run_script(
        "finetune.py", *lora_args(parent, tmp_path, sonnets, "run"), launcher=launcher, env={"OMP_NUM_THREADS": "1"}
    )
    assert again.returncode == 0 and "step_000003" in again.stderr, again.stderr
    assert {name: (run_dir / name).read_bytes() for name in first} == first
