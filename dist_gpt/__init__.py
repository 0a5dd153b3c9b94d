"""dist_gpt: train GPT language models from scratch and finetune them.

    from dist_gpt import GPT, GPTConfig, load_run
    run = load_run("runs/shakespeare_char")          # .model (GPT, eval mode), .tokenizer, .config

`import dist_gpt` stays cheap: the names below are imported on first use (torch takes seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "dist_gpt.model",
    "GPTConfig": "dist_gpt.config",
    "load_run": "dist_gpt.checkpoint",
    "load_tokenizer": "dist_gpt.tokenizers",
    "UserError": "dist_gpt.errors",
}
__all__ = ["GPT", "GPTConfig", "UserError", "load_run", "load_tokenizer", "__version__"]

if TYPE_CHECKING:
    from dist_gpt.config import GPTConfig
    from dist_gpt.errors import UserError
    from dist_gpt.model import GPT
    from dist_gpt.rundir import load_run
    from dist_gpt.tokenizers import load_tokenizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dist_gpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
