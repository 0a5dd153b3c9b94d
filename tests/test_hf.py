"""Hugging Face interop: export to a transformers GPT-2 folder, import a GPT-2 folder (offline, tiny models)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import run_script, toy_gpt2_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dist_gpt.checkpoint import save_weights
from dist_gpt.config import Config, GPTConfig, save_config
from dist_gpt.errors import UserError
from dist_gpt.hf import export_hf, load_hf_gpt2, load_hf_tokenizer, main, to_hf_config
from dist_gpt.model import GPT
from dist_gpt.rundir import load_run
from dist_gpt.tokenizers import GPT2_FILE_ENV, BPETokenizer, CharTokenizer, Tokenizer, train_tokenizer

ODD = "Héllo, wörld!\n\n  tabs\tand ÿ 漢字 😀 the end"


def make_run(run_dir: Path, tokenizer: Tokenizer, **model: object) -> GPT:
    """A run directory as pretrain leaves it (config.yaml, tokenizer.json, model.safetensors), with random non-zero weights."""
    cfg = Config()
    cfg.model = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, **model
    )
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # biases and LayerNorm too: every weight matters
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    save_weights(gpt.state_dict(), run_dir / "model.safetensors")
    return gpt.eval()


@pytest.fixture(scope="module")
def text(shakespeare: Path) -> str:
    return shakespeare.read_text()[:20_000]


@pytest.fixture(scope="module")
def bpe(text: str) -> BPETokenizer:
    return train_tokenizer("bpe", [text], vocab_size=300)


def assert_same_model(ours: GPT, hf_dir: Path, ids: list[int]) -> None:
    """transformers' model from hf_dir: the same logits and the same greedy continuation as ours."""
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-5, rtol=1e-5)
        n_new = ours.config.block_size - len(ids)
        greedy = theirs.generate(x, max_new_tokens=n_new, do_sample=False)
    assert greedy.tolist() == ours.generate(x, n_new, temperature=0).tolist()


def test_export_char_run_loads_in_transformers(tmp_path, text):
    """The acceptance path: launch/export_hf.py, then AutoModelForCausalLM / AutoTokenizer offline."""
    tok = train_tokenizer("char", [text], 0)
    gpt = make_run(tmp_path / "run", tok)
    out = tmp_path / "hf"
    result = run_script("export_hf.py", "--run", str(tmp_path / "run"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".dist_gpt_export",  # the marker: only such a folder may be replaced by --overwrite
        "README.md",  # the model card (no loss.png: this run has no metrics.jsonl)
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert (config["n_positions"], config["n_inner"], config["activation_function"], config["tie_word_embeddings"]) == (
        32,
        64,
        "gelu_new",
        True,
    )
    # a char vocabulary has no end-of-text token
    assert config["bos_token_id"] is None and config["eos_token_id"] is None

    hf_tok = AutoTokenizer.from_pretrained(out)
    sample = text[5000:5020]
    ids = tok.encode(sample)
    assert hf_tok(sample)["input_ids"] == ids
    assert hf_tok.decode(ids) == sample
    # '~' is not in the vocabulary: replaced, as data.unknown=replace
    assert hf_tok("a~b")["input_ids"] == tok.encode("a b")
    assert_same_model(gpt, out, ids)

    again = run_script("export_hf.py", "--run", str(tmp_path / "run"), "--out", str(out))
    assert (
        again.returncode == 2
        and again.stderr.strip().splitlines()[-1].startswith("error:")
        and "--overwrite" in again.stderr
    )


@pytest.mark.parametrize(
    "model",
    [
        dict(tie_weights=False, bias=False, activation="relu", mlp_ratio=2),  # untied head, zero biases
        dict(mlp=False),  # a zero MLP: exactly no MLP
        dict(activation="relu2"),  # transformers' ACT2FN has the squared ReLU too
        dict(activation="gelu_exact", bias=False),  # nanoGPT's form (the lecture config): GPT-2's "gelu"
    ],
)
def test_export_bpe_variants(tmp_path, bpe, model):
    gpt = make_run(tmp_path / "run", bpe, **model)
    export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _m: None)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(ODD)["input_ids"] == bpe.encode(ODD)
    assert hf_tok.decode(bpe.encode(ODD)) == ODD
    assert_same_model(gpt, tmp_path / "hf", bpe.encode("ROMEO:\nWhat light")[:20])


def test_export_gpt2_tokenizer(tmp_path, monkeypatch):
    """A gpt2-tokenizer run: the tokenizer goes out as a tokenizers BPE (a toy ranks file stands in for GPT-2's)."""
    monkeypatch.setenv(GPT2_FILE_ENV, str(toy_gpt2_file(tmp_path / "gpt2.tiktoken", [b"th", b"the", b" the", b"e\n"])))
    tok = train_tokenizer("gpt2", [], 0)
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8, dropout=0.0)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    tok.save(tmp_path / "run" / "tokenizer.json")
    save_weights(GPT(cfg.model).state_dict(), tmp_path / "run" / "model.safetensors")
    export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _m: None)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(ODD)["input_ids"] == tok.encode(ODD)
    assert hf_tok.eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == hf_tok.eos_token_id


@pytest.mark.parametrize(
    ("switch", "named"),
    [
        (dict(kind="bigram"), "kind=bigram"),
        (dict(layernorm=False), "layernorm=False"),
        (dict(residual=False), "residual=False"),
        (dict(pos_emb="rope"), "pos_emb=rope"),
        (dict(qk_norm=True), "qk_norm"),
    ],
)
def test_export_refuses_what_gpt2_cannot_express(switch, named):
    with pytest.raises(UserError, match=named) as refused:
        to_hf_config(GPTConfig(vocab_size=65, **switch))
    # the switches a run chooses (not the lecture's ablations) come with the settings that make it exportable
    assert ("--model.pos_emb=learned --model.qk_norm=false" in str(refused.value)) == (
        "pos_emb" in named or "qk_norm" in named
    )


def test_export_never_writes_into_a_folder_it_did_not_create(tmp_path, text):
    make_run(tmp_path / "run", train_tokenizer("char", [text], 0))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(UserError, match="already holds files that no export wrote"):
            main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), *extra])
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"] and (
        tmp_path / "hf" / "notes.txt"
    ).read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "empty")])
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf", "run"]  # no temporary folder left beside it


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("tied", [True, False])
def test_import_random_gpt2(tmp_path, bpe, tied):
    """A randomly initialised GPT2LMHeadModel saved locally maps onto GPT: same logits, same tokenizer."""
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=bpe.vocab_size,
        n_positions=24,
        n_embd=16,
        n_layer=2,
        n_head=4,
        n_inner=48,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_model.save_pretrained(tmp_path / "gpt2")
    PreTrainedTokenizerFast(tokenizer_object=bpe.to_hf()).save_pretrained(tmp_path / "gpt2")

    cfg, state, tok = load_hf_gpt2(f"hf:{tmp_path / 'gpt2'}")
    assert (cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.mlp_ratio, cfg.tie_weights, cfg.vocab_size) == (
        24,
        16,
        2,
        4,
        3,
        tied,
        bpe.vocab_size,
    )
    assert isinstance(tok, BPETokenizer) and tok.encode(ODD) == bpe.encode(ODD) and tok.decode(tok.encode(ODD)) == ODD
    ours = GPT(cfg)
    ours.load_state_dict(state)  # strict
    ours.eval()
    x = torch.tensor([bpe.encode("ROMEO:\nWhat light through")[:20]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf_model(x).logits, atol=1e-5, rtol=1e-5)
    assert load_hf_tokenizer(f"hf:{tmp_path / 'gpt2'}").fingerprint() == tok.fingerprint()


def test_export_then_import_is_the_identity(tmp_path, text):
    tok = train_tokenizer("char", [text], 0)
    make_run(tmp_path / "run", tok, tie_weights=False)
    export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _m: None)
    cfg, state, back = load_hf_gpt2(f"hf:{tmp_path / 'hf'}")
    run = load_run(tmp_path / "run")
    assert cfg == run.config.model
    assert isinstance(back, CharTokenizer) and back.fingerprint() == tok.fingerprint()
    original = run.model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


def test_import_errors(tmp_path, bpe):
    # HF_HUB_OFFLINE=1 (conftest): one clear error, no network
    with pytest.raises(UserError, match="could not be downloaded.*hf:DIR"):
        load_hf_gpt2("hf:someone/not-a-local-model")
    with pytest.raises(UserError, match="no such model folder"):
        load_hf_gpt2(f"hf:{tmp_path / 'missing' / 'dir'}")

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="only the GPT-2 architecture"):
        load_hf_gpt2(f"hf:{tmp_path / 'llama'}")

    variant = GPT2Config(
        vocab_size=bpe.vocab_size,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        activation_function="gelu_fast",
        scale_attn_by_inverse_layer_idx=True,
    )
    variant.save_pretrained(tmp_path / "variant")
    with pytest.raises(UserError, match="activation_function=.gelu_fast.*scale_attn_by_inverse_layer_idx"):
        load_hf_gpt2(f"hf:{tmp_path / 'variant'}")

    GPT2Config(vocab_size=bpe.vocab_size, n_positions=8, n_embd=8, n_layer=1, n_head=2).save_pretrained(
        tmp_path / "noweights"
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe.to_hf()).save_pretrained(tmp_path / "noweights")
    with pytest.raises(UserError, match="no .safetensors weights"):
        load_hf_gpt2(f"hf:{tmp_path / 'noweights'}")


@pytest.mark.parametrize(
    "weights",
    ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "weights.pkl", "pytorch_model.bin.index.json"],
)
def test_import_refuses_pickled_weights_by_name(tmp_path, bpe, weights):
    """A folder whose weights are pickle files is refused before anything reads them (the file here would fail to unpickle)."""
    folder = tmp_path / "pickled"
    GPT2Config(vocab_size=bpe.vocab_size, n_positions=8, n_embd=8, n_layer=1, n_head=2).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe.to_hf()).save_pretrained(folder)
    (folder / weights).write_bytes(b"not a pickle: loading it would raise")
    with pytest.raises(UserError, match=f"holds its weights as {weights}: pickle files.*never unpickles"):
        load_hf_gpt2(f"hf:{folder}")


def test_import_refuses_an_index_pointing_to_pickles(tmp_path, bpe):
    folder = tmp_path / "sharded"
    GPT2Config(vocab_size=bpe.vocab_size, n_positions=8, n_embd=8, n_layer=1, n_head=2).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe.to_hf()).save_pretrained(folder)
    index = {
        "metadata": {},
        "weight_map": {"transformer.wte.weight": "model-00001.bin", "lm_head.weight": "model-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="points to model-00001.bin: dist_gpt reads weights from safetensors files"):
        load_hf_gpt2(f"hf:{folder}")


def test_import_reads_sharded_safetensors(tmp_path, bpe):
    """save_pretrained's shards and index: the same weights as one file."""
    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=bpe.vocab_size, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None
    )
    hf_model = GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path / "one")
    hf_model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    for folder in ("one", "shards"):
        PreTrainedTokenizerFast(tokenizer_object=bpe.to_hf()).save_pretrained(tmp_path / folder)
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file() and not (
        tmp_path / "shards" / "model.safetensors"
    ).exists()
    _, one, _ = load_hf_gpt2(f"hf:{tmp_path / 'one'}")
    _, shards, _ = load_hf_gpt2(f"hf:{tmp_path / 'shards'}")
    assert one.keys() == shards.keys() and all(torch.equal(one[k], shards[k]) for k in one)


def test_finetune_from_a_local_hf_folder(tmp_path, bpe, shakespeare):
    """`--finetune.init_from=hf:PATH` end to end: the finetune starts from the HF weights and trains."""
    config = GPT2Config(
        vocab_size=bpe.vocab_size,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    PreTrainedTokenizerFast(tokenizer_object=bpe.to_hf()).save_pretrained(tmp_path / "gpt2")
    parent_cfg, parent_state, _ = load_hf_gpt2(f"hf:{tmp_path / 'gpt2'}")
    result = run_script(
        "finetune.py",
        f"--finetune.init_from=hf:{tmp_path / 'gpt2'}",
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'ft'}",
        *(
            "--train.batch_size=4",
            "--train.max_steps=3",
            "--train.warmup_steps=0",
            "--train.eval_interval=3",
            "--train.eval_iters=2",
            "--train.sample_tokens=0",
        ),
        *("--train.mixed_precision=no", "--train.compile=false", "--log.wandb=false", "--log.progress=false"),
    )
    assert result.returncode == 0, result.stderr
    run = load_run(tmp_path / "ft")
    # the kernel: chosen on this machine
    assert run.config.model == dataclasses.replace(parent_cfg, attn_impl=run.config.model.attn_impl)
    # the folder's tokenizer.json (save_pretrained adds a no-op post-processor)
    assert run.tokenizer.encode(ODD) == bpe.encode(ODD)
    trained = run.model.state_dict()
    assert trained.keys() == parent_state.keys() and any(not torch.equal(trained[k], parent_state[k]) for k in trained)
