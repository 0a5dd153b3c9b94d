"""What differs between the stages: where the model and the tokenizer come from. The loop is trainer.py's.

    pretrain: a fresh GPT, a tokenizer trained on the corpus (or loaded from the prepared data).
"""

from __future__ import annotations

import torch

from dist_gpt.cli import config_path, parse_stage_args
from dist_gpt.config import Config
from dist_gpt.data import prepare
from dist_gpt.errors import UserError
from dist_gpt.model import GPT
from dist_gpt.tokenizers import load_tokenizer
from dist_gpt.tracking import log
from dist_gpt.trainer import Job, Trainer, make_accelerator, on_main, open_run

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
    if torch.cuda.is_available():
        log("no --config given: using configs/shakespeare_char.yaml (the lecture model; a GPU is present)")
        return config_path("shakespeare_char.yaml")
    log("no --config given and no GPU: using configs/shakespeare_char_cpu.yaml (the lecture model needs hours on a CPU; this one trains in minutes)")
    return config_path("shakespeare_char_cpu.yaml")


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer_vocab
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; leave it at 0 to take the tokenizer's")


def pretrain(args: list[str]) -> None:
    cfg = parse_stage_args(args, "pretrain", PRETRAIN_USAGE, default_config=default_pretrain_config(args))
    accelerator = make_accelerator(cfg)
    run = open_run(cfg, accelerator)
    try:
        on_main(accelerator, lambda: prepare(cfg.data, data_dir=cfg.data_dir, block_size=cfg.model.block_size, log=log))
        tokenizer = load_tokenizer(cfg.data_dir / "tokenizer.json")
        resolve_vocab(cfg, tokenizer.vocab_size)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        model = GPT(cfg.model)
        Trainer(Job(cfg=cfg, model=model, tokenizer=tokenizer, data_dir=cfg.data_dir), accelerator, run).fit()
    finally:
        run.release()
