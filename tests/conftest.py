"""Test environment: never touch the network, never prompt, one thread per process, no GPU (also on a GPU host)."""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="dist_gpt_hf_")
_CACHE_HOME = tempfile.mkdtemp(prefix="dist_gpt_cache_")
for folder in (_HF_HOME, _CACHE_HOME):  # the suite's own caches go with it (what a test leaves is under tmp_path)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": _HF_HOME,
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    # the hardware decisions (precision, attention kernel) from the CPU's flags, not a timing: the same on every run
    "DIST_GPT_PROBE": "0",
    "XDG_CACHE_HOME": _CACHE_HOME,
}.items():
    os.environ.setdefault(key, value)
# The suite checks the CPU path: exact CPU numerics, thread counts, gloo groups, the FSDP fallback, the CPU default
# config. On a GPU host, hide the GPUs from every test and every process a test starts (they inherit os.environ);
# bench/gpu.sh checks the GPU path. Set before torch initialises CUDA.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIST_GPT_SHARED", REPO.parent / "shared"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
SONNETS = SHARED / "data" / "sonnets" / "sonnets_gut.txt"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"Tiny Shakespeare not found at {SHAKESPEARE}; set DIST_GPT_SHARED to the folder holding data/")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def sonnets() -> Path:
    if not SONNETS.is_file():
        pytest.fail(f"the Sonnets not found at {SONNETS}; set DIST_GPT_SHARED to the folder holding data/")
    return SONNETS


def run_script(
    script: str,
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: float = 600,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `launch/<script>` as a user would (python, or a launcher such as accelerate); capture its output."""
    cmd = [*(launcher or [sys.executable]), str(REPO / "launch" / script), *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def first_of_each(rows: list, group: Callable[[Any], str]) -> list:
    """Table rows as test parameters named by row.id: the first row of each group runs in the default suite, the rest
    are marked slow (each row starts a Python process; CI runs both tiers, so every row runs there)."""
    seen: set[str] = set()
    params = []
    for row in rows:
        params.append(pytest.param(row, id=row.id, marks=pytest.mark.slow if group(row) in seen else ()))
        seen.add(group(row))
    return params


def toy_gpt2_file(path: Path, merges: list[bytes]) -> Path:
    """A ranks file in gpt2.tiktoken's format (the 256 bytes, then `merges`) that stands in for GPT-2's (no network here)."""
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path
