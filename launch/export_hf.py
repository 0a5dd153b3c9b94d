"""Export a run as a transformers GPT-2 folder: `python launch/export_hf.py --run RUN_DIR --out DIR`."""

from dist_gpt.cli import main
from dist_gpt.hf import main as export

if __name__ == "__main__":
    main(export)
