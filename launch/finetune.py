"""Finetune a trained GPT: `accelerate launch launch/finetune.py --config FILE --finetune.init_from=RUN_DIR [--section.key=value ...]`."""

from dist_gpt.cli import main
from dist_gpt.stages import finetune

if __name__ == "__main__":
    main(finetune)
