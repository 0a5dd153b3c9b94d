"""The lecture ladder: `python launch/ladder.py [--scale cpu|lecture] [--out DIR]` (`--help` for the rest)."""

from dist_gpt.cli import main
from dist_gpt.ladder import ladder

if __name__ == "__main__":
    main(ladder)
