"""Plot loss curves from runs' metrics.jsonl: `python launch/plot.py RUN_DIR [RUN_DIR ...] --out FILE.png [--log]`."""

from dist_gpt.cli import main
from dist_gpt.plot import main as plot

if __name__ == "__main__":
    main(plot)
