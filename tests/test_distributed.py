"""Scale on CPU: the model under raw FSDP2 (2 gloo processes), an FSDP launch that falls back, two "machines" on one host.

Accelerate's FSDP plugin needs CUDA (on CPU it silently gives DDP), so the model's FSDP compatibility is
checked with torch's own `fully_shard`: shard every Block and the root, train, gather the full state dict,
and compare with the same training unsharded. This file is also the FSDP worker (`torchrun ... test_distributed.py fsdp OUT`).
The plain 2-process DDP smoke test lives in test_pretrain.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script

from dist_gpt.checkpoint import load_weights, save_weights
from dist_gpt.config import GPTConfig
from dist_gpt.io import atomic_write_json
from dist_gpt.model import GPT
from dist_gpt.rundir import load_run

CFG = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
STEPS, MICRO = 3, 4  # optimizer steps; sequences per rank per step


def fsdp_worker(out: Path) -> None:
    """One rank: FSDP2-sharded GPT and, for comparison, the same GPT unsharded on the whole global batch."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the root: embeddings (the tied head too) and the final LayerNorm
    local = sum(p.to_local().numel() for p in model.parameters())  # DTensor shards
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, reference))
    batches = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        # the same global batch everywhere
        seq = torch.randint(0, CFG.vocab_size, (world * MICRO, CFG.block_size + 1), generator=batches)
        x, y = seq[:, :-1], seq[:, 1:]
        # this rank's micro-batch; FSDP averages the gradients
        _, loss = model(x.chunk(world)[rank], y.chunk(world)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        _, ref_loss = reference(x, y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    # gathered on rank 0
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    atomic_write_json(out / f"rank{rank}.json", {"world": world, "local_numel": local})
    if rank == 0:
        save_weights(full, out / "model.safetensors")
        save_weights(reference.state_dict(), out / "reference.safetensors")
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_shards_trains_and_saves_a_plain_model(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "fsdp",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    full_numel = sum(p.numel() for p in GPT(CFG).parameters())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    # really sharded (>=: padding)
    assert sum(r["local_numel"] for r in ranks) >= full_numel > max(r["local_numel"] for r in ranks)

    saved = load_weights(tmp_path / "model.safetensors")
    plain = GPT(CFG)
    assert saved.keys() == plain.state_dict().keys()  # the same plain keys as an unsharded run: one tied embedding
    plain.load_state_dict(saved)  # strict
    reference = load_weights(tmp_path / "reference.safetensors")
    torch.manual_seed(0)
    initial = GPT(CFG).state_dict()
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-5, rtol=1e-5)  # unsharded training, whole batch
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_fsdp_config_on_cpu_says_it_fell_back(tmp_path, shakespeare):
    """configs/accelerate/fsdp.yaml on a CPU-only machine: Accelerate gives DDP, and the run says so."""
    result = run_script(
        "pretrain.py",
        *(
            "--config",
            "configs/smoke.yaml",
            f"--data.source={shakespeare}",
            f"--data.dir={tmp_path / 'data'}",
            f"--run.out_dir={tmp_path / 'run'}",
            "--train.max_steps=2",
        ),
        launcher=[
            "accelerate",
            "launch",
            "--config_file",
            "configs/accelerate/fsdp.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "FSDP was requested" in out and "fell back to DDP over gloo" in out
    assert "world size 2 (MULTI_CPU, DistributedDataParallel)" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights_sha256(model: torch.nn.Module) -> str:
    """The trainer's replica check digest: every parameter's bytes, in order."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow  # a whole run or more (CI runs the slow tier)
def test_two_machines_on_one_host(tmp_path, shakespeare):
    """`accelerate launch --num_machines 2 --machine_rank 0|1`: one CPU process per "machine", one gloo group, the same weights."""
    port = free_port()
    args = [
        "--config",
        "configs/smoke.yaml",
        f"--data.source={shakespeare}",
        f"--data.dir={tmp_path / 'data'}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--train.max_steps=6",
    ]
    cmds = [
        [
            *(
                "accelerate",
                "launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--num_processes",
                "2",
            ),
            *(
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
            ),
            str(REPO / "launch" / "pretrain.py"),
            *args,
        ]
        for rank in (0, 1)
    ]
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "world size 2 (MULTI_CPU, DistributedDataParallel)" in logs[0]
    agreed = [line for line in logs[0].splitlines() if line.startswith("weights identical on all 2 ranks")]
    assert agreed, logs[0][-2000:]  # each rank hashed its own weights; rank 0 compared the two digests
    digest = agreed[0].split("sha256 ")[1].rstrip(")")
    assert weights_sha256(load_run(tmp_path / "run").model).startswith(digest)  # and the saved model is those weights


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp"]:
    fsdp_worker(Path(sys.argv[2]))
