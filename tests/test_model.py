"""The GPT model: shapes, loss, switches, weight tying, KV cache and sampling (tiny models, CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_gpt.errors import UserError
from dist_gpt.model import GPT, GPTConfig, _Decoder, sample_next

V = 17  # a vocabulary size no layer width divides, to catch transposed shapes


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**{**base, **overrides})


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides))


# the lecture ladder, each rung the same GPT class with switches (tiny widths)
RUNGS = {
    "01_bigram": dict(kind="bigram"),
    "02_one_head": dict(n_layer=1, n_head=1, mlp=False, residual=False, layernorm=False, bias=False),
    "03_multi_head": dict(n_layer=1, n_head=4, mlp=False, residual=False, layernorm=False, bias=False),
    "04_feed_forward": dict(
        n_layer=1, n_head=4, mlp=True, mlp_ratio=1, activation="relu", residual=False, layernorm=False, bias=False
    ),
    "05_residual": dict(
        n_layer=3, n_head=4, mlp_ratio=4, activation="relu", residual=True, layernorm=False, bias=False
    ),
    "06_layernorm": dict(n_layer=3, n_head=4, activation="relu", layernorm=True, bias=False),
    "07_full": dict(n_layer=3, n_head=4, dropout=0.2),
}


# ----------------------------------------------------------------------------- shape, size, init


def test_lecture_configuration_parameter_count():
    model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2))
    assert model.num_params(non_embedding=False) == 10_770_816
    assert model.num_params() == 10_770_816 - 256 * 384  # position embedding left out
    assert model.estimate_flops_per_token() == 6 * 10_672_512 + 12 * 6 * 384 * 256


def test_forward_shapes_and_names():
    model = build()
    idx = torch.randint(0, V, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, V) and loss is None
    keys = set(model.state_dict())
    for name in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.ln_f.weight",
    ):
        assert name in keys
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 16, 16)  # fused q, k, v


def test_init_loss_is_about_ln_vocab():
    model = build(n_layer=2, n_embd=32, n_head=4)
    torch.manual_seed(1)
    idx, targets = torch.randint(0, V, (16, 8)), torch.randint(0, V, (16, 8))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(V)) < 0.15


def test_init_scales_residual_projections():
    model = GPT(tiny(n_layer=8, n_embd=64, n_head=4))
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_zero_vocab_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size"):
        GPT(tiny(vocab_size=0))
    with pytest.raises(UserError, match="divisible"):
        GPT(tiny(n_head=3))


def test_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        build()(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------- weight tying and saving


def test_tied_head_is_one_tensor_and_one_key():
    model = build()
    sd = model.state_dict()
    assert not hasattr(model, "lm_head") and not any(k.startswith("lm_head") for k in sd)
    assert sum(p is model.transformer.wte.weight for p in model.parameters()) == 1
    # the head really is the embedding: its gradient gets both contributions
    idx = torch.randint(0, V, (2, 8))
    model(idx, idx)[1].backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_untied_head_is_separate():
    model = build(tie_weights=False)
    assert model.lm_head.weight.shape == (V, 16) and model.lm_head.bias is None
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert model.num_params(non_embedding=False) == build().num_params(non_embedding=False) + V * 16


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_round_trip_is_strict(tmp_path, tie):
    model, fresh = build(seed=0, tie_weights=tie), build(seed=1, tie_weights=tie)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict by default
    idx = torch.randint(0, V, (2, 8))
    assert torch.equal(model(idx)[0], fresh(idx)[0])


# ----------------------------------------------------------------------------- loss


def test_causality():
    model = build()
    idx = torch.randint(0, V, (2, 8))
    base = model(idx)[0]
    for t in range(8):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        logits = model(changed)[0]
        assert torch.equal(logits[:, :t], base[:, :t])  # the past never sees the future
        assert not torch.allclose(logits[:, t], base[:, t])


def test_ignored_targets_do_not_count_and_the_loss_is_fp32():
    model = build()
    idx, targets = torch.randint(0, V, (4, 8)), torch.randint(0, V, (4, 8))
    keep = torch.rand(4, 8) > 0.5
    keep[0, 0] = True
    logits, ignored = model(idx, targets.masked_fill(~keep, -100))
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(ignored, by_hand)
    _, none = model(idx, torch.full_like(targets, -100))
    assert none.item() == 0.0  # nothing to learn from, and not NaN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_logits, low_loss = model(idx, targets)
        no_logits, same_loss = model(idx, targets, return_logits=False)
    # the loss of bf16 logits, computed in fp32
    assert low_logits.dtype == torch.bfloat16 and low_loss.dtype == torch.float32
    assert no_logits is None and torch.equal(low_loss, same_loss)
    by_hand = torch.nn.functional.cross_entropy(low_logits.float().flatten(0, 1), targets.flatten())
    assert torch.equal(low_loss, by_hand)


# ----------------------------------------------------------------------------- the lecture's switches


def fit(model: GPT, steps: int = 25) -> tuple[float, float]:
    """Train on one fixed batch of a learnable sequence (next = 3 * token + 1 mod V); eval-mode loss before and after."""
    torch.manual_seed(0)
    data = [torch.randint(0, V, (8,))]
    for _ in range(8):
        data.append((3 * data[-1] + 1) % V)
    data = torch.stack(data, dim=1)  # (8, 9)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(x, y)[1].item()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return before, eval_loss()


@pytest.mark.parametrize("rung", RUNGS)
def test_each_lecture_rung_builds_and_trains(rung):
    model = build(**RUNGS[rung])
    before, after = fit(model)
    assert after < 0.8 * before, (rung, before, after)


def test_switches_shape_the_state_dict():
    assert list(build(kind="bigram").state_dict()) == ["bigram_table.weight"]
    keys = set(build(layernorm=False, mlp=False).state_dict())
    assert not any("ln_" in k or "mlp" in k for k in keys)
    assert any(k.startswith("transformer.h.0.attn") for k in keys)
    assert not any(k.endswith("bias") for k in build(bias=False).state_dict())


@pytest.mark.parametrize("activation", ["gelu", "relu", "relu2"])
def test_activations(activation):
    model = build(activation=activation)
    assert model(torch.randint(0, V, (1, 8)))[0].shape == (1, 8, V)


def test_dropout_only_in_training():
    model = build(dropout=0.5)
    idx = torch.randint(0, V, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


# ----------------------------------------------------------------------------- KV cache and sampling


@pytest.mark.parametrize("kind", ["gpt", "bigram"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])  # 13 > block_size 8
def test_kv_cache_logits_equal_recompute_at_every_step(kind, prompt_len):
    model = build(kind=kind, n_layer=3).eval()
    torch.manual_seed(2)
    idx = torch.randint(0, V, (3, prompt_len))
    cached, full = _Decoder(model, idx, use_cache=True), _Decoder(model, idx, use_cache=False)
    with torch.no_grad():
        for step in range(30):  # slides the 8-token window several times
            torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            # and both against the plain forward pass over the current window (the bigram: its table row for the last token)
            expected = (
                model.bigram_table.weight[full.window[:, -1]] if kind == "bigram" else model(full.window)[0][:, -1]
            )
            torch.testing.assert_close(cached.logits, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            token = torch.randint(0, V, (3,))
            cached.push(token)
            full.push(token)
            assert cached.window.size(1) <= 8


def test_window_keeps_half_a_block_after_sliding():
    model = build().eval()
    decoder = _Decoder(model, torch.randint(0, V, (1, 8)), use_cache=True)
    with torch.no_grad():
        decoder.push(torch.tensor([3]))
    assert decoder.window.size(1) == 4 and decoder.window[0, -1] == 3
    assert decoder.caches[0].length == 4


def test_cache_with_chunked_tokens_matches_forward():
    model = build().eval()
    idx = torch.randint(0, V, (2, 8))
    from dist_gpt.model import KVCache

    caches = [KVCache(8) for _ in range(2)]
    with torch.no_grad():
        first = model._body(idx[:, :3], caches)
        rest = model._body(idx[:, 3:], caches)  # 5 new tokens on top of 3 cached ones
        full = model._body(idx)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_with_and_without_cache_agree():
    model = build()
    idx = torch.randint(0, V, (2, 3))
    a = model.generate(idx, 25, temperature=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(idx, 25, temperature=0.9, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert a.shape == (2, 28) and torch.equal(a, b) and torch.equal(a[:, :3], idx)


def test_greedy_is_deterministic_and_argmax():
    model = build()
    idx = torch.randint(0, V, (2, 2))
    out = model.generate(idx, 12, temperature=0)
    assert torch.equal(out, model.generate(idx, 12, temperature=0))
    with torch.no_grad():
        seq = idx
        # naive greedy decoding without sliding (14 > 8, so crop like nanoGPT until the window slides)
        for _ in range(12):
            if seq.size(1) > 8:
                break
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, : seq.size(1)], seq)


def test_seeded_generator_reproduces():
    model = build()
    idx = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(idx, 20, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_generate_stream_yields_a_token_per_step_and_restores_mode():
    model = build(dropout=0.1)
    model.train()
    idx = torch.zeros(2, 1, dtype=torch.long)
    tokens = []
    for token in model.generate_stream(idx, 5, generator=torch.Generator().manual_seed(0)):
        assert model.training  # eval only while a step computes
        tokens.append(token)
    assert [t.shape for t in tokens] == [(2,)] * 5
    assert torch.equal(
        torch.stack(tokens, 1), model.generate(idx, 5, generator=torch.Generator().manual_seed(0))[:, 1:]
    )
    assert model.training and model.generate(idx, 0).shape == (2, 1)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.75, generator=gen).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(sample_next(logits, top_p=0.85, generator=gen).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_p=0.5, generator=gen).tolist()) == {0}
    assert set(sample_next(logits, generator=gen).tolist()) == {0, 1, 2, 3}
    assert set(sample_next(logits, top_k=1, generator=gen).tolist()) == {0}
    assert set(sample_next(logits, temperature=0).tolist()) == {0}
    # a low temperature sharpens: the likeliest token dominates
    assert (sample_next(logits, temperature=0.1, generator=gen) == 0).float().mean() > 0.95


def test_bad_sampling_arguments():
    model = build()
    idx = torch.zeros(1, 1, dtype=torch.long)
    for kwargs in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(idx, 2, **kwargs)
        with pytest.raises(ValueError):
            model.generate_stream(idx, 2, **kwargs)  # at the call, before the first token


def test_config_is_the_shared_dataclass():
    from dist_gpt import config

    assert GPTConfig is config.GPTConfig
    assert dataclasses.asdict(build().config)["vocab_size"] == V


# ----------------------------------------------------------------------------- speed options (rope, qk_norm, zero-init, matmul attention)

OPTIONS = {
    "rope": dict(pos_emb="rope"),
    "qk_norm": dict(qk_norm=True),
    "zero_init_proj": dict(zero_init_proj=True),
    "matmul": dict(attn_impl="matmul"),
    "speedrun": dict(
        pos_emb="rope", qk_norm=True, zero_init_proj=True, attn_impl="matmul", activation="relu2", tie_weights=False
    ),
}


@pytest.mark.parametrize("options", OPTIONS)
def test_each_option_trains(options):
    before, after = fit(build(**OPTIONS[options]))
    assert after < 0.8 * before, (options, before, after)


@pytest.mark.parametrize("options", ["rope", "qk_norm", "speedrun"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])  # 13 > block_size 8
def test_kv_cache_equals_recompute_with_options(options, prompt_len):
    """Positions count from the window start with and without the cache, so the sliding window stays exact under RoPE."""
    model = build(n_layer=3, **OPTIONS[options]).eval()
    for p in model.parameters():  # zero-init projections would make every block the identity: give them weights
        if p.abs().sum() == 0 and p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    torch.manual_seed(2)
    idx = torch.randint(0, V, (3, prompt_len))
    cached, full = _Decoder(model, idx, use_cache=True), _Decoder(model, idx, use_cache=False)
    with torch.no_grad():
        for step in range(30):
            torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            token = torch.randint(0, V, (3,))
            cached.push(token)
            full.push(token)


def test_rope_has_no_position_table_and_depends_on_distance_only():
    from dist_gpt.model import rotate

    model = build(pos_emb="rope")
    assert not any("wpe" in k for k in model.state_dict())
    assert model.num_params() == model.num_params(non_embedding=False)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda i, j: (rotate(q, i) * rotate(k, j)).sum().item()  # noqa: E731
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5) and score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert torch.equal(rotate(q, 0), q)  # position 0 is not turned
    assert rotate(q, 5).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)  # a rotation
    with pytest.raises(UserError, match="even head size"):
        GPT(tiny(pos_emb="rope", n_embd=18, n_head=2))


def test_qk_norm_makes_attention_blind_to_query_and_key_scale():
    model, scaled = build(qk_norm=True).eval(), build(qk_norm=True).eval()
    with torch.no_grad():
        for block in scaled.transformer.h:
            block.attn.c_attn.weight[: 2 * 16] *= 10.0  # the query and key rows; values untouched
            block.attn.c_attn.bias[: 2 * 16] *= 10.0
    idx = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(model(idx)[0], scaled(idx)[0], rtol=1e-4, atol=1e-4)
    plain = build().eval()
    assert not torch.allclose(plain(idx)[0], build(qk_norm=True).eval()(idx)[0])  # it does change the model


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = build(zero_init_proj=True).eval()
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(torch.equal(p, torch.zeros_like(p)) for p in projections)
    idx = torch.randint(0, V, (2, 8))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(8))  # the biases are zero at init too
    torch.testing.assert_close(model(idx)[0], model._head(t.ln_f(x)))
    assert build().transformer.h[0].attn.c_proj.weight.abs().sum() > 0  # default: GPT-2's scaled normal


def test_matmul_attention_equals_sdpa():
    sdpa, matmul = build(n_layer=3), build(n_layer=3, attn_impl="matmul")
    assert list(sdpa.state_dict()) == list(matmul.state_dict())
    idx = torch.randint(0, V, (4, 8))
    for model in (sdpa, matmul):
        model.eval()
    torch.testing.assert_close(sdpa(idx, idx)[0], matmul(idx, idx)[0], rtol=1e-5, atol=1e-5)
    grads = []
    for model in (sdpa, matmul):
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    dropping = build(attn_impl="matmul", dropout=0.5).train()
    assert not torch.equal(dropping(idx)[0], dropping(idx)[0])  # attention dropout in training


def test_options_are_validated_by_the_config():
    from dist_gpt.config import load_config

    cfg = load_config(
        None,
        ["--model.pos_emb=rope", "--model.qk_norm=true", "--train.optimizer=muon", "--train.muon_lr=0.05"],
        "pretrain",
    )
    assert (cfg.model.pos_emb, cfg.model.qk_norm, cfg.train.optimizer, cfg.train.muon_lr) == (
        "rope",
        True,
        "muon",
        0.05,
    )
    for bad, message in (
        ("--model.pos_emb=alibi", "not one of"),
        ("--model.attn_impl=flash", "not one of"),
        ("--train.muon_momentum=1", "muon_momentum"),
        ("--train.muon_lr=0", "muon_lr"),
    ):
        with pytest.raises(UserError, match=message):
            load_config(None, [bad], "pretrain")
    with pytest.raises(UserError, match="even head size"):
        load_config(None, ["--model.pos_emb=rope", "--model.n_embd=30", "--model.n_head=2"], "pretrain")
