"""The run directory: the only code that knows its files and the rules for creating, resuming, overwriting and locking it.

    RUN_DIR/
      .dist_gpt_run   the marker: this directory was created by dist_gpt as a run (JSON: stage, created)
      config.yaml  tokenizer.json  parent.json  model.safetensors  summary.json  metrics.jsonl  samples.jsonl
      checkpoints/step_000500/ ...   (see checkpoint.py)
"""

from __future__ import annotations

from pathlib import Path

MARKER = ".dist_gpt_run"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
PARENT = "parent.json"
MODEL = "model.safetensors"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
CHECKPOINTS = "checkpoints"


def is_run_dir(path: str | Path) -> bool:
    """True for a directory dist_gpt created as a run: it holds the marker, or (runs written before the marker
    existed) a config.yaml beside a model.safetensors or a checkpoints/ folder."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return (path / CONFIG).is_file() and ((path / MODEL).is_file() or (path / CHECKPOINTS).is_dir())
