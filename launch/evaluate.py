"""Evaluate a run on a whole split or a text file: `python launch/evaluate.py --run RUN_DIR [--split val|train] [--data.source=PATH] [--json]`,
or on HellaSwag-style multiple choice: `python launch/evaluate.py --run RUN_DIR --task hellaswag [--data FILE.jsonl]`."""

from dist_gpt.cli import main
from dist_gpt.evaluate import main as evaluate

if __name__ == "__main__":
    main(evaluate)
