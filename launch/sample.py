"""Sample from a trained run: `python launch/sample.py --run RUN_DIR --prompt TEXT [...]` (`--help` lists the flags)."""

from dist_gpt.cli import main
from dist_gpt.sample import sample

if __name__ == "__main__":
    main(sample)
