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
Nothing here runs code from a model folder (no `trust_remote_code`), and weights are read by
safetensors itself, never unpickled: a folder whose weights are .bin/.pt/.pth/.ckpt/.pkl files is refused.

An export goes into a folder of its own (never a run directory, the run, a folder above it or the
repository), written beside it under a temporary name and then renamed into place; it holds the marker
EXPORT_MARKER, and only a folder with that marker is replaced by `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_gpt.checkpoint import save_weights
from dist_gpt.config import GPTConfig, clip, shorten
from dist_gpt.errors import UserError
from dist_gpt.io import atomic_write_json, atomic_write_text, disk_error, read_json
from dist_gpt.rundir import is_run_dir, load_run
from dist_gpt.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer

# stored [in, out] by transformers
CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
ACTIVATIONS = {
    "gelu": "gelu_new",
    "gelu_exact": "gelu",
    "relu": "relu",
    "relu2": "relu2",
}  # ours -> GPT-2's (our gelu is the tanh approximation)
HF_ACTIVATIONS = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "relu": "relu",
    "relu2": "relu2",
}  # GPT-2's -> ours
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which GPT uses; GPT-2's too
PREFIX = "hf:"
EXPORT_MARKER = ".dist_gpt_export"  # in every folder export_hf writes: only such a folder may be replaced (--overwrite)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights dist_gpt refuses to load
REPO = Path(__file__).resolve().parents[1]


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
        retrain = (
            "; retrain with --model.pos_emb=learned --model.qk_norm=false (the 5-minute CPU config uses both) for a model that exports"
            if c.pos_emb != "learned" or c.qk_norm
            else ""
        )
        raise UserError(
            f"this model cannot be exported as a transformers GPT-2: model.{'; model.'.join(found)}{retrain}"
        )
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
        raise UserError(
            f"{where} holds a {hf.get('model_type')!r} model; only the GPT-2 architecture (model_type gpt2) can be imported"
        )
    n_embd, n_inner, act = hf.get("n_embd", 768), hf.get("n_inner"), hf.get("activation_function", "gelu_new")
    checks = {
        f"activation_function={act!r} (supported: {', '.join(HF_ACTIVATIONS)})": act in HF_ACTIVATIONS,
        f"layer_norm_epsilon={hf.get('layer_norm_epsilon')} (GPT uses {LAYER_NORM_EPS})": hf.get(
            "layer_norm_epsilon", LAYER_NORM_EPS
        )
        == LAYER_NORM_EPS,
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
        # zero bias / zero MLP: exact
        tensor = state[key] if key in state else torch.zeros(shape, dtype=state["transformer.wte.weight"].dtype)
        out[key] = tensor.t().contiguous() if key.endswith(CONV1D) else tensor.contiguous()
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], c: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel weights -> GPT weights (a state dict `GPT(c).load_state_dict` takes strictly)."""
    expected = _shapes(c)
    missing = [k for k in expected if k not in hf_state]
    if missing:
        raise UserError(
            f"{where} lacks the weights {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: not a complete GPT-2 model"
        )
    out = {}
    for key, shape in expected.items():
        tensor = hf_state[key].t() if key.endswith(CONV1D) else hf_state[key]
        if tensor.shape != shape:
            raise UserError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)} for its config.json"
            )
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
        ranks.write_text(
            "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in tok.enc._mergeable_ranks.items())
        )
        return TikTokenConverter(
            vocab_file=str(ranks), pattern=tok.enc._pat_str, extra_special_tokens=tok.enc._special_tokens
        ).converted()


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


def export_hf(
    run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Write RUN_DIR's model and tokenizer as a transformers GPT-2 folder, with a model card; all or nothing.

    out_dir gets config.json, generation_config.json, model.safetensors (float32, GPT-2 layout),
    tokenizer.json, tokenizer_config.json, README.md (the model card), loss.png (when the run has
    metrics) and the marker EXPORT_MARKER. Everything is written into a temporary folder beside out_dir,
    which then takes out_dir's place. See `check_out_dir` for where an export may go.
    """
    from dist_gpt.hub import write_model_card

    run = load_run(run_dir)
    # absolute and normalised: '.' and '..' have no name to put a temp folder beside
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    replace = check_out_dir(out, run.run_dir, overwrite)
    hf_config = to_hf_config(run.config.model)  # refuses what GPT-2 cannot express before anything is written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(out.parent, e) from None
    tmp = out.with_name(f".{out.name}.export-tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        n = write_export(run, hf_config, tmp)
        write_model_card(run, tmp, n_params=sum(p.numel() for p in run.model.parameters()))
        atomic_write_json(tmp / EXPORT_MARKER, {"format": "dist_gpt.export", "run": str(run.run_dir.resolve())})
        swap_in(tmp, out, replace)
    except OSError as e:
        raise disk_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"exported {run.run_dir} ({n / 1e6:.2f}M parameters, tokenizer {run.tokenizer.kind}) to {out} as a transformers GPT-2 model, with a model card"
    )
    return out


def write_export(run: Any, hf_config: Any, out: Path) -> int:
    """The transformers files of a loaded run into `out`; returns the exported parameter count."""
    from transformers import GenerationConfig

    c = run.config.model
    hf_tok = to_hf_tokenizer(run.tokenizer)
    eos = "<|endoftext|>" if hf_tok.token_to_id("<|endoftext|>") is not None else None
    if eos:  # GPT-2's tokenizer: generation stops at end-of-text, as with OpenAI's GPT-2
        hf_config.bos_token_id = hf_config.eos_token_id = hf_tok.token_to_id(eos)
    state = to_hf_state(run.model.state_dict(), c)
    save_weights(state, out / "model.safetensors", metadata={"format": "pt"})  # transformers wants the format tag
    atomic_write_text(out / "config.json", hf_config.to_json_string())
    atomic_write_text(out / "generation_config.json", GenerationConfig.from_model_config(hf_config).to_json_string())
    atomic_write_text(out / "tokenizer.json", hf_tok.to_str())
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": c.block_size,
        "clean_up_tokenization_spaces": False,
    }
    if eos:
        tok_config.update(bos_token=eos, eos_token=eos)
    atomic_write_json(out / "tokenizer_config.json", tok_config)
    return sum(t.numel() for t in state.values())


def check_out_dir(out: Path, run_dir: Path, overwrite: bool) -> bool:
    """Refuse an --out that an export must never write: a file, a run directory, the run being exported or a
    folder above it, the repository (or a folder above it), or a non-empty folder that no export wrote; an
    earlier export only with `overwrite`. True when out exists and is to be replaced."""
    where, target, run = clip(str(out)), out.resolve(), run_dir.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {where} is a file; pass a folder for the export")
    if target == run or target in run.parents:
        raise UserError(
            f"--out {where} is the run being exported or a folder above it; export to a folder of its own, e.g. hf/{run.name}"
        )
    if is_run_dir(out):
        raise UserError(
            f"--out {where} is a dist_gpt run directory; an export never writes into a run: choose another folder"
        )
    if target == REPO or target in REPO.parents:
        raise UserError(
            f"--out {where} is the repository or a folder above it; export to a folder of its own, e.g. hf/{run.name}"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return out.is_dir()
    if not (out / EXPORT_MARKER).is_file():
        raise UserError(
            f"--out {where} already holds files that no export wrote (no {EXPORT_MARKER}); choose a new or empty folder"
        )
    if not overwrite:
        raise UserError(
            f"--out {where} holds an earlier export; pass --overwrite to replace it, or choose another --out"
        )
    return True


def swap_in(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished export `tmp` to `out`; an existing `out` (empty, or an earlier export) is set aside first
    and removed only once the new one is in place."""
    if not replace:
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.export-old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- import


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


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
        why = (
            "HF_HUB_OFFLINE is set" if _offline() else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
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
    raise UserError(
        f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt): add the tokenizer files of the model"
    )


def _names(names: list[str]) -> str:
    """File names for a message: the first three, each clipped."""
    shown = ", ".join(shorten(n, 60) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files holding a model folder's weights (model.safetensors, or the shards its
    model.safetensors.index.json names); a folder whose weights are pickle files is refused by name."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map: not a safetensors index")
        names = sorted(set(map(str, weight_map.values())))
        bad = [n for n in names if not n.endswith(".safetensors") or Path(n).name != n]
        if bad:
            raise UserError(
                f"{index} points to {_names(bad)}: dist_gpt reads weights from safetensors files in the folder only"
            )
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickled = sorted(
        p.name
        for p in path.iterdir()
        if p.suffix in PICKLE_SUFFIXES or p.name.endswith(tuple(f"{s}.index.json" for s in PICKLE_SUFFIXES))
    )
    if pickled:
        raise UserError(
            f"{path} holds its weights as {_names(pickled)}: pickle files, which can run code when loaded, and dist_gpt never "
            "unpickles; convert them to safetensors (transformers: from_pretrained then save_pretrained(DIR, safe_serialization=True)) where you trust them"
        )
    raise UserError(
        f"{path} has no .safetensors weights (model.safetensors or model.safetensors.index.json): not a model folder dist_gpt can load"
    )


def read_hf_state(path: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's weights from the folder's safetensors files, named as `transformers` names them
    (OpenAI's files lack the `transformer.` prefix; a tied head is not stored)."""
    from dist_gpt.checkpoint import load_weights

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(load_weights(f, "model weights"))
    state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in state.items()}
    if "lm_head.weight" not in state and config.tie_weights and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def load_hf_gpt2(spec: str) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    """A Hugging Face GPT-2-architecture model as (GPTConfig, float32 state dict for `GPT`, dist_gpt tokenizer).

    spec is `hf:PATH` (a local folder: config.json, safetensors weights, tokenizer files) or `hf:NAME` (a Hub
    model, downloaded when online; offline it is a UserError). Only safetensors are read, by safetensors
    itself: a folder of .bin/.pt/.pth/.ckpt/.pkl weights is refused. `GPT(config).load_state_dict(state)` is strict.
    """
    path = resolve_hf(spec)
    config = from_hf_config(read_json(path / "config.json", "model config"), str(path))
    tokenizer = load_hf_tokenizer(str(path))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    return config, from_hf_state(read_hf_state(path, config), config, str(path)), tokenizer


# ----------------------------------------------------------------------------- the command


def main(args: list[str]) -> Path:
    """The `launch/export_hf.py` command."""
    from dist_gpt.cli import ArgParser
    from dist_gpt.hub import check_repo_id, push_to_hub

    p = ArgParser(
        prog="launch/export_hf.py",
        description="Write a run's model and tokenizer as a transformers GPT-2 folder (config.json, model.safetensors, "
        "generation_config.json, tokenizer.json, tokenizer_config.json) that AutoModelForCausalLM and AutoTokenizer load, "
        "with a model card (README.md, loss.png); optionally upload it to the Hugging Face Hub.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory written by pretrain or finetune")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write: new, empty, or an earlier export (never a run directory)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out (a folder holding other files is never replaced)",
    )
    p.add_argument(
        "--push_to_hub",
        default="",
        metavar="OWNER/NAME",
        help="then upload the folder to this Hub model repository (needs network and a token)",
    )
    opts = p.parse_args(args)
    if opts.push_to_hub:
        check_repo_id(opts.push_to_hub)  # before the export, so a typo costs nothing
    out = export_hf(opts.run, opts.out, overwrite=opts.overwrite)
    if opts.push_to_hub:
        push_to_hub(out, opts.push_to_hub)
    return out
