"""Evaluate a run on a whole split or a text file: `python launch/evaluate.py --run RUN_DIR [--split val|train] [--data.source=PATH] [--json]`."""

from dist_gpt.cli import main
from dist_gpt.evaluate import main as evaluate

if __name__ == "__main__":
    main(evaluate)
