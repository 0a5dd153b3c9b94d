"""Run configuration: one dataclass per section, read from YAML and `--section.key=value` overrides.

    cfg = load_config(["configs/smoke.yaml"], ["--train.lr=3e-4"], stage="pretrain")

Every field carries a one-line help text (shown by `--help`) and, where it has a fixed set of
values, its choices. Unknown keys, wrong types and impossible values raise `UserError`
before any work starts. Several config files merge in order (a later file overrides an earlier
one), then the command line overrides them all. YAML is read strictly: a key given twice is an
error, and aliases are bounded (a billion-laughs file is refused, never expanded). Every user value
an error message quotes is clipped to CLIP characters. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Sequence
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
    out_dir: str = opt(
        "", "run directory; empty means runs/<data.name> (runs/<data.name>_<finetune.kind> for finetunes)"
    )
    seed: int = opt(
        1337,
        "seed for model init, the data stream and evaluation batches (shared by all ranks) and dropout (seed + rank)",
    )
    resume: str = opt(
        "auto",
        "auto: continue from the newest complete checkpoint in out_dir; never: refuse an existing out_dir",
        ("auto", "never"),
    )
    overwrite: bool = opt(False, "with resume=never, delete an existing out_dir and start over")


@dataclass
class DataConfig:
    name: str = opt("shakespeare_char", "dataset name; names the prepared folder data/<name>/")
    source: str = opt(
        "", "text file, directory, glob, comma-separated files, .jsonl, .parquet, URL or Hugging Face dataset name"
    )
    sha256: str = opt("", "expected SHA-256 of a downloaded source file (checked after download)")
    dir: str = opt("", "where the prepared arrays go; empty means data/<name>")
    text_field: str = opt("text", "column holding the text in .jsonl / parquet / Hub sources")
    recipe: str = opt(
        "",
        "name of a recipe file in the repository's data/ folder, without .py (e.g. sonnets_sft), that turns the source into records",
    )
    tokenizer: str = opt(
        "char",
        "char: one token per character; bpe: byte-level BPE trained on the corpus; gpt2: tiktoken GPT-2",
        ("char", "bpe", "gpt2"),
    )
    vocab_size: int = opt(2048, "BPE vocabulary size to train (tokenizer=bpe only)")
    val_fraction: float = opt(0.1, "share of the corpus held out for validation (the last part of a single document)")
    num_proc: int = opt(1, "processes for Dataset.map while tokenizing")
    errors: str = opt(
        "strict",
        "bytes that are not UTF-8: strict stops with an error, replace substitutes U+FFFD",
        ("strict", "replace"),
    )
    unknown: str = opt(
        "error",
        "characters missing from an existing char vocabulary: error, drop, or replace with a known one",
        ("error", "drop", "replace"),
    )
    loader: str = opt(
        "random",
        "random: seeded random windows (the lecture's get_batch); sequential: walk the tokens without replacement",
        ("random", "sequential"),
    )
    # sharded data (README, "Sharded data"): many token files plus a manifest, prepared while the source streams
    shard_tokens: int = opt(
        0,
        "when > 0, prepare the corpus as token shards of this many tokens (streaming the source); 0: one train.bin and val.bin",
    )
    val_tokens: int = opt(
        0, "sharded data: the first N tokens of the stream are the val split (FineWeb as modded-nanogpt: 10485761)"
    )
    eot: bool = opt(
        False,
        "sharded data: the tokenizer's end-of-text token before every document (gpt2 only: <|endoftext|>, as llm.c and modded-nanogpt)",
    )
    prepare_rank: int = opt(
        0, "sharded prepare: this worker's index; worker R prepares input files R, R + W, ... (launch/prepare.py only)"
    )
    prepare_world: int = opt(
        1,
        "sharded prepare: how many workers (processes or nodes) split the input files; the last to finish writes meta.json",
    )
    disk_budget_gb: float = opt(
        0.0,
        "fetched shards: the most disk their local copies may take (GB); older ones are deleted behind the reader; 0: no limit",
    )
    prefetch_shards: int = opt(2, "fetched shards: how many to fetch ahead of the one being read")


# model keys a resumed run or a finetune may set anew: they do not change what trained weights compute
MODEL_KEYS_FREE = ("dropout", "attn_impl")


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
    activation: str = opt(
        "gelu",
        "MLP non-linearity: gelu (GPT-2's tanh approximation), gelu_exact (nanoGPT's), relu (the lecture's), relu2",
        ("gelu", "gelu_exact", "relu", "relu2"),
    )
    residual: bool = opt(True, "residual connections around attention and MLP")
    layernorm: bool = opt(True, "pre-LayerNorm before each sublayer and a final LayerNorm")
    tie_weights: bool = opt(True, "LM head shares its weight with the token embedding")
    init: str = opt(
        "gpt2",
        "gpt2: normal(0, 0.02) weights, residual projections scaled by depth; torch: PyTorch's layer defaults, as in the lecture video",
        ("gpt2", "torch"),
    )
    # speed options from the public speedrun literature; the defaults are the lecture model (BENCHMARKS.md measures them)
    pos_emb: str = opt(
        "learned",
        "position information: learned: a position embedding table (GPT-2); rope: rotary embeddings on queries and keys",
        ("learned", "rope"),
    )
    qk_norm: bool = opt(False, "RMS-normalise each head's queries and keys before attention")
    zero_init_proj: bool = opt(False, "start the projections into the residual stream (attn and MLP c_proj) at zero")
    attn_impl: str = opt(
        "auto",
        "attention kernel in training: auto: the faster here (measured on CPUs, sdpa on GPUs); sdpa: F.scaled_dot_product_attention; matmul: plain matmul + softmax",
        ("auto", "sdpa", "matmul"),
    )


@dataclass
class TrainConfig:
    batch_size: int = opt(64, "micro-batch size per process, in sequences")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step (ignored when tokens_per_step is set)")
    tokens_per_step: int = opt(
        0, "tokens per optimizer step; when > 0, grad_accum is derived from it and the process count"
    )
    max_steps: int = opt(5000, "optimizer steps to train")
    time_budget_s: float = opt(
        0.0, "when > 0, stop after this many seconds of training; the LR schedule follows elapsed time"
    )
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = opt(100, "linear warmup steps")
    lr_decay: str = opt(
        "cosine",
        "shape of the decay after warmup; wsd (warmup-stable-decay): train.lr until the last train.decay_fraction of the run, then down to min_lr",
        ("cosine", "linear", "constant", "wsd"),
    )
    decay_fraction: float = opt(
        0.2,
        "lr_decay=wsd: share of the run at its end (of train.max_steps, or of the time budget) spent decaying to min_lr",
    )
    decay_shape: str = opt(
        "1-sqrt",
        "lr_decay=wsd: linear, or 1-sqrt (the drop grows with the square root of the decay's progress)",
        ("linear", "1-sqrt"),
    )
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    optimizer: str = opt(
        "adamw",
        "adamw; muon: Muon for the blocks' weight matrices, AdamW (train.lr) for embeddings, head, biases and norms",
        ("adamw", "muon"),
    )
    muon_lr: float = opt(0.02, "Muon peak learning rate (follows the same schedule as train.lr)")
    muon_momentum: float = opt(0.95, "Muon (Nesterov) momentum")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 disables")
    eval_interval: int = opt(250, "evaluate every N steps (and at step 0 and the end)")
    eval_at_start: bool = opt(True, "evaluate once before the first step (step 0)")
    eval_iters: int = opt(
        200,
        "batches per split at each evaluation, split across processes (fewer with a time budget that could not afford them)",
    )
    log_interval: int = opt(10, "write a metrics line every N steps")
    checkpoint_interval: int = opt(500, "write a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(2, "complete checkpoints to keep")
    mixed_precision: str = opt(
        "auto",
        "auto: bf16 where it is fast (GPU with bf16; a CPU with bf16 instructions and n_embd >= 256 or attn_impl=matmul), fp16 on older GPUs, else no",
        ("auto", "no", "bf16", "fp16"),
    )
    threads: int = opt(
        0,
        "CPU threads per process; 0: OMP_NUM_THREADS if set (except the 1 that accelerate launch sets by default), else the cores divided among this machine's processes",
    )
    compile: str = opt("auto", "torch.compile the model; auto: on for CUDA, off on CPU", ("auto", "true", "false"))
    activation_checkpointing: str = opt(
        "none",
        "recompute Blocks' activations in the backward pass instead of keeping them: none; full: every Block; every_N: Blocks 0, N, 2N, ... "
        "(less memory for about one more forward pass of those Blocks per step)",
    )
    on_nan: str = opt("stop", "a NaN/inf loss: stop the run, or skip that optimizer step", ("stop", "skip"))
    sample_prompt: str = opt("\n", "prompt of the sample generated at each evaluation")
    sample_tokens: int = opt(200, "tokens generated at each evaluation; 0 disables")


@dataclass
class LogConfig:
    wandb: bool = opt(True, "log to Weights & Biases through Accelerate (offline unless credentials exist)")
    project: str = opt("dist_gpt", "W&B project")
    run_name: str = opt("", "W&B run name; empty means the run directory's name")
    progress: bool = opt(True, "show a progress bar on the main process")
    profile_steps: str = opt(
        "",
        "A-B: write a torch profiler trace of optimizer steps A to B into RUN_DIR/profile/ and print the top operators (on CUDA, a memory snapshot too)",
    )
    memory_history: bool = opt(
        False,
        "CUDA: record every allocation's stack from the start, for the memory snapshot written when a step runs out of memory",
    )


@dataclass
class FinetuneConfig:
    init_from: str = opt("", "the parent: a run directory, or hf:PATH / hf:NAME for a Hugging Face GPT-2 model")
    kind: str = opt(
        "text",
        "text: continued training on a corpus; sft: prompt/response pairs, loss on the response only",
        ("text", "sft"),
    )
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


CLIP = 80  # characters of a user value that an error message quotes
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; anything this big is not one
MAX_ALIASES = 32  # `*name` references in one file
MAX_NODES = 10_000  # values in a file with every alias expanded
MAX_DEPTH = 20  # nesting levels (sections, keys, a list in a value, ...)
# torch's int64 (seeds: torch takes up to 2**64 - 1, which leaves room for seed + rank + 7919 * step)
MAX_INT = 2**63 - 1
MAX_SIZE = 2**31 - 1  # model shapes, batch sizes, counts: what torch can index
SIZE_KEYS = (
    "data.vocab_size", "data.num_proc", "model.vocab_size", "model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
    "model.mlp_ratio", "train.batch_size", "train.grad_accum", "train.eval_iters", "train.threads", "train.keep_checkpoints",
    "train.sample_tokens", "finetune.freeze", "finetune.lora_rank",
)  # fmt: skip


def clip(value: Any, limit: int = CLIP) -> str:
    """repr(value), cut to `limit` characters with '...' (error messages quote user values through this)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        text = f"<an int of about {int(value.bit_length() * 0.30103)} digits>"
    return shorten(text, limit)


def shorten(text: str, limit: int = CLIP) -> str:
    """text cut to `limit` characters with '...' (for text that is not quoted, e.g. a library's message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- strict YAML


class YAMLRejected(yaml.YAMLError):
    """Well-formed YAML that a config must not be: a key given twice, an alias bomb, deep nesting."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (at any level), more than MAX_ALIASES aliases, nesting deeper than
    MAX_DEPTH and a document that would expand to more than MAX_NODES values (checked by walking at most MAX_NODES
    values, so a bomb costs no more than a big honest file)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise YAMLRejected(
                    f"more than {MAX_ALIASES} aliases (*name), at line {self.peek_event().start_mark.line + 1}; write the values out"
                )
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise YAMLRejected(
                    f"nested more than {MAX_DEPTH} levels deep, at line {self.peek_event().start_mark.line + 1}"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges: its keys may be overridden
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YAMLRejected(
                        f"key {clip(key)} appears twice in one mapping (lines {seen[key]} and {line}); keep one"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: Any) -> None:
    """Walk the document as if every alias were expanded, stopping at MAX_NODES (so a bomb costs MAX_NODES steps)."""
    stack, count = [root], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise YAMLRejected(
                f"its aliases expand to more than {MAX_NODES} values; write the config without repeated *aliases"
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)


def parse_yaml(text: str) -> Any:
    """The document in `text`, read by StrictLoader (YAMLError for bad or refused YAML)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise YAMLRejected("nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise YAMLRejected(f"a value cannot be read ({shorten(str(e).split(':')[0])})") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's document, or a UserError naming the file (missing, unreadable, not UTF-8, too big, bad YAML)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; pass a YAML file")
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{what} {path} is over {MAX_CONFIG_BYTES >> 20} MiB; a config is a few kB of YAML")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte offset {e.start}); save it as UTF-8") from None
    try:
        return parse_yaml(text)
    except YAMLRejected as e:
        raise UserError(f"{what} {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One short line: the parser's problem and where."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        return f"{shorten(e.problem)}{where}"
    return shorten(str(e).splitlines()[0]) if str(e) else type(e).__name__


# ----------------------------------------------------------------------------- keys and values


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
                return int(text)  # exact, however long
            except ValueError:
                pass
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
        raise UserError(f"{key}: expected {typ.__name__}, got {clip(value)}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"{key}: {clip(value)} is too large for a float") from None
    if typ is str and isinstance(value, bool):  # YAML reads `compile: true` as a bool
        return "true" if value else "false"
    if typ is str and isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {typ.__name__}, got {clip(value)} ({type(value).__name__})")
    return value


def _set(cfg: Config, key: str, value: Any, sections: tuple[str, ...], origin: str) -> None:
    if not isinstance(key, str):
        raise UserError(f"config key {clip(key)} in {origin} is not a name: keys look like SECTION.KEY")
    section_name, _, name = key.partition(".")
    if section_name not in sections or not name:
        hint = "; finetune keys belong to launch/finetune.py" if section_name == "finetune" else ""
        raise UserError(
            f"unknown config key {clip(key)} in {origin}: keys look like SECTION.KEY with SECTION one of {', '.join(sections)}{hint}"
        )
    section = getattr(cfg, section_name)
    fields = _fields(section)
    if name not in fields:
        close = [f"{section_name}.{f}" for f in fields if f.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown config key {clip(key)} in {origin}{hint}; `--help` lists every key")
    typ = typing.get_type_hints(type(section))[name]
    value = _coerce(value, typ, key)
    choices = fields[name].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{key}: {clip(value)} is not one of {', '.join(map(str, choices))}")
    setattr(section, name, value)
    cfg.explicit.add(key)


def _apply_sections(cfg: Config, data: Any, sections: tuple[str, ...], origin: str) -> None:
    """Set every `section: {key: value}` of a parsed config file (or saved config)."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise UserError(f"{origin} must hold a mapping of sections ({', '.join(sections)}), got {clip(data)}")
    for section_name, values in data.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(
                f"{origin}: section {clip(section_name)} must be a mapping of keys to values, got {clip(values)}"
            )
        for name, value in values.items():
            _set(cfg, f"{section_name}.{name}", value, sections, origin)


def apply_yaml(cfg: Config, path: Path, sections: tuple[str, ...]) -> None:
    _apply_sections(cfg, read_yaml(path), sections, f"config file {Path(path).expanduser()}")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--section.key=value` or `--section.key value` pairs, in order."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unexpected argument {clip(arg)}: overrides look like --section.key=value (see --help)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise UserError(f"{clip(arg)} needs a value: --section.key=value")
        pairs.append((key, value))
        i += 1
    return pairs


def load_config(config_files: str | Path | Sequence[str | Path] | None, overrides: list[str], stage: str) -> Config:
    """Defaults, then each config file in order (a later one overrides an earlier one), then the command-line
    overrides; `~` expanded in paths; validated."""
    sections = STAGE_SECTIONS[stage]
    cfg = Config()
    if isinstance(config_files, (str, Path)):
        config_files = [config_files]
    for path in config_files or []:
        apply_yaml(cfg, Path(path), sections)
    for key, value in parse_overrides(overrides):
        _set(cfg, key, value, sections, "the command line")
    expand_user(cfg)
    validate(cfg, stage)
    return cfg


def from_dict(data: Any, stage: str = "finetune", origin: str = "saved config") -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. a run's config.yaml); its values are checked as a new config's are."""
    if not data:
        raise UserError(f"{origin} is empty: the run's config.yaml must hold the config it was trained with")
    cfg = Config()
    _apply_sections(cfg, data, STAGE_SECTIONS[stage], origin)
    cfg.explicit.clear()
    validate_values(cfg, origin)
    return cfg


def read_saved_config(path: str | Path) -> Config:
    """A run's config.yaml as a Config (UserError naming the file when it is missing, not YAML, or not a config)."""
    path = Path(path)
    return from_dict(read_yaml(path, "saved config"), origin=f"saved config {path}")


def save_config(cfg: Config, path: Path) -> None:
    from dist_gpt.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def _is_url(text: str) -> bool:
    return "://" in text


def expand_user(cfg: Config) -> None:
    """`~` in the local paths: run.out_dir, data.dir, data.source (each comma-separated part; not URLs) and
    finetune.init_from (not hf: names, whose folder resolve_hf expands)."""
    cfg.run.out_dir = os.path.expanduser(cfg.run.out_dir)
    cfg.data.dir = os.path.expanduser(cfg.data.dir)
    if not _is_url(cfg.data.source):
        cfg.data.source = ",".join(
            os.path.expanduser(part.strip()) if part.strip().startswith("~") else part
            for part in cfg.data.source.split(",")
        )
    if not cfg.finetune.init_from.startswith("hf:"):
        cfg.finetune.init_from = os.path.expanduser(cfg.finetune.init_from)


# ----------------------------------------------------------------------------- validation


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_name(name: str) -> None:
    """data.name becomes the folder data/<name>: one plain path component."""
    plain = (
        bool(name)
        and name == name.strip()
        and not name.startswith(".")
        and not any(c in name for c in "/\\")
        and name.isprintable()
    )
    _need(
        plain and len(name) <= 100,
        f"data.name must be a plain folder name (no '/', '\\', leading '.', or spaces at the ends), got {clip(name)}",
    )


def _check_out_dir(out_dir: str) -> None:
    """run.out_dir names a folder of its own: no empty or blank parts, not '.', '..', the working directory,
    the home folder, the filesystem root or a folder above any of them."""
    if not out_dir:
        return  # the default, runs/<data.name>
    parts = out_dir.split("/")
    inner = parts[1:] if out_dir.startswith("/") else parts
    if inner and inner[-1] == "":
        inner = inner[:-1]  # one trailing slash
    _need(
        all(p.strip() for p in inner) and out_dir.isprintable(),
        f"run.out_dir has an empty or blank path component: {clip(out_dir)}",
    )
    path = Path(out_dir).resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    above = path in (cwd, home) or path in cwd.parents or path in home.parents
    _need(
        not above and Path(out_dir).name not in ("", ".", ".."),
        f"run.out_dir must name a run's own folder, not {clip(out_dir)} (it holds other files)",
    )


def validate_values(cfg: Config, origin: str = "config") -> None:
    """Per-key limits that any config, new or saved, must meet: finite floats, ints torch can hold."""
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        for name, value in dataclasses.asdict(section).items():
            key = f"{section_name}.{name}"
            if isinstance(value, float):
                _need(math.isfinite(value), f"{key} must be a finite number, got {value} ({origin})")
            elif isinstance(value, int) and not isinstance(value, bool):
                top = MAX_SIZE if key in SIZE_KEYS else MAX_INT
                _need(-MAX_INT - 1 <= value <= top, f"{key}={clip(value)} is out of range: at most {top:,} ({origin})")
    seed = cfg.run.seed
    _need(0 <= seed <= MAX_INT, f"run.seed must be in [0, 2**63 - 1], got {clip(seed)}")


def check_model(m: GPTConfig, building: bool = False) -> None:
    """The model section's rules, in one place: config validation calls it, and so does `GPT(config)` (building=True,
    when vocab_size must be known), so a GPTConfig made in code is checked too."""
    for f in dataclasses.fields(m):
        choices = f.metadata.get("choices")
        _need(
            not choices or getattr(m, f.name) in choices,
            f"model.{f.name} must be one of {', '.join(choices or ())}, got {clip(getattr(m, f.name))}",
        )
    low = 1 if building else 0
    _need(
        m.vocab_size >= low,
        f"model.vocab_size must be >= {low}, got {m.vocab_size}"
        + (" (0 means: take it from the tokenizer, which has not happened)" if building else ""),
    )
    _need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.kind == "bigram":
        return
    for key in ("block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
        _need(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    _need(m.n_embd % m.n_head == 0, f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    _need(
        m.pos_emb != "rope" or (m.n_embd // m.n_head) % 2 == 0,
        f"model.pos_emb=rope needs an even head size, got n_embd / n_head = {m.n_embd // m.n_head}",
    )


def validate(cfg: Config, stage: str) -> None:
    """Impossible values, each as one UserError naming the key and the fix."""
    d, m, t = cfg.data, cfg.model, cfg.train
    need = _need
    validate_values(cfg, "check the config file and the command line")
    _check_name(d.name)
    _check_out_dir(cfg.run.out_dir)
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be between 0 and 1 (exclusive), got {d.val_fraction}")
    need(d.num_proc >= 1, f"data.num_proc must be >= 1, got {d.num_proc}")
    need(
        d.tokenizer != "bpe" or d.vocab_size > 256,
        f"data.vocab_size must be > 256 for a byte-level BPE, got {d.vocab_size}",
    )
    for key in ("shard_tokens", "val_tokens", "prefetch_shards"):
        need(getattr(d, key) >= 0, f"data.{key} must be >= 0, got {getattr(d, key)}")
    need(d.disk_budget_gb >= 0, f"data.disk_budget_gb must be a finite number >= 0, got {d.disk_budget_gb}")
    need(d.prepare_world >= 1, f"data.prepare_world must be >= 1, got {d.prepare_world}")
    need(
        0 <= d.prepare_rank < d.prepare_world,
        f"data.prepare_rank must be in [0, data.prepare_world = {d.prepare_world}), got {d.prepare_rank}",
    )
    need(
        stage == "prepare" or d.prepare_world == 1,
        "data.prepare_world > 1 splits a sharded prepare over several launch/prepare.py workers; train once they are done, without it",
    )
    if stage != "finetune":  # a finetune's shape comes from its parent, which checks any override against it
        check_model(m)
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    for key in (
        "batch_size",
        "grad_accum",
        "max_steps",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoints",
    ):
        need(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    need(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    need(t.tokens_per_step >= 0, f"train.tokens_per_step must be >= 0, got {t.tokens_per_step}")
    need(t.time_budget_s >= 0, f"train.time_budget_s must be >= 0, got {t.time_budget_s}")
    for key in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(t, key)
        need(value >= 0, f"train.{key} must be a finite number >= 0, got {value}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    need(t.muon_lr > 0, f"train.muon_lr must be a finite number > 0, got {t.muon_lr}")
    need(0 <= t.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
    need(t.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {t.sample_tokens}")
    need(0 < t.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    need(
        t.lr_decay != "wsd" or t.warmup_steps <= t.max_steps - decay_steps(t),
        f"train.warmup_steps={t.warmup_steps} runs into the decay, which takes the last {decay_steps(t)} of train.max_steps={t.max_steps} "
        "(train.decay_fraction): lower one of them",
    )
    checkpoint_every(t.activation_checkpointing)
    profiled = step_range(cfg.log.profile_steps)
    need(
        not profiled or t.time_budget_s > 0 or profiled[1] <= t.max_steps,
        f"log.profile_steps={cfg.log.profile_steps} ends after train.max_steps={t.max_steps}: profile steps the run takes",
    )
    f = cfg.finetune
    need(f.freeze >= 0, f"finetune.freeze must be >= 0, got {f.freeze}")
    need(f.lora_rank >= 0, f"finetune.lora_rank must be >= 0, got {f.lora_rank}")
    need(
        f.lora_rank == 0 or f.lora_alpha > 0,
        f"finetune.lora_alpha must be > 0 with LoRA (scale = alpha / rank; 0 trains nothing), got {f.lora_alpha}",
    )
    need(0.0 <= f.lora_dropout < 1.0, f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
    if stage == "finetune":
        need(
            bool(f.init_from),
            "finetune.init_from is required: --finetune.init_from=RUN_DIR (a pretrain run directory) or hf:PATH",
        )
        need(
            not (f.lora_rank and f.freeze),
            "finetune.freeze and finetune.lora_rank are exclusive: LoRA already freezes the base weights",
        )


def decay_steps(t: TrainConfig) -> int:
    """lr_decay=wsd: how many of train.max_steps, at the end, decay the learning rate (at least one)."""
    return max(1, round(t.decay_fraction * t.max_steps))


def checkpoint_every(spec: str) -> int:
    """train.activation_checkpointing as a Block interval: 0 for none, 1 for full (every Block), N for every_N."""
    match = re.fullmatch(r"none|full|every_([1-9][0-9]*)", spec)
    if match is None:
        raise UserError(
            f"train.activation_checkpointing: {spec!r} is not none, full or every_N with N >= 1 (e.g. every_2: Blocks 0, 2, 4, ...)"
        )
    return 0 if spec == "none" else 1 if spec == "full" else int(match.group(1))


def step_range(spec: str) -> tuple[int, int] | None:
    """log.profile_steps "A-B" as (A, B), the first and last optimizer step (counted from 1, as in metrics.jsonl); None when empty."""
    if not spec:
        return None
    match = re.fullmatch(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", spec)
    if match is None or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UserError(f"log.profile_steps: {spec!r} is not a step range A-B with 1 <= A <= B, e.g. 10-15")
    return int(match.group(1)), int(match.group(2))


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
