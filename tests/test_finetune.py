"""The finetune stage: from a smoke pretrain, `text` and `sft` runs launched as a user launches them, the
SFT loss mask counted through the model's loss, freezing, lineage, and the errors before training."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_script
from safetensors.torch import load_file

from dist_gpt.batches import BatchLoader, eval_batches, open_split
from dist_gpt.config import GPTConfig, load_config
from dist_gpt.errors import UserError
from dist_gpt.model import GPT, IGNORE_INDEX
from dist_gpt.prepare import prepare
from dist_gpt.rundir import load_run, read_config
from dist_gpt.stages import adopt_parent, check_prepared_tokenizer, finetune, finetune_job, freeze_bottom, load_parent
from dist_gpt.tokenizers import RESPONSE_END, CharTokenizer, render_prompt, render_response

QUICK = ["--train.time_budget_s=0", "--train.eval_iters=4", "--log.wandb=false", "--log.progress=false"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, shakespeare) -> Path:
    """A smoke pretrain with a context long enough for a sonnet's prompt and the start of its response."""
    root = tmp_path_factory.mktemp("parent")
    out = run_script(
        "pretrain.py",
        "--config",
        "configs/smoke.yaml",
        f"--data.source={shakespeare}",
        f"--data.dir={root / 'data'}",
        f"--run.out_dir={root / 'run'}",
        "--model.block_size=96",
    )
    assert out.returncode == 0, out.stderr
    return root / "run"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "val_loss" in r]


def finetune_cfg(parent: Path, tmp_path: Path, *extra: str, config: str = "configs/finetune_sonnets.yaml"):
    return load_config(
        config,
        [
            f"--finetune.init_from={parent}",
            f"--run.out_dir={tmp_path / 'run'}",
            f"--data.dir={tmp_path / 'data'}",
            *extra,
        ],
        "finetune",
    )


def test_text_finetune_starts_from_the_parent_and_learns(parent, tmp_path, sonnets):
    out = run_script(
        "finetune.py",
        "--config", "configs/finetune_sonnets.yaml",
        f"--finetune.init_from={parent}", f"--data.source={sonnets}", f"--data.dir={tmp_path / 'data'}", f"--run.out_dir={tmp_path / 'run'}",
        "--train.max_steps=20", "--train.lr=3e-3", "--train.eval_interval=10", "--train.sample_tokens=16", *QUICK,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "3 characters outside the vocabulary dropped (data.unknown=drop): '(', ')'" in out.stderr
    run_dir = tmp_path / "run"

    # step 0 is the parent itself: its loss on the Sonnets' val batches, to the last bit, computed with the precision
    # and attention kernel the run resolved (auto: bf16 and matmul attention on a CPU with bf16 instructions)
    rows = evals(run_dir)
    resolved = read_config(run_dir)
    ref = GPT(dataclasses.replace(load_run(parent).config.model, attn_impl=resolved.model.attn_impl)).eval()
    ref.load_state_dict(load_run(parent).model.state_dict())
    val = open_split(tmp_path / "data", "val")
    bf16 = resolved.train.mixed_precision == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = [ref(x, y)[1].float() for x, y in eval_batches(val, 96, 32, 4, seed=1337)]
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == torch.stack(losses).mean().item()
    assert rows[-1]["step"] == 20 and rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.05

    # the shape and the tokenizer are the parent's; dropout is the config's 0.1, the attention kernel decided anew
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    theirs = yaml.safe_load((parent / "config.yaml").read_text())
    assert saved["model"] == {**theirs["model"], "dropout": 0.1, "attn_impl": resolved.model.attn_impl}
    assert (saved["data"]["tokenizer"], saved["data"]["vocab_size"]) == ("char", 65)
    assert (run_dir / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()

    # lineage: the parent's path and its summary figures
    summary = json.loads((run_dir / "summary.json").read_text())
    lineage = {
        "init_from": str(parent),
        "path": str(parent.resolve()),
        "summary": json.loads((parent / "summary.json").read_text()),
    }
    assert summary["parent"] == lineage and json.loads((run_dir / "parent.json").read_text()) == {"parent": lineage}

    # the finetune is an ordinary run: sample.py reads it unchanged
    sample = run_script("sample.py", "--run", str(run_dir), "--prompt", "When", "--max_new_tokens", "20")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("When") and len(sample.stdout) == len("When") + 20 + 1


def test_step0_model_is_the_parent(parent, tmp_path):
    """Built as the finetune builds it (dropout changed, LoRA adapters attached): the parent's logits exactly."""
    x = torch.randint(0, 65, (2, 96), generator=torch.Generator().manual_seed(0))
    expected = load_run(parent).model(x)[0]
    for extra in ([], ["--model.dropout=0.3"], ["--finetune.lora_rank=4"], ["--finetune.freeze=1"]):
        cfg = finetune_cfg(parent, tmp_path, *extra)
        p = load_parent(cfg.finetune.init_from)
        adopt_parent(cfg, p)
        model = finetune_job(cfg, p).model.eval()
        with torch.no_grad():
            assert torch.equal(model(x)[0], expected), extra
    assert cfg.model.dropout == 0.1 and cfg.model.block_size == 96


def test_freeze_keeps_embeddings_and_first_blocks(parent, tmp_path, sonnets):
    cfg = finetune_cfg(parent, tmp_path, "--finetune.freeze=1")
    p = load_parent(cfg.finetune.init_from)
    adopt_parent(cfg, p)
    trainable = {n for n, w in finetune_job(cfg, p).model.named_parameters() if w.requires_grad}
    assert trainable and all(n.startswith(("transformer.h.1.", "transformer.ln_f.")) for n in trainable)

    out = run_script(
        "finetune.py", "--config", "configs/finetune_sonnets.yaml", "--finetune.freeze=1",
        f"--finetune.init_from={parent}", f"--data.source={sonnets}", f"--data.dir={tmp_path / 'data'}", f"--run.out_dir={tmp_path / 'run'}",
        "--train.max_steps=5", "--train.lr=3e-3", "--train.sample_tokens=0", *QUICK,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    before, after = load_file(parent / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    for key, w in before.items():
        assert torch.equal(after[key], w) == (key not in trainable), key


def test_freeze_a_rope_model_which_has_no_position_table():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8, pos_emb="rope"))
    freeze_bottom(model, 1)
    trainable = {n for n, w in model.named_parameters() if w.requires_grad}
    assert trainable and all(n.startswith(("transformer.h.1.", "transformer.ln_f.")) for n in trainable)


def test_sft_loss_counts_exactly_the_response_tokens(parent, tmp_path):
    """Through the model's loss: the logits that get a gradient are exactly those predicting a response token."""
    pairs = [
        ("ab", "hello there"),
        ("a longer prompt", "yes"),
        ("x" * 40, "no " * 20),
        ("q", "a reply cut at the block " * 3),
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text(
        "".join(json.dumps({"prompt": p, "response": r, "split": "train"}) + "\n" for p, r in pairs)
        + json.dumps({"prompt": "v", "response": "w", "split": "val"})
        + "\n"
    )
    tok = load_run(parent).tokenizer
    cfg = load_config(None, [f"--data.source={source}", "--data.name=pairs"], "prepare")
    prepare(cfg.data, data_dir=tmp_path / "data", tokenizer=tok, sft=True, log=lambda _m: None)
    T = 48
    x, y = BatchLoader(
        open_split(tmp_path / "data", "train"), T, len(pairs), seed=0, mode="sequential"
    ).next_batch()  # row i = pair i

    # expected[i, t]: position t predicts a response token of pair i
    expected = torch.zeros(len(pairs), T, dtype=torch.bool)
    for i, (p, r) in enumerate(pairs):
        head, n = len(tok.encode(render_prompt(p))), len(tok.encode(render_prompt(p) + render_response(r)))
        for t in range(T):
            expected[i, t] = head <= t + 1 < n  # the target of position t is token t + 1
    assert 0 < expected.sum() < expected.numel() and torch.equal(y != IGNORE_INDEX, expected)

    torch.manual_seed(0)
    model = GPT(load_run(parent).config.model)
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    counted = logits.grad.abs().sum(-1) > 0
    assert torch.equal(counted, expected)
    by_hand = torch.nn.functional.cross_entropy(logits[expected], y[expected])
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)


def test_sft_sonnets_recipe_end_to_end(parent, tmp_path, sonnets):
    out = run_script(
        "finetune.py", "--config", "configs/sft_sonnets.yaml",
        f"--finetune.init_from={parent}", f"--data.source={sonnets}", f"--data.dir={tmp_path / 'data'}", f"--run.out_dir={tmp_path / 'run'}",
        "--train.max_steps=20", "--train.lr=3e-3", "--train.eval_interval=10", "--train.sample_tokens=8", *QUICK,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["sft"] and meta["documents"] == {"train": 139, "val": 15}
    rows = evals(tmp_path / "run")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.05
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == render_prompt("XX\nA woman's face with nature's own hand painted,")


def test_sft_jsonl_config_and_chat_sampling(parent, tmp_path):
    """The generic SFT config on a JSONL of pairs; launch/sample.py --chat then answers in the template and stops."""
    source = tmp_path / "pairs.jsonl"
    names = ["Romeo", "Juliet", "Hamlet", "Lear", "Puck", "Viola", "Iago", "Portia"]
    source.write_text(
        "".join(json.dumps({"prompt": f"Who is {n}?", "response": f"{n} is a name."}) + "\n" for n in names * 5)
    )
    out = run_script(
        "finetune.py", "--config", "configs/sft_jsonl.yaml",
        f"--finetune.init_from={parent}", f"--data.source={source}", f"--data.dir={tmp_path / 'data'}", f"--run.out_dir={tmp_path / 'run'}",
        "--train.max_steps=20", "--train.lr=3e-3", "--train.eval_interval=10", *QUICK,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "in 36 / 4 pairs" in out.stderr
    rows = evals(tmp_path / "run")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.1

    chat = run_script(
        "sample.py",
        "--run",
        str(tmp_path / "run"),
        "--chat",
        "--prompt",
        "Who is Puck?",
        "--max_new_tokens",
        "40",
        "--temperature",
        "0",
    )
    assert chat.returncode == 0, chat.stderr
    prompt = render_prompt("Who is Puck?")
    # cut where a response ends
    assert chat.stdout.startswith(prompt) and RESPONSE_END not in chat.stdout[len(prompt) :]


# ----------------------------------------------------------------------------- errors before training


def test_contradicting_shape_is_one_line_error(parent, tmp_path):
    out = run_script(
        "finetune.py",
        "--config",
        "configs/finetune_sonnets.yaml",
        f"--finetune.init_from={parent}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--model.n_layer=3",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: model.n_layer=3 contradicts the parent {parent}, which has model.n_layer=2: a finetune keeps the parent's shape; "
        "remove model.n_layer from the config and the command line (only model.dropout and model.attn_impl may change)"
    )
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_contradicting_yaml_key_and_tokenizer_choices(parent, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("model:\n  block_size: 64\nfinetune:\n  kind: text\n")
    with pytest.raises(UserError, match=r"model.block_size=64 contradicts the parent .* model.block_size=96"):
        finetune(["--config", str(config), f"--finetune.init_from={parent}"])
    with pytest.raises(UserError, match="data.tokenizer=bpe but the parent .* uses the char tokenizer"):
        finetune(
            ["--config", "configs/finetune_sonnets.yaml", f"--finetune.init_from={parent}", "--data.tokenizer=bpe"]
        )
    with pytest.raises(UserError, match="finetune.freeze=3 but the parent has only 2 blocks"):
        finetune(["--config", "configs/finetune_sonnets.yaml", f"--finetune.init_from={parent}", "--finetune.freeze=3"])
    with pytest.raises(UserError, match="finetune.init_from is required"):
        finetune(["--config", "configs/finetune_sonnets.yaml"])


def test_missing_corrupt_or_mismatched_parent_files(parent, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(parent, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints", ".lock")))

    args = ["--config", "configs/finetune_sonnets.yaml", f"--run.out_dir={tmp_path / 'run'}"]
    with pytest.raises(UserError, match="run directory not found"):
        finetune([*args, f"--finetune.init_from={tmp_path / 'nowhere'}"])
    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(
        UserError, match=f"finetune.init_from={missing}: model weights not found: {missing / 'model.safetensors'}"
    ):
        finetune([*args, f"--finetune.init_from={missing}"])
    corrupt = copy("corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is corrupt or truncated"):
        finetune([*args, f"--finetune.init_from={corrupt}"])
    swapped = copy("swapped")
    CharTokenizer(chr(c) for c in range(32, 127)).save(swapped / "tokenizer.json")
    with pytest.raises(UserError, match="tokenizer.json has 95 tokens but the model only 65"):
        finetune([*args, f"--finetune.init_from={swapped}"])
    assert not (tmp_path / "run").exists()


def test_data_prepared_with_another_tokenizer_is_refused(parent, tmp_path, sonnets):
    cfg = load_config(None, [f"--data.source={sonnets}"], "prepare")
    prepare(cfg.data, data_dir=tmp_path / "data", log=lambda _m: None)  # a char vocabulary of the Sonnets' own
    tok = load_run(parent).tokenizer
    with pytest.raises(UserError, match="tokenizer mismatch: .* prepared with a different tokenizer"):
        check_prepared_tokenizer(tmp_path / "data", tok)
    cfg.data.unknown = "drop"
    # what the finetune does: now it matches
    prepare(cfg.data, data_dir=tmp_path / "data", tokenizer=tok, log=lambda _m: None)
    check_prepared_tokenizer(tmp_path / "data", tok)


def test_hf_parent_loads_the_same_model(parent, tmp_path):
    from dist_gpt.hf import export_hf

    export_hf(parent, tmp_path / "hf", log=lambda _m: None)
    theirs, ours = load_parent(f"hf:{tmp_path / 'hf'}"), load_parent(str(parent))
    # the same model; the attention kernel is no part of it (a run records the one its machine chose, hf: says auto)
    assert dataclasses.replace(theirs.config, attn_impl=ours.config.attn_impl) == ours.config
    assert theirs.tokenizer.fingerprint() == ours.tokenizer.fingerprint()
    assert theirs.state.keys() == ours.state.keys() and all(
        torch.equal(theirs.state[k], v) for k, v in ours.state.items()
    )
    assert theirs.summary is None
