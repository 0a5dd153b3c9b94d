"""Small probes that bench/gpu_checks.py runs in their own processes; each prints one JSON object on stdout.

    python bench/gpu_probe.py env                               # the machine: GPU, versions, the MFU peak, missing packages
    python bench/gpu_probe.py compile --device cuda --limit 20  # torch.compile an MLP's forward + backward within 20 s
    python bench/gpu_probe.py load RUN_DIR --device cuda        # strict loads of a run's weights into a plain GPT

Each imports torch (and dist_gpt); bench/gpu_checks.py itself does not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def probe_env() -> dict[str, Any]:
    """What the results table's environment line says."""
    try:
        from dist_gpt.trainer import PEAK_BF16_FLOPS  # the peaks the trainer's `mfu` is quoted against
    except ImportError:
        PEAK_BF16_FLOPS = {}

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "accelerate": version("accelerate"),
        "safetensors": version("safetensors"),
        "tokenizers": version("tokenizers"),
        "cpus": len(os.sched_getaffinity(0)),
        "missing": [m for m in ("datasets", "wandb") if importlib.util.find_spec(m) is None],
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": name,
            "devices": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(),
            "cudnn": torch.backends.cudnn.version(),
            "peak_bf16_flops": next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None),
        }
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["driver"] = smi.stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def probe_compile(device: str, backend: str, limit: int) -> dict[str, Any]:
    """torch.compile an MLP, run forward + backward once, compare with eager; TimeoutError after `limit` seconds."""

    def too_slow(signum, frame):
        raise TimeoutError(f"torch.compile (backend {backend}) took more than {limit} s")

    signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(limit)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).to(device)
    x = torch.randn(64, 256, device=device)  # (B, C)
    eager_loss = mlp(x).square().mean()
    eager_loss.backward()
    eager_grad = mlp[0].weight.grad.clone()
    mlp.zero_grad()
    start = time.perf_counter()
    loss = torch.compile(mlp, backend=backend)(x).square().mean()
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    signal.alarm(0)
    loss_diff = abs(loss.item() - eager_loss.item())
    grad_diff = (mlp[0].weight.grad - eager_grad).abs().max().item()
    ok = (
        torch.allclose(mlp[0].weight.grad, eager_grad, rtol=1e-3, atol=1e-5)
        and loss_diff <= 1e-3 * abs(eager_loss.item()) + 1e-6
    )
    return {
        "backend": backend,
        "device": device,
        "seconds": round(seconds, 2),
        "loss_diff": loss_diff,
        "grad_diff": grad_diff,
        "matches_eager": ok,
    }


def probe_load(run_dir: Path, device: str) -> dict[str, Any]:
    """Each weights file of the run (RUN_DIR/model.safetensors, the newest checkpoint's) loaded strictly into a plain GPT,
    then the user's path: load_run on `device` and one forward pass."""
    from dist_gpt.checkpoint import load_weights
    from dist_gpt.model import GPT
    from dist_gpt.rundir import load_run

    run = load_run(run_dir, device=device)  # strict; a UserError (exit 2) says what does not match
    expected = set(GPT(run.config.model).state_dict())
    files = {"model.safetensors": run_dir / "model.safetensors"}
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoints/step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    if checkpoints:
        files[f"checkpoints/{checkpoints[-1].name}/model.safetensors"] = checkpoints[-1] / "model.safetensors"
    report = {}
    for name, path in files.items():
        state = load_weights(path)
        entry: dict[str, Any] = {
            "keys": len(state),
            "wrapper_keys": sorted(
                k for k in state if k.split(".")[0] in ("_orig_mod", "module", "_fsdp_wrapped_module")
            )[:5],
        }
        entry["missing"], entry["unexpected"] = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
        try:
            GPT(run.config.model).load_state_dict(state)  # strict
            entry["strict"] = True
        except RuntimeError as e:
            entry["strict"], entry["error"] = False, str(e).splitlines()[0][:300]
        report[name] = entry
    idx = torch.zeros(1, min(8, run.config.model.block_size), dtype=torch.long, device=device)  # (1, T)
    with torch.no_grad():
        logits, _ = run.model(idx)
    return {
        "params": sum(p.numel() for p in run.model.parameters()),
        "device": str(next(run.model.parameters()).device),
        "files": report,
        "forward_finite": bool(torch.isfinite(logits).all()),
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench/gpu_probe.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    sub.add_parser("env")
    c = sub.add_parser("compile")
    c.add_argument("--device", default="cuda")
    c.add_argument("--backend", default="inductor")
    c.add_argument("--limit", type=int, default=20)
    load = sub.add_parser("load")
    load.add_argument("run_dir", type=Path)
    load.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.probe == "env":
        result = probe_env()
    elif args.probe == "compile":
        result = probe_compile(args.device, args.backend, args.limit)
    else:
        result = probe_load(args.run_dir, args.device)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from dist_gpt.cli import main as cli_main

    cli_main(main)  # a UserError (e.g. weights that do not load) is one `error: ...` line, exit 2
