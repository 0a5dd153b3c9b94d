"""Prepare a dataset: tokenize `data.source` into data/<data.name>/ (train.bin, val.bin, tokenizer.json, meta.json).

Pretrain and finetune do this themselves when the arrays are missing or stale; run it to prepare ahead.
"""

from dist_gpt.cli import config_path, main, parse_stage_args
from dist_gpt.stages import prepare_from_config

USAGE = """
usage: python launch/prepare.py [--config FILE] [--section.key=value ...]

Tokenize data.source into data.dir (default data/<data.name>/). A second run with the same source and
settings does nothing; a changed source or setting rebuilds. Examples:
  python launch/prepare.py --config configs/shakespeare_char.yaml --data.source=../shared/data/tinyshakespeare/input.txt
  python launch/prepare.py --data.tokenizer=bpe --data.vocab_size=2048 --data.name=shakespeare_bpe --data.source=input.txt
  python launch/prepare.py --data.name=sonnets_sft --data.source=sonnets.txt --data.recipe=sonnets_sft \\
      --finetune.kind=sft --finetune.init_from=runs/shakespeare_char   # encode with the parent's tokenizer
"""


def run(args: list[str]) -> None:
    cfg = parse_stage_args(args, "prepare", USAGE, default_config=config_path("shakespeare_char.yaml"))
    prepare_from_config(cfg)


if __name__ == "__main__":
    main(run)
