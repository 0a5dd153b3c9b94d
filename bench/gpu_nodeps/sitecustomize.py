"""Dry runs of bench/gpu.sh put this folder first on PYTHONPATH: `datasets` and `wandb` then cannot be imported
(`import datasets` raises ModuleNotFoundError, importlib.util.find_spec returns None), as on the GPU machine,
so a run stage that needs them fails here first."""

import sys

for _name in ("datasets", "wandb"):
    sys.modules[_name] = None  # type: ignore[assignment]
