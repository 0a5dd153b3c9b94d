"""Muon + AdamW (dist_gpt/optim.py): the orthogonalisation, the two update rules, the trainer's grouping, save/resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import run_script
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from dist_gpt.config import TrainConfig
from dist_gpt.model import GPT, GPTConfig
from dist_gpt.optim import MuonAdamW, make_optimizer, orthogonalize


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(**{**dict(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0), **overrides})
    )


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    """Steps on batches of a learnable sequence (next = 3 * token + 1 mod 17) from random starts; the losses."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = [torch.randint(0, 17, (4,), generator=gen)]
        for _ in range(8):
            idx.append((3 * idx[-1] + 1) % 17)
        idx = torch.stack(idx, dim=1)  # (4, 9)
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_orthogonalize_gives_singular_values_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * 5
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic iteration's band, not exactly 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh  # the exact orthogonalisation
    assert torch.nn.functional.cosine_similarity(o.flatten(), polar.flatten(), dim=0) > 0.97
    assert torch.equal(orthogonalize(torch.zeros(shape)), torch.zeros(shape))  # no NaN from a zero gradient
    stack = torch.stack([g, 2 * g.flip(0), -g])
    batched = orthogonalize(stack)  # one batch of matmuls, as the optimizer does for same-shaped matrices
    torch.testing.assert_close(batched, torch.stack([orthogonalize(m) for m in stack]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 32), (3, 48, 48)])
def test_orthogonalize_in_fp32_agrees_with_bf16(shape):
    """fp32 is what CPUs without bf16 instructions run (dist_gpt/hardware.py): the same map, a little more exact."""
    torch.manual_seed(0)
    g = torch.randn(shape)
    fp32, bf16 = orthogonalize(g, dtype=torch.float32), orthogonalize(g, dtype=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert torch.equal(bf16, orthogonalize(g))  # bf16 stays the default (GPUs)
    assert torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0) > 0.999
    assert (fp32 - bf16).abs().max() < 0.05
    s = torch.linalg.svdvals(fp32)
    assert s.min() > 0.6 and s.max() < 1.25


def test_muon_newton_schulz_dtype_is_a_constructor_choice_not_state():
    torch.manual_seed(0)
    w0 = torch.randn(12, 8)
    grads = [torch.randn(12, 8) for _ in range(3)]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(w0.clone())
        opt = MuonAdamW([{"params": [w], "muon": True}], lr=0.05, ns_dtype=dtype)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results[dtype] = w.detach()
        # a machine's choice, not the run's
        assert "ns_dtype" not in json.dumps(opt.state_dict()["param_groups"], default=str)
    torch.testing.assert_close(results[torch.float32], results[torch.bfloat16], rtol=0, atol=0.01)
    assert not torch.equal(results[torch.float32], results[torch.bfloat16])


class Regression(nn.Module):
    """A small MLP whose every parameter gets a well-conditioned gradient (unlike attention's key bias, whose is 0)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(17, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 17))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(idx)
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ours, ref = Regression(), Regression()
    ref.load_state_dict(ours.state_dict())
    kw = dict(lr=3e-2, betas=(0.9, 0.99))

    def groups(model: nn.Module) -> list[dict]:
        ps = list(model.parameters())
        return [
            {"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0},
        ]

    a = train_steps(ours, MuonAdamW(groups(ours), **kw), 10)
    b = train_steps(ref, torch.optim.AdamW(groups(ref), **kw), 10)
    assert a == pytest.approx(b, rel=1e-5) and a[-1] < a[0] - 0.5
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_muon_step_is_nesterov_momentum_then_orthogonalised():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 4))
    opt = MuonAdamW([{"params": [w], "muon": True}], lr=0.1, momentum=0.9)
    grads = [torch.randn(12, 4) for _ in range(2)]
    expected, buf = w.detach().clone(), torch.zeros(12, 4)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        expected -= 0.1 * 3**0.5 * orthogonalize(g + 0.9 * buf)  # tall 12 x 4: scaled by sqrt(12 / 4)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}])


@pytest.mark.parametrize("tie", [True, False])
def test_make_optimizer_gives_muon_the_block_matrices_only(tie):
    model = tiny_gpt(tie_weights=tie)
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.05 and not opt.param_groups[0]["muon"]
    in_muon = {names[id(p)] for p in muon[0]["params"]}
    expected = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert in_muon == expected and len(expected) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    adam = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert adam == set(names.values()) - expected  # embeddings, head, biases, norms
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)


def test_muon_learns():
    model = tiny_gpt()
    losses = train_steps(model, make_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02)), 30, seed=3)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_state_dict_round_trip_continues_exactly():
    """Save through torch.distributed.checkpoint's full state dict (as the trainer does), load into a fresh optimizer, continue."""
    t = TrainConfig(optimizer="muon", lr=3e-3)
    model = tiny_gpt()
    opt = make_optimizer(model, t)
    train_steps(model, opt, 3)
    # as if saved
    osd = copy.deepcopy(
        get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    )
    assert {slot for slots in osd["state"].values() for slot in slots} == {
        "step",
        "exp_avg",
        "exp_avg_sq",
        "momentum_buffer",
    }

    fresh = tiny_gpt(seed=5)
    fresh.load_state_dict(model.state_dict())
    fresh_opt = make_optimizer(fresh, t)
    set_optimizer_state_dict(fresh, fresh_opt, osd, options=StateDictOptions(full_state_dict=True))
    assert train_steps(fresh, fresh_opt, 3, seed=9) == train_steps(model, opt, 3, seed=9)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_pretrain_with_muon_resumes_bit_identically(tmp_path, shakespeare):
    """20 steps, then the same command with max_steps 30, equals a straight 30-step run (constant LR: the schedule ignores max_steps)."""
    common = [
        "--config",
        "configs/smoke.yaml",
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        "--train.optimizer=muon",
        "--train.lr_decay=constant",
    ]
    common += [
        "--model.pos_emb=rope",
        "--model.qk_norm=true",
        "--model.attn_impl=matmul",
    ]  # the model options on the user path too
    logs = []
    for name, steps in (("resumed", 20), ("resumed", 30), ("straight", 30)):
        out = run_script("pretrain.py", *common, f"--run.out_dir={tmp_path / name}", f"--train.max_steps={steps}")
        assert out.returncode == 0, out.stderr
        logs.append(out.stderr)
    assert "resuming from" in logs[1] and "step_000020" in logs[1]

    def curve(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss"), r.get("lr")) for r in rows]

    resumed, straight = curve(tmp_path / "resumed"), curve(tmp_path / "straight")
    assert resumed == straight and resumed[-1][0] == 30
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "model.safetensors"
    ).read_bytes()
    sample = run_script(
        "sample.py", "--run", str(tmp_path / "straight"), "--prompt", "ROMEO:", "--max_new_tokens", "20"
    )
    assert sample.returncode == 0, sample.stderr
