"""Pretrain a GPT from scratch: `accelerate launch launch/pretrain.py [--config FILE] [--section.key=value ...]`."""

from dist_gpt.cli import main
from dist_gpt.stages import pretrain

if __name__ == "__main__":
    main(pretrain)
