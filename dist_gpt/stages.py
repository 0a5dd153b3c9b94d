"""The stages: what differs between pretraining and finetuning is where the model and the tokenizer come from.

    pretrain: a fresh GPT, a tokenizer trained on the corpus (or loaded from the prepared data).
    finetune: the parent's GPT and tokenizer (a run directory, or hf:PATH), the data encoded with that
              tokenizer; `text` (continued training, optionally freezing the bottom), `sft` (loss on the
              responses only), either of them with LoRA adapters instead of full weights.

Both go through `train`: accelerator -> run directory -> data -> checks -> model -> Trainer -> release.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_gpt import lora
from dist_gpt.batches import load_meta, open_split
from dist_gpt.checkpoint import TrainState, read_train_state
from dist_gpt.cli import config_path, parse_stage_args
from dist_gpt.config import MODEL_KEYS_FREE, Config, GPTConfig
from dist_gpt.errors import UserError
from dist_gpt.model import GPT
from dist_gpt.prepare import prepare
from dist_gpt.rundir import RunDir, is_locked, load_run, read_config, read_summary
from dist_gpt.runtime import check_memory, make_accelerator, on_main, resolve_batching, teardown, use_cuda
from dist_gpt.tokenizers import Tokenizer, load_tokenizer
from dist_gpt.tracking import log
from dist_gpt.trainer import Job, Trainer

# ----------------------------------------------------------------------------- the skeleton both stages share


def open_run(cfg: Config, stage: str, accelerator: Any) -> RunDir:
    """RunDir.open on the main process (which holds the lock); the other ranks learn where and what to resume."""
    holder: list[RunDir] = []

    def _open() -> tuple[str, str | None]:
        holder.append(RunDir.open(cfg, stage))
        return str(holder[0].path), str(holder[0].resume_from) if holder[0].resume_from else None

    path, resume = on_main(accelerator, _open)
    return holder[0] if holder else RunDir(path=Path(path), stage=stage, resume_from=Path(resume) if resume else None)


def train(
    cfg: Config,
    stage: str,
    make_job: Callable[[Config, Tokenizer], Job],
    tokenizer: Tokenizer | None = None,
    sft: bool = False,
    check: Callable[[RunDir], None] | None = None,
) -> TrainState | None:
    """Open the run, prepare and check the data, build the job with `make_job(cfg, tokenizer)` and train it.

    `tokenizer` given (finetuning): the data is encoded with it. `check(run)` runs on the main process after the data
    is prepared and before anything in the run directory is written.
    """
    accelerator = make_accelerator(cfg)
    run = open_run(cfg, stage, accelerator)
    try:
        if run.finished(cfg):
            if accelerator.is_main_process:
                s = read_train_state(run.resume_from)
                log(
                    f"run already complete at step {s.step} (train.max_steps={cfg.train.max_steps}, train.time_budget_s={cfg.train.time_budget_s:g}, "
                    f"{s.elapsed_s:.0f} s trained); nothing to do. Raise --train.max_steps (or the time budget) to continue it."
                )
            teardown(accelerator)
            return None

        def prepare_and_check() -> str:
            meta = prepare(
                cfg.data, data_dir=cfg.data_dir, tokenizer=tokenizer, sft=sft, log=log, block_size=cfg.model.block_size
            )
            prepared = load_tokenizer(cfg.data_dir / "tokenizer.json")
            if tokenizer is not None:
                check_prepared_tokenizer(cfg.data_dir, tokenizer)
            if check is not None:
                check(run)
            run.check_resume(cfg.model, prepared, meta.get("fingerprint"))
            return meta.get("fingerprint")

        fingerprint = on_main(accelerator, prepare_and_check)
        tokenizer = tokenizer or load_tokenizer(cfg.data_dir / "tokenizer.json")
        resolve_vocab(cfg, tokenizer.vocab_size)
        resumed = read_train_state(run.resume_from) if run.resume_from else None
        resolve_batching(cfg, accelerator.num_processes, resumed.tokens_per_step if resumed else None)
        check_memory(cfg, accelerator.device)
        job = make_job(cfg, tokenizer)
        job.data_fingerprint = fingerprint
        return Trainer(job, accelerator, run).fit()
    finally:
        run.release()


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer_vocab
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; leave it at 0 to take the tokenizer's"
        )


def prepare_from_config(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """`prepare` for a run's config: a finetune encodes with its parent's tokenizer; SFT when finetune.kind is sft."""
    tokenizer = None
    parent = cfg.finetune.init_from
    if parent.startswith("hf:"):
        from dist_gpt.hf import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(parent)
    elif parent:
        if not Path(parent).is_dir():
            raise UserError(f"finetune.init_from: run directory not found: {parent}")
        tokenizer = load_tokenizer(Path(parent) / "tokenizer.json")
    return prepare(
        cfg.data,
        data_dir=cfg.data_dir,
        tokenizer=tokenizer,
        sft=cfg.finetune.kind == "sft",
        log=log,
        block_size=cfg.model.block_size,
    )


# ----------------------------------------------------------------------------- pretrain

PRETRAIN_USAGE = """
usage: accelerate launch launch/pretrain.py [--config FILE] [--section.key=value ...] [--debug]
       python launch/pretrain.py ...            (one process)

Pretrain a GPT from scratch. Prepares the data if needed (see launch/prepare.py), trains with
Accelerate (DDP/FSDP, mixed precision, gradient accumulation), evaluates, samples, checkpoints,
and writes RUN_DIR/model.safetensors. Rerunning the same command resumes from the newest checkpoint.

Without --config: configs/shakespeare_char.yaml (the lecture model) on a GPU,
configs/shakespeare_char_cpu.yaml otherwise. Offline, point at a local corpus with --data.source=PATH.
--debug shows the full traceback of an error.
"""


def default_pretrain_config(args: list[str]) -> str | None:
    if any(a == "--config" or a.startswith("--config=") for a in args):
        return None
    if use_cuda():
        log("no --config given: using configs/shakespeare_char.yaml (the lecture model; a GPU is present)")
        return config_path("shakespeare_char.yaml")
    log(
        "no --config given and no GPU: using configs/shakespeare_char_cpu.yaml (the lecture model needs hours on a CPU; this one trains in minutes)"
    )
    return config_path("shakespeare_char_cpu.yaml")


def pretrain_job(cfg: Config, tokenizer: Tokenizer) -> Job:
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    return Job(cfg=cfg, model=GPT(cfg.model), tokenizer=tokenizer, data_dir=cfg.data_dir)


def pretrain(args: list[str]) -> None:
    cfg = parse_stage_args(args, "pretrain", PRETRAIN_USAGE, default_config=default_pretrain_config(args))
    train(cfg, "pretrain", pretrain_job)


# ----------------------------------------------------------------------------- finetune

FINETUNE_USAGE = """
usage: accelerate launch launch/finetune.py --config FILE --finetune.init_from=PARENT [--section.key=value ...] [--debug]
       python launch/finetune.py ...            (one process)

Finetune a trained GPT. PARENT is a pretrain or finetune run directory (or hf:PATH, a Hugging Face
GPT-2 folder): the model's shape and the tokenizer come from it, and data.source is encoded with that
tokenizer. finetune.kind=text continues training on a corpus; finetune.kind=sft trains on
prompt/response pairs (a .jsonl of {"prompt": ..., "response": ...}, or a data.recipe), with the loss
on the response tokens only. finetune.lora_rank=R trains rank-R LoRA adapters instead of all weights;
finetune.freeze=N freezes the embeddings and the first N blocks. The run directory gets the merged,
plain model.safetensors (sample it with launch/sample.py; --chat for sft runs), parent.json (lineage),
and with LoRA adapter.safetensors + adapter_config.json. Rerunning the same command resumes. The
parent's directory is never written to.

examples:
  python launch/finetune.py --config configs/finetune_sonnets.yaml --finetune.init_from=runs/shakespeare_char_cpu
  python launch/finetune.py --config configs/sft_sonnets.yaml --finetune.init_from=runs/shakespeare_char_cpu \\
      --finetune.lora_rank=8 --run.out_dir=runs/sonnets_sft_lora
  python launch/finetune.py --config configs/sft_jsonl.yaml --finetune.init_from=RUN_DIR --data.source=pairs.jsonl
--debug shows the full traceback of an error.
"""

# what the checkpoint's model, optimizer and data were built for
RESUME_KEYS = (
    "kind",
    "lora_rank",
    "lora_alpha",
    "freeze",
)


@dataclass
class Parent:
    """What a finetune starts from."""

    config: GPTConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    summary: dict[str, Any] | None  # the parent run's summary.json (None for hf: parents)


def load_parent(init_from: str) -> Parent:
    """The parent's model config, weights and tokenizer: a run directory, or `hf:PATH` / `hf:NAME`."""
    if init_from.startswith("hf:"):
        from dist_gpt.hf import load_hf_gpt2

        config, state, tokenizer = load_hf_gpt2(init_from)
        return Parent(config, state, tokenizer, None)
    try:
        run = load_run(init_from)
    except UserError as e:
        raise UserError(f"finetune.init_from={init_from}: {e}") from None
    if run.tokenizer.vocab_size > run.config.model.vocab_size:
        raise UserError(
            f"finetune.init_from={init_from}: tokenizer.json has {run.tokenizer.vocab_size} tokens but the model only {run.config.model.vocab_size}; "
            "the run's tokenizer.json was replaced: restore the one it was trained with"
        )
    if is_locked(Path(init_from)):
        log(
            f"warning: the parent {init_from} is still training; finetuning from the model it saved last ({(read_summary(Path(init_from)) or {}).get('steps', '?')} steps)"
        )
    return Parent(run.config.model, run.model.state_dict(), run.tokenizer, read_summary(Path(init_from)))


def adopt_parent(cfg: Config, parent: Parent) -> None:
    """Give `cfg` the parent's model and tokenizer; a key the user set that contradicts them is a UserError."""
    for key, value in dataclasses.asdict(parent.config).items():
        mine = getattr(cfg.model, key)
        auto = key == "vocab_size" and mine == 0  # 0: the tokenizer's
        if f"model.{key}" in cfg.explicit and key not in MODEL_KEYS_FREE and mine != value and not auto:
            raise UserError(
                f"model.{key}={mine!r} contradicts the parent {cfg.finetune.init_from}, which has model.{key}={value!r}: "
                f"a finetune keeps the parent's shape; remove model.{key} from the config and the command line (only model.dropout and model.attn_impl may change)"
            )
    dropout = cfg.model.dropout if "model.dropout" in cfg.explicit else parent.config.dropout
    # the kernel: decided on this machine
    cfg.model = dataclasses.replace(parent.config, dropout=dropout, attn_impl=cfg.model.attn_impl)
    tok = parent.tokenizer
    if "data.tokenizer" in cfg.explicit and cfg.data.tokenizer != tok.kind:
        raise UserError(
            f"data.tokenizer={cfg.data.tokenizer} but the parent {cfg.finetune.init_from} uses the {tok.kind} tokenizer: a finetune encodes its data with the parent's tokenizer; remove data.tokenizer"
        )
    if "data.vocab_size" in cfg.explicit and cfg.data.vocab_size != tok.vocab_size:
        raise UserError(
            f"data.vocab_size={cfg.data.vocab_size} but the parent's {tok.kind} tokenizer has {tok.vocab_size} tokens: a finetune keeps the parent's tokenizer; remove data.vocab_size"
        )
    cfg.data.tokenizer, cfg.data.vocab_size = tok.kind, tok.vocab_size
    if cfg.finetune.freeze > cfg.model.n_layer:
        raise UserError(
            f"finetune.freeze={cfg.finetune.freeze} but the parent has only {cfg.model.n_layer} blocks: freeze at most model.n_layer"
        )


def check_prepared_tokenizer(data_dir: Path, tokenizer: Tokenizer) -> None:
    """The prepared data must be encoded with the parent's tokenizer, token for token."""
    saved = load_tokenizer(data_dir / "tokenizer.json")
    if (
        saved.fingerprint() != tokenizer.fingerprint()
        or load_meta(data_dir).get("tokenizer_fingerprint") != tokenizer.fingerprint()
    ):
        raise UserError(
            f"tokenizer mismatch: {data_dir} was prepared with a different tokenizer ({saved.kind}, {saved.vocab_size} tokens) than the parent's "
            f"({tokenizer.kind}, {tokenizer.vocab_size} tokens); delete {data_dir} or choose another data.name so it is prepared again"
        )


def check_sft_pairs(data_dir: Path, block_size: int) -> None:
    """Each SFT pair trains on the response tokens among its first block_size targets: there must be some."""
    for name in ("train", "val"):
        split = open_split(data_dir, name)
        starts, ends = split.offsets[:-1], split.offsets[1:]
        ones = np.flatnonzero(np.asarray(split.mask))  # positions of response tokens
        k = np.minimum(np.searchsorted(ones, starts), len(ones) - 1)
        first = ones[k] if len(ones) else ends  # each pair's first response token
        fits = (first >= starts) & (first < ends) & (first - starts <= block_size)
        if not fits.any():
            raise UserError(
                f"no {name} pair has a response token within block_size={block_size} tokens: every prompt fills the context, so there is nothing to train on "
                "or measure; shorten the prompts or finetune a parent with a longer model.block_size"
            )
        if not fits.all():
            log(
                f"warning: {int((~fits).sum())} of {len(fits)} {name} pairs have a prompt of block_size={block_size} tokens or more and count for nothing"
            )


def check_finetune_resume(cfg: Config, run: RunDir) -> None:
    """Resuming a finetune needs the settings its checkpoints were written with."""
    if run.resume_from is None:
        return
    saved = read_config(run.path).finetune
    for key in RESUME_KEYS:
        mine, theirs = getattr(cfg.finetune, key), getattr(saved, key)
        if mine != theirs:
            raise UserError(
                f"{run.path} holds a finetune with finetune.{key}={theirs!r} and this command asks for {mine!r}: rerun with finetune.{key}={theirs!r} to resume it, "
                "or start this one in another --run.out_dir (or pass --run.resume=never --run.overwrite=true to replace it)"
            )


def freeze_bottom(model: GPT, n_blocks: int) -> None:
    """No gradients for the token and position embeddings and blocks 0..n_blocks-1 (a tied LM head is the token embedding)."""
    t = model.transformer
    embeddings = [t[name] for name in ("wte", "wpe") if name in t]  # a pos_emb=rope model has no wpe
    for module in (*embeddings, *t.h[:n_blocks]):
        module.requires_grad_(False)


def finetune_job(cfg: Config, parent: Parent) -> Job:
    """The Job for an adopted config: the parent's weights, frozen layers or LoRA adapters, lineage."""
    torch.manual_seed(cfg.run.seed)  # the same adapter initialisation on every rank
    model = GPT(cfg.model)
    model.load_state_dict(parent.state)
    f = cfg.finetune
    lineage = {
        "init_from": f.init_from,
        "path": str(Path(f.init_from).resolve()) if not f.init_from.startswith("hf:") else None,
        "summary": parent.summary,
    }
    job = Job(cfg=cfg, model=model, tokenizer=parent.tokenizer, data_dir=cfg.data_dir, parent=lineage)
    if f.lora_rank:
        job.model = lora.attach(model, f.lora_rank, f.lora_alpha, f.lora_dropout)
        job.export_weights = partial(lora.merged_state_dict, scale=f.lora_alpha / f.lora_rank)
        job.save_extras = partial(
            lora.save_adapter, rank=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout, base=f.init_from
        )
    elif f.freeze:
        freeze_bottom(model, f.freeze)
    return job


def finetune(args: list[str]) -> None:
    cfg = parse_stage_args(args, "finetune", FINETUNE_USAGE)
    parent = load_parent(cfg.finetune.init_from)
    adopt_parent(cfg, parent)
    sft = cfg.finetune.kind == "sft"

    def check(run: RunDir) -> None:
        if sft:
            check_sft_pairs(cfg.data_dir, cfg.model.block_size)
        check_finetune_resume(cfg, run)

    train(
        cfg, "finetune", lambda cfg, _tok: finetune_job(cfg, parent), tokenizer=parent.tokenizer, sft=sft, check=check
    )
