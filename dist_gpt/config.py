"""Run configuration: one dataclass per section, read from YAML and `--section.key=value` overrides.

    cfg = load_config(["--config", "configs/smoke.yaml", "--train.lr=3e-4"], stage="pretrain")

Every field carries a one-line help text (shown by `--help`) and, where it has a fixed set of
values, its choices. Unknown keys, wrong types and impossible values raise `UserError`
before any work starts. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_gpt.errors import UserError


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help line (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    out_dir: str = opt("", "run directory; empty means runs/<data.name> (runs/<data.name>_<finetune.kind> for finetunes)")
    seed: int = opt(1337, "seed for model init, the data stream and evaluation batches (shared by all ranks) and dropout (seed + rank)")
    resume: str = opt("auto", "auto: continue from the newest complete checkpoint in out_dir; never: refuse an existing out_dir", ("auto", "never"))
    overwrite: bool = opt(False, "with resume=never, delete an existing out_dir and start over")


@dataclass
class DataConfig:
    name: str = opt("shakespeare_char", "dataset name; names the prepared folder data/<name>/")
    source: str = opt("", "text file, directory, glob, comma-separated files, .jsonl, .parquet, URL or Hugging Face dataset name")
    sha256: str = opt("", "expected SHA-256 of a downloaded source file (checked after download)")
    dir: str = opt("", "where the prepared arrays go; empty means data/<name>")
    text_field: str = opt("text", "column holding the text in .jsonl / parquet / Hub sources")
    recipe: str = opt("", "name of a recipe file in the repository's data/ folder, without .py (e.g. sonnets_sft), that turns the source into records")
    tokenizer: str = opt("char", "char: one token per character; bpe: byte-level BPE trained on the corpus; gpt2: tiktoken GPT-2", ("char", "bpe", "gpt2"))
    vocab_size: int = opt(2048, "BPE vocabulary size to train (tokenizer=bpe only)")
    val_fraction: float = opt(0.1, "share of the corpus held out for validation (the last part of a single document)")
    num_proc: int = opt(1, "processes for Dataset.map while tokenizing")
    errors: str = opt("strict", "bytes that are not UTF-8: strict stops with an error, replace substitutes U+FFFD", ("strict", "replace"))
    unknown: str = opt("error", "characters missing from an existing char vocabulary: error, drop, or replace with a known one", ("error", "drop", "replace"))
    loader: str = opt("random", "random: seeded random windows (the lecture's get_batch); sequential: walk the tokens without replacement", ("random", "sequential"))
    # sharded data (README, "Sharded data"): many token files plus a manifest, prepared while the source streams
    shard_tokens: int = opt(0, "when > 0, prepare the corpus as token shards of this many tokens (streaming the source); 0: one train.bin and val.bin")
    val_tokens: int = opt(0, "sharded data: the first N tokens of the stream are the val split (FineWeb as modded-nanogpt: 10485761)")
    eot: bool = opt(False, "sharded data: the tokenizer's end-of-text token before every document (gpt2 only: <|endoftext|>, as llm.c and modded-nanogpt)")
    prepare_rank: int = opt(0, "sharded prepare: this worker's index; worker R prepares input files R, R + W, ... (launch/prepare.py only)")
    prepare_world: int = opt(1, "sharded prepare: how many workers (processes or nodes) split the input files; the last to finish writes meta.json")
    disk_budget_gb: float = opt(0.0, "fetched shards: the most disk their local copies may take (GB); older ones are deleted behind the reader; 0: no limit")
    prefetch_shards: int = opt(2, "fetched shards: how many to fetch ahead of the one being read")


@dataclass
class GPTConfig:
    """The model's shape and the lecture's switches. `GPT(GPTConfig(...))` builds it."""

    kind: str = opt("gpt", "gpt: the Transformer; bigram: the lecture's bigram lookup table", ("gpt", "bigram"))
    vocab_size: int = opt(0, "vocabulary size; 0 takes it from the tokenizer")
    block_size: int = opt(256, "context length in tokens")
    n_layer: int = opt(6, "number of Transformer blocks")
    n_head: int = opt(6, "attention heads per block (1 = the lecture's single head)")
    n_embd: int = opt(384, "embedding width")
    dropout: float = opt(0.2, "dropout probability")
    bias: bool = opt(True, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    mlp: bool = opt(True, "feed-forward (MLP) sublayer in each block")
    mlp_ratio: int = opt(4, "MLP hidden width as a multiple of n_embd")
    activation: str = opt("gelu", "MLP non-linearity", ("gelu", "relu", "relu2"))
    residual: bool = opt(True, "residual connections around attention and MLP")
    layernorm: bool = opt(True, "pre-LayerNorm before each sublayer and a final LayerNorm")
    tie_weights: bool = opt(True, "LM head shares its weight with the token embedding")
    init: str = opt("gpt2", "gpt2: normal(0, 0.02) weights, residual projections scaled by depth; torch: PyTorch's layer defaults, as in the lecture video", ("gpt2", "torch"))
    # speed options from the public speedrun literature; the defaults are the lecture model (BENCHMARKS.md measures them)
    pos_emb: str = opt("learned", "position information: learned: a position embedding table (GPT-2); rope: rotary embeddings on queries and keys", ("learned", "rope"))
    qk_norm: bool = opt(False, "RMS-normalise each head's queries and keys before attention")
    zero_init_proj: bool = opt(False, "start the projections into the residual stream (attn and MLP c_proj) at zero")
    attn_impl: str = opt("sdpa", "attention kernel in training: sdpa: F.scaled_dot_product_attention; matmul: plain matmul + softmax (faster under bf16 on some CPUs)", ("sdpa", "matmul"))


@dataclass
class TrainConfig:
    batch_size: int = opt(64, "micro-batch size per process, in sequences")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step (ignored when tokens_per_step is set)")
    tokens_per_step: int = opt(0, "tokens per optimizer step; when > 0, grad_accum is derived from it and the process count")
    max_steps: int = opt(5000, "optimizer steps to train")
    time_budget_s: float = opt(0.0, "when > 0, stop after this many seconds of training; the LR schedule follows elapsed time")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = opt(100, "linear warmup steps")
    lr_decay: str = opt("cosine", "shape of the decay after warmup", ("cosine", "linear", "constant"))
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    optimizer: str = opt("adamw", "adamw; muon: Muon for the blocks' weight matrices, AdamW (train.lr) for embeddings, head, biases and norms", ("adamw", "muon"))
    muon_lr: float = opt(0.02, "Muon peak learning rate (follows the same schedule as train.lr)")
    muon_momentum: float = opt(0.95, "Muon (Nesterov) momentum")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 disables")
    eval_interval: int = opt(250, "evaluate every N steps (and at step 0 and the end)")
    eval_at_start: bool = opt(True, "evaluate once before the first step (step 0)")
    eval_iters: int = opt(200, "batches per split at each evaluation, split across processes")
    log_interval: int = opt(10, "write a metrics line every N steps")
    checkpoint_interval: int = opt(500, "write a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(2, "complete checkpoints to keep")
    mixed_precision: str = opt("auto", "auto: bf16 where it is fast (GPU with bf16; a CPU with bf16 instructions and n_embd >= 256 or attn_impl=matmul), fp16 on older GPUs, else no", ("auto", "no", "bf16", "fp16"))
    threads: int = opt(0, "CPU threads per process; 0: OMP_NUM_THREADS if set (except the 1 that accelerate launch sets by default), else the cores divided among this machine's processes")
    compile: str = opt("auto", "torch.compile the model; auto: on for CUDA, off on CPU", ("auto", "true", "false"))
    on_nan: str = opt("stop", "a NaN/inf loss: stop the run, or skip that optimizer step", ("stop", "skip"))
    sample_prompt: str = opt("\n", "prompt of the sample generated at each evaluation")
    sample_tokens: int = opt(200, "tokens generated at each evaluation; 0 disables")


@dataclass
class LogConfig:
    wandb: bool = opt(True, "log to Weights & Biases through Accelerate (offline unless credentials exist)")
    project: str = opt("dist_gpt", "W&B project")
    run_name: str = opt("", "W&B run name; empty means the run directory's name")
    progress: bool = opt(True, "show a progress bar on the main process")


@dataclass
class FinetuneConfig:
    init_from: str = opt("", "the parent: a run directory, or hf:PATH / hf:NAME for a Hugging Face GPT-2 model")
    kind: str = opt("text", "text: continued training on a corpus; sft: prompt/response pairs, loss on the response only", ("text", "sft"))
    freeze: int = opt(0, "when > 0, freeze the embeddings and the first N blocks")
    lora_rank: int = opt(0, "when > 0, train LoRA adapters of this rank instead of all weights")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)
    """Keys ("section.key") set by the YAML file or the command line rather than left at their default."""

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir or f"data/{self.data.name}")

    @property
    def out_dir(self) -> Path:
        if self.run.out_dir:
            return Path(self.run.out_dir)
        suffix = f"_{self.finetune.kind}" if self.finetune.init_from else ""
        return Path(f"runs/{self.data.name}{suffix}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS = ("run", "data", "model", "train", "log", "finetune")
STAGE_SECTIONS = {
    "pretrain": ("run", "data", "model", "train", "log"),
    "finetune": SECTIONS,
    "prepare": SECTIONS,
}


def _fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def _coerce(value: Any, typ: type, key: str) -> Any:
    """Turn a YAML value or command-line string into `typ`, or raise a UserError naming `key`."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            low = text.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        elif typ is int:
            try:
                number = float(text)  # accepts 1e4 as well as 10000
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
        else:
            try:
                return typ(text)
            except ValueError:
                pass
        raise UserError(f"{key}: expected {typ.__name__}, got {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, bool):  # YAML reads `compile: true` as a bool
        return "true" if value else "false"
    if typ is str and isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _set(cfg: Config, key: str, value: Any, sections: tuple[str, ...], origin: str) -> None:
    section_name, _, name = key.partition(".")
    if section_name not in sections or not name:
        hint = "; finetune keys belong to launch/finetune.py" if section_name == "finetune" else ""
        raise UserError(f"unknown config key {key!r} in {origin}: keys look like SECTION.KEY with SECTION one of {', '.join(sections)}{hint}")
    section = getattr(cfg, section_name)
    fields = _fields(section)
    if name not in fields:
        close = [f"{section_name}.{f}" for f in fields if f.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown config key {key!r} in {origin}{hint}; `--help` lists every key")
    typ = typing.get_type_hints(type(section))[name]
    value = _coerce(value, typ, key)
    choices = fields[name].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    setattr(section, name, value)
    cfg.explicit.add(key)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data


def apply_yaml(cfg: Config, path: Path, sections: tuple[str, ...]) -> None:
    for section_name, values in _read_yaml(path).items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{path}: section {section_name!r} must be a mapping of keys to values")
        for name, value in values.items():
            _set(cfg, f"{section_name}.{name}", value, sections, str(path))


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--section.key=value` or `--section.key value` pairs, in order."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key=value (see --help)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise UserError(f"{arg} needs a value: --section.key=value")
        pairs.append((key, value))
        i += 1
    return pairs


def load_config(config_file: str | None, overrides: list[str], stage: str) -> Config:
    """Defaults, then the YAML file, then the command-line overrides; validated."""
    sections = STAGE_SECTIONS[stage]
    cfg = Config()
    if config_file:
        apply_yaml(cfg, Path(config_file), sections)
    for key, value in parse_overrides(overrides):
        _set(cfg, key, value, sections, "the command line")
    validate(cfg, stage)
    return cfg


def from_dict(data: dict, stage: str = "finetune") -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. a run's config.yaml)."""
    cfg = Config()
    for section_name, values in data.items():
        for name, value in (values or {}).items():
            _set(cfg, f"{section_name}.{name}", value, STAGE_SECTIONS[stage], "saved config")
    cfg.explicit.clear()
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    from dist_gpt.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def validate(cfg: Config, stage: str) -> None:
    """Impossible values, each as one UserError naming the key and the fix."""
    d, m, t = cfg.data, cfg.model, cfg.train

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(bool(d.name) and "/" not in d.name, "data.name must be a non-empty name without '/'")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be between 0 and 1 (exclusive), got {d.val_fraction}")
    need(d.num_proc >= 1, f"data.num_proc must be >= 1, got {d.num_proc}")
    need(d.tokenizer != "bpe" or 256 < d.vocab_size <= 2**32, f"data.vocab_size must be > 256 for a byte-level BPE, got {d.vocab_size}")
    for key in ("shard_tokens", "val_tokens", "prefetch_shards"):
        need(getattr(d, key) >= 0, f"data.{key} must be >= 0, got {getattr(d, key)}")
    need(d.disk_budget_gb >= 0 and math.isfinite(d.disk_budget_gb), f"data.disk_budget_gb must be a finite number >= 0, got {d.disk_budget_gb}")
    need(d.prepare_world >= 1, f"data.prepare_world must be >= 1, got {d.prepare_world}")
    need(0 <= d.prepare_rank < d.prepare_world, f"data.prepare_rank must be in [0, data.prepare_world = {d.prepare_world}), got {d.prepare_rank}")
    need(
        stage == "prepare" or d.prepare_world == 1,
        "data.prepare_world > 1 splits a sharded prepare over several launch/prepare.py workers; train once they are done, without it",
    )
    if stage != "finetune":  # a finetune's shape comes from its parent, which checks any override against it
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            low = 0 if key == "vocab_size" else 1
            need(getattr(m, key) >= low, f"model.{key} must be >= {low}, got {getattr(m, key)}")
        need(m.n_embd % m.n_head == 0, f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
        need(m.pos_emb != "rope" or (m.n_embd // m.n_head) % 2 == 0, f"model.pos_emb=rope needs an even head size, got n_embd / n_head = {m.n_embd // m.n_head}")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    for key in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval", "checkpoint_interval", "keep_checkpoints"):
        need(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    need(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    need(t.tokens_per_step >= 0, f"train.tokens_per_step must be >= 0, got {t.tokens_per_step}")
    need(t.time_budget_s >= 0, f"train.time_budget_s must be >= 0, got {t.time_budget_s}")
    for key in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(t, key)
        need(value >= 0 and math.isfinite(value), f"train.{key} must be a finite number >= 0, got {value}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    need(t.muon_lr > 0 and math.isfinite(t.muon_lr), f"train.muon_lr must be a finite number > 0, got {t.muon_lr}")
    need(0 <= t.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
    need(t.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {t.sample_tokens}")
    f = cfg.finetune
    need(f.freeze >= 0, f"finetune.freeze must be >= 0, got {f.freeze}")
    need(f.lora_rank >= 0, f"finetune.lora_rank must be >= 0, got {f.lora_rank}")
    need(0.0 <= f.lora_dropout < 1.0, f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
    if stage == "finetune":
        need(bool(f.init_from), "finetune.init_from is required: --finetune.init_from=RUN_DIR (a pretrain run directory) or hf:PATH")
        need(not (f.lora_rank and f.freeze), "finetune.freeze and finetune.lora_rank are exclusive: LoRA already freezes the base weights")


def help_text(stage: str) -> str:
    """Every key of the stage's sections with its default and meaning."""
    lines = []
    cfg = Config()
    for section_name in STAGE_SECTIONS[stage]:
        lines.append(f"\n{section_name}:")
        section = getattr(cfg, section_name)
        for f in dataclasses.fields(section):
            default = getattr(section, f.name)
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"  --{section_name}.{f.name}={default!r}{extra}\n      {f.metadata['help']}")
    return "\n".join(lines)
