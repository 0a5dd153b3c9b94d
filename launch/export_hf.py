"""Export a run as a transformers GPT-2 folder with a model card: `python launch/export_hf.py --run RUN_DIR --out DIR [--overwrite] [--push_to_hub OWNER/NAME]`."""

from dist_gpt.cli import main
from dist_gpt.hf import main as export

if __name__ == "__main__":
    main(export)
