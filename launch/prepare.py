"""Prepare a dataset: tokenize `data.source` into data/<data.name>/ (train.bin, val.bin, tokenizer.json, meta.json),
or into token shards and a manifest (data.shard_tokens > 0), by one worker or several.

Pretrain and finetune do this themselves when the arrays are missing or stale; run it to prepare ahead.
"""

from dist_gpt.cli import config_path, main, parse_stage_args
from dist_gpt.stages import prepare_from_config
from dist_gpt.streaming import workers_from_launcher

USAGE = """
usage: python launch/prepare.py [--config FILE] [--section.key=value ...]

Tokenize data.source into data.dir (default data/<data.name>/). A second run with the same source and
settings does nothing; a changed source or setting rebuilds. Examples:
  python launch/prepare.py --config configs/shakespeare_char.yaml --data.source=../shared/data/tinyshakespeare/input.txt
  python launch/prepare.py --data.tokenizer=bpe --data.vocab_size=2048 --data.name=shakespeare_bpe --data.source=input.txt
  python launch/prepare.py --data.name=sonnets_sft --data.source=sonnets.txt --data.recipe=sonnets_sft \\
      --finetune.kind=sft --finetune.init_from=runs/shakespeare_char   # encode with the parent's tokenizer
Sharded (README, "Sharded data"): token shards streamed from .jsonl / parquet / text files or a Hub dataset;
several workers split the input files (each runs the same command with its own rank; under torchrun, RANK and
WORLD_SIZE are taken as data.prepare_rank and data.prepare_world); the last to finish writes meta.json:
  python launch/prepare.py --data.source='corpus/*.parquet' --data.tokenizer=gpt2 --data.eot=true \
      --data.shard_tokens=100000000 --data.val_tokens=10485761 --data.num_proc=8 [--data.prepare_rank=R --data.prepare_world=W]
  torchrun --nproc_per_node 4 launch/prepare.py --config configs/gpt2_124m_fineweb.yaml
"""


def run(args: list[str]) -> None:
    cfg = parse_stage_args(args, "prepare", USAGE, default_config=config_path("shakespeare_char.yaml"))
    workers_from_launcher(cfg)
    prepare_from_config(cfg)


if __name__ == "__main__":
    main(run)
