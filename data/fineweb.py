"""FineWeb as GPT-2 token shards: the data of configs/gpt2_124m_fineweb.yaml and configs/gpt2_124m_speedrun.yaml.

    python data/fineweb.py                                          # online: HuggingFaceFW/fineweb, sample-10BT
    python data/fineweb.py --data.source='fineweb/sample/10BT/*.parquet'   # local copies of its parquet files
    torchrun --nproc_per_node 4 data/fineweb.py                     # 4 workers, each preparing every 4th file
    python data/fineweb.py --data.prepare_rank=1 --data.prepare_world=2     # worker 1 of 2 (e.g. on a second node)

It runs the streaming prepare (dist_gpt/streaming.py) with the data section of configs/gpt2_124m_fineweb.yaml:
the Hub dataset streamed file by file (nothing downloaded up front), GPT-2 tokens with <|endoftext|> before every
document (as llm.c and modded-nanogpt), shards of 100M tokens in data/fineweb10B_gpt2/, and the stream's first
10,485,761 tokens as the val split (modded-nanogpt's val loss: its val shard's first 10,485,760 targets). Any
--section.key=value of launch/prepare.py may follow. Stopped, it resumes after the last finished shard.
The gpt2 tokenizer needs tiktoken's GPT-2 files (README, "Data"). This is a script, not a data.recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_gpt.cli import main, parse_stage_args
from dist_gpt.stages import prepare_from_config
from dist_gpt.streaming import workers_from_launcher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt2_124m_fineweb.yaml"
USAGE = __doc__.split("\n\n", 2)[1] if __doc__ else ""


def run(args: list[str]) -> None:
    cfg = parse_stage_args(
        ["--config", str(CONFIG), *args],
        "prepare",
        f"usage: python data/fineweb.py [--section.key=value ...]\n\n{USAGE}",
    )
    workers_from_launcher(cfg)
    prepare_from_config(cfg)


if __name__ == "__main__":
    main(run, sys.argv[1:])
