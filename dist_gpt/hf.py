"""Hugging Face interop: a run as a `transformers` GPT-2 folder, and a GPT-2 folder as `GPT` weights.

    export_hf("runs/shakespeare_char", "hf/shakespeare_char")
    AutoModelForCausalLM.from_pretrained("hf/shakespeare_char")    # the same logits as GPT
    AutoTokenizer.from_pretrained("hf/shakespeare_char")           # encodes like the run's tokenizer

    config, state, tokenizer = load_hf_gpt2("hf:path/to/gpt2")     # or "hf:gpt2" (downloaded when online)
    model = GPT(config); model.load_state_dict(state)

Our module names are GPT-2's; the differences are that transformers' Conv1D layers hold their weight as
[in, out] (transposed against nn.Linear), that a tied LM head is not stored, and that GPT-2 always has
biases and an MLP. So `bias=False` exports zero biases and `mlp=False` a zero MLP (both exact), while
`kind=bigram`, `layernorm=False`, `residual=False`, `pos_emb=rope` and `qk_norm`
have no GPT-2 form (`zero_init_proj` and `attn_impl` change nothing in the exported function).
Nothing here runs code from a model folder (no `trust_remote_code`), and weights are read from
safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_gpt.checkpoint import save_weights
from dist_gpt.config import GPTConfig
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write_json, atomic_write_text, read_json
from dist_gpt.rundir import load_run
from dist_gpt.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored [in, out] by transformers
ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "relu2": "relu2"}  # ours -> GPT-2's (our gelu is the tanh approximation)
HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "relu2": "relu2"}  # GPT-2's -> ours
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which GPT uses; GPT-2's too
PREFIX = "hf:"


# ----------------------------------------------------------------------------- config


def to_hf_config(c: GPTConfig) -> Any:
    """The `transformers.GPT2Config` of a GPT, or a UserError naming the switch GPT-2 cannot express."""
    from transformers import GPT2Config

    impossible = {
        "kind=bigram (a lookup table, not a Transformer)": c.kind == "bigram",
        "layernorm=False (GPT-2 always normalises)": not c.layernorm,
        "residual=False (GPT-2 always has residual connections)": not c.residual,
        "pos_emb=rope (GPT-2 learns a position embedding table)": c.pos_emb != "learned",
        "qk_norm=True (GPT-2 does not normalise queries and keys)": c.qk_norm,
    }
    found = [what for what, bad in impossible.items() if bad]
    if found:
        raise UserError(f"this model cannot be exported as a transformers GPT-2: model.{'; model.'.join(found)}")
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.mlp_ratio * c.n_embd,
        activation_function=ACTIVATIONS[c.activation],
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,  # set by export_hf when the tokenizer has an end-of-text token
        eos_token_id=None,
        architectures=["GPT2LMHeadModel"],
    )


def from_hf_config(hf: dict[str, Any], where: str) -> GPTConfig:
    """Our GPTConfig for a GPT-2 config.json, or a UserError saying which setting has no equivalent."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where} holds a {hf.get('model_type')!r} model; only the GPT-2 architecture (model_type gpt2) can be imported")
    n_embd, n_inner, act = hf.get("n_embd", 768), hf.get("n_inner"), hf.get("activation_function", "gelu_new")
    checks = {
        f"activation_function={act!r} (supported: {', '.join(HF_ACTIVATIONS)})": act in HF_ACTIVATIONS,
        f"layer_norm_epsilon={hf.get('layer_norm_epsilon')} (GPT uses {LAYER_NORM_EPS})": hf.get("layer_norm_epsilon", LAYER_NORM_EPS) == LAYER_NORM_EPS,
        "scale_attn_weights=false": hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx=true": not hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention=true": not hf.get("add_cross_attention", False),
        f"n_inner={n_inner} (must be a multiple of n_embd={n_embd})": n_inner is None or n_inner % n_embd == 0,
    }
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{where}: this GPT-2 variant has no dist_gpt equivalent: {'; '.join(bad)}")
    return GPTConfig(
        kind="gpt",
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=hf.get("resid_pdrop", 0.1),
        bias=True,
        mlp=True,
        mlp_ratio=(n_inner or 4 * n_embd) // n_embd,
        activation=HF_ACTIVATIONS[act],
        residual=True,
        layernorm=True,
        tie_weights=hf.get("tie_word_embeddings", True),
    )


# ----------------------------------------------------------------------------- weights


def _shapes(c: GPTConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of a GPT with this config (built on the meta device: no memory, no init cost)."""
    from dist_gpt.model import GPT

    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(c).state_dict().items()}


def to_hf_state(state: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT weights -> GPT2LMHeadModel weights: Conv1D transposes; zeros where GPT has no bias or no MLP; no tied head."""
    full = dataclasses.replace(c, bias=True, mlp=True)  # the parameter set GPT-2 always has
    out = {}
    for key, shape in _shapes(full).items():
        tensor = state[key] if key in state else torch.zeros(shape, dtype=state["transformer.wte.weight"].dtype)  # zero bias / zero MLP: exact
        out[key] = tensor.t().contiguous() if key.endswith(CONV1D) else tensor.contiguous()
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], c: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel weights -> GPT weights (a state dict `GPT(c).load_state_dict` takes strictly)."""
    expected = _shapes(c)
    missing = [k for k in expected if k not in hf_state]
    if missing:
        raise UserError(f"{where} lacks the weights {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: not a complete GPT-2 model")
    out = {}
    for key, shape in expected.items():
        tensor = hf_state[key].t() if key.endswith(CONV1D) else hf_state[key]
        if tensor.shape != shape:
            raise UserError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)} for its config.json")
        out[key] = tensor.detach().to(torch.float32).contiguous()
    return out


# ----------------------------------------------------------------------------- tokenizers


def _gpt2_hf_tokenizer(tok: GPT2Tokenizer) -> Any:
    """tiktoken's GPT-2 encoding as a `tokenizers.Tokenizer` (transformers' converter; ids as in HF's own 'gpt2')."""
    import base64
    import tempfile

    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:  # the converter reads the ranks from a file in tiktoken's format
        ranks = Path(tmp) / "gpt2.tiktoken"
        ranks.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in tok.enc._mergeable_ranks.items()))
        return TikTokenConverter(vocab_file=str(ranks), pattern=tok.enc._pat_str, extra_special_tokens=tok.enc._special_tokens).converted()


def to_hf_tokenizer(tok: Tokenizer) -> Any:
    """A `tokenizers.Tokenizer` that encodes like `tok` (char: one WordLevel token per character)."""
    return _gpt2_hf_tokenizer(tok) if isinstance(tok, GPT2Tokenizer) else tok.to_hf()


def from_hf_tokenizer(hf_tok: Any) -> Tokenizer:
    """A dist_gpt tokenizer around a `tokenizers.Tokenizer`: a char vocabulary (as `export_hf` writes it) becomes
    a CharTokenizer again; anything else (GPT-2's byte-level BPE, ...) is wrapped by BPETokenizer."""
    model = json.loads(hf_tok.to_str())["model"]
    vocab = model.get("vocab")
    if model.get("type") == "WordLevel" and isinstance(vocab, dict) and all(len(c) == 1 for c in vocab):
        chars = sorted(vocab)
        if [vocab[c] for c in chars] == list(range(len(chars))):
            return CharTokenizer(chars)
    return BPETokenizer(hf_tok)


# ----------------------------------------------------------------------------- export


def export_hf(run_dir: str | Path, out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write RUN_DIR's model and tokenizer as a transformers GPT-2 folder; every file atomically.

    out_dir gets config.json, generation_config.json, model.safetensors (float32, GPT-2 layout),
    tokenizer.json and tokenizer_config.json.
    """
    from transformers import GenerationConfig

    run = load_run(run_dir)
    c, out = run.config.model, Path(out_dir)
    hf_config = to_hf_config(c)
    hf_tok = to_hf_tokenizer(run.tokenizer)
    eos = "<|endoftext|>" if hf_tok.token_to_id("<|endoftext|>") is not None else None
    if eos:  # GPT-2's tokenizer: generation stops at end-of-text, as with OpenAI's GPT-2
        hf_config.bos_token_id = hf_config.eos_token_id = hf_tok.token_to_id(eos)
    state = to_hf_state(run.model.state_dict(), c)
    save_weights(state, out / "model.safetensors", metadata={"format": "pt"})  # transformers wants the format tag
    atomic_write_text(out / "config.json", hf_config.to_json_string())
    atomic_write_text(out / "generation_config.json", GenerationConfig.from_model_config(hf_config).to_json_string())
    atomic_write_text(out / "tokenizer.json", hf_tok.to_str())
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size, "clean_up_tokenization_spaces": False}
    if eos:
        tok_config.update(bos_token=eos, eos_token=eos)
    atomic_write_json(out / "tokenizer_config.json", tok_config)
    n = sum(t.numel() for t in state.values())
    log(f"exported {run.run_dir} ({n / 1e6:.2f}M parameters, tokenizer {run.tokenizer.kind}) to {out} as a transformers GPT-2 model")
    return out


# ----------------------------------------------------------------------------- import


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_hf(spec: str) -> Path:
    """The local folder of `hf:PATH` / `hf:NAME` (downloading NAME's config, safetensors and tokenizer files when online)."""
    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    if not name:
        raise UserError("hf: needs a folder or a model name, e.g. hf:path/to/gpt2 or hf:gpt2")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (config.json is missing)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"hf:{name}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, not found, gated, no network: all mean "no local copy"
        why = "HF_HUB_OFFLINE is set" if _offline() else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UserError(
            f"hf:{name} is not a local folder and could not be downloaded from the Hugging Face Hub ({why}); "
            f"download it where there is network (`huggingface-cli download {name} --local-dir DIR`) and pass hf:DIR"
        ) from None


def load_hf_tokenizer(spec: str) -> Tokenizer:
    """The dist_gpt tokenizer of a Hugging Face model folder (`hf:PATH` / `hf:NAME`), without loading weights.

    tokenizer.json if present, else what `AutoTokenizer` builds from vocab.json + merges.txt; with neither,
    a 50257-token model gets tiktoken's GPT-2 encoding.
    """
    import tokenizers

    path = resolve_hf(spec)
    if (path / "tokenizer.json").is_file():
        try:
            return from_hf_tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
        except Exception as e:  # tokenizers raises a plain Exception on a bad file
            raise UserError(f"{path / 'tokenizer.json'} is not a tokenizers file ({e})") from None
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from transformers import AutoTokenizer

        return from_hf_tokenizer(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False).backend_tokenizer)
    if read_json(path / "config.json", "model config").get("vocab_size") == 50257:
        return GPT2Tokenizer()
    raise UserError(f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt): add the tokenizer files of the model")


def load_hf_gpt2(spec: str) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    """A Hugging Face GPT-2-architecture model as (GPTConfig, float32 state dict for `GPT`, dist_gpt tokenizer).

    spec is `hf:PATH` (a local folder: config.json, *.safetensors, tokenizer files) or `hf:NAME` (a Hub
    model, downloaded when online; offline it is a UserError). `GPT(config).load_state_dict(state)` is strict.
    """
    from transformers import GPT2LMHeadModel

    path = resolve_hf(spec)
    config = from_hf_config(read_json(path / "config.json", "model config"), str(path))
    tokenizer = load_hf_tokenizer(str(path))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path} has no .safetensors weights (dist_gpt never unpickles .bin files): convert them with transformers' save_pretrained")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the weights in {path}: {str(e).splitlines()[0]}") from None
    return config, from_hf_state(hf_model.state_dict(), config, str(path)), tokenizer


# ----------------------------------------------------------------------------- the command


def main(args: list[str]) -> Path:
    """The `launch/export_hf.py` command."""
    from dist_gpt.cli import ArgParser

    p = ArgParser(
        prog="launch/export_hf.py",
        description="Write a run's model and tokenizer as a transformers GPT-2 folder (config.json, model.safetensors, "
        "generation_config.json, tokenizer.json, tokenizer_config.json) that AutoModelForCausalLM and AutoTokenizer load.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory written by pretrain or finetune")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it already holds files")
    opts = p.parse_args(args)
    out = Path(opts.out)
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:
        raise UserError(f"{out} already holds files; pass --overwrite to write the export into it, or choose another --out")
    export_hf(opts.run, out)
    return out
