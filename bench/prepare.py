"""Benchmark `dist_gpt.prepare.prepare` against a plain loop: speed and peak memory.

    python bench/prepare.py --mb 100 --mb 400          # the real run (minutes); --mb 5 checks the script

For each size, Tiny Shakespeare is repeated to at least that many MB (10^6 bytes) into bench/out/. Then,
each in a fresh subprocess, for `char` and `bpe`:
- plain: read the file, encode it (char: the lecture's `[stoi[c] for c in text]` after `sorted(set(text))`;
  bpe: `tok.encode(text)` of the whole text), `np.array(ids, dtype=np.uint16).tofile(...)`. Mind its memory:
  one `tokenizers` encode of a whole text takes about 140 bytes per character (14 GB at 100 MB); lower
  --plain-max-mb on a smaller machine;
- prepare at num_proc 1 and 2 (`bpe` encodes with a tokenizer trained once on Tiny Shakespeare, passed in
  as a finetune would, so neither side times BPE training).
Seconds exclude interpreter start and imports. Memory: "peak RSS" is the largest ru_maxrss of any process
of the run (it counts the memory-mapped Arrow cache pages a process touched, which the kernel can drop at
will); "peak private" is the largest sum of Pss_Anon over the run's process tree (anonymous memory, pages
shared by forked processes counted once), sampled every 20 ms.
"same ids" checks that prepare's train.bin + val.bin equal the plain loop's array.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get("DIST_GPT_SHARED", REPO.parent / "shared")) / "data" / "tinyshakespeare" / "input.txt"


# ----------------------------------------------------------------------------- the measured work (in a fresh process)


def sha256_files(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def worker(job: dict) -> dict:
    import datasets  # noqa: F401  (imported before the clock starts, like everything else)
    import numpy as np

    from dist_gpt.config import DataConfig
    from dist_gpt.prepare import prepare
    from dist_gpt.tokenizers import load_tokenizer

    out = Path(job["out"])
    tokenizer = load_tokenizer(job["tokenizer"]) if job["tokenizer"] else None
    t0 = time.perf_counter()
    if job["method"] == "plain":
        text = Path(job["source"]).read_text(encoding="utf-8")
        if job["kind"] == "char":
            stoi = {c: i for i, c in enumerate(sorted(set(text)))}
            ids = [stoi[c] for c in text]
        else:
            ids = tokenizer.encode(text)
        out.mkdir(parents=True, exist_ok=True)
        np.array(ids, dtype=np.uint16).tofile(out / "all.bin")
        seconds, n_tokens = time.perf_counter() - t0, len(ids)
        digest = sha256_files(out / "all.bin")
    else:
        cfg = DataConfig(source=job["source"], tokenizer=job["kind"], num_proc=job["num_proc"])
        meta = prepare(cfg, data_dir=out, tokenizer=tokenizer, log=lambda _: None)
        seconds, n_tokens = time.perf_counter() - t0, sum(meta["tokens"].values())
        digest = sha256_files(out / "train.bin", out / "val.bin")
    rss = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return {"seconds": seconds, "tokens": n_tokens, "sha256": digest, "rss_mb": rss / 1024}


def train_bpe(path: str, out: str) -> dict:
    from dist_gpt.tokenizers import train_tokenizer

    text = Path(path).read_text(encoding="utf-8")
    train_tokenizer("bpe", [text], vocab_size=2048).save(out)
    return {}


# ----------------------------------------------------------------------------- the driver


def tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def private_kb(pid: int) -> int:
    """Anonymous memory of `pid`, pages shared with forked relatives counted once across them (Pss_Anon)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss_Anon:")), 0)
    except OSError:
        return 0


def run_child(job: dict, env: dict) -> dict:
    """Run one job in a fresh interpreter; sample its process tree's private memory meanwhile."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(private_kb(p) for p in tree(proc.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark job {job} failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "private_mb": peak[0] / 1024}


def corpus(mb: float, out_dir: Path) -> Path:
    """Tiny Shakespeare repeated to at least `mb` MB."""
    text = SHAKESPEARE.read_bytes()
    copies = math.ceil(mb * 1e6 / len(text))
    path = out_dir / f"tinyshakespeare_x{copies}.txt"
    if not path.is_file() or path.stat().st_size != copies * len(text):
        with open(path, "wb") as f:
            for _ in range(copies):
                f.write(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, action="append", help="corpus size in MB; repeat for several (default: 100 and 400)"
    )
    parser.add_argument("--kinds", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    parser.add_argument(
        "--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values to run prepare with"
    )
    parser.add_argument(
        "--plain-max-mb",
        type=float,
        default=100,
        help="run the plain loop only up to this size (it holds the corpus in memory)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="scratch folder (corpora, arrays)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(train_bpe(job["source"], job["out"]) if job["method"] == "train_bpe" else worker(job)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(args.out / "hf_home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    bpe_file = args.out / "bpe_tokenizer.json"
    if "bpe" in args.kinds:
        run_child({"method": "train_bpe", "source": str(SHAKESPEARE), "out": str(bpe_file)}, env)

    rows = []
    print(f"# prepare benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n", flush=True)
    print(
        "| corpus MB | tokenizer | method | num_proc | seconds | MB/s | Mtokens/s | peak RSS MB | peak private MB | same ids |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for mb in args.mb or [100, 400]:
        source = corpus(mb, args.out)
        size_mb = source.stat().st_size / 1e6
        for kind in args.kinds:
            jobs = [("plain", 1)] if size_mb <= args.plain_max_mb * 1.01 else []
            jobs += [("prepare", n) for n in args.num_proc]
            plain_sha = None
            for method, num_proc in jobs:
                data_dir = args.out / f"run_{kind}_{method}_{num_proc}"
                shutil.rmtree(data_dir, ignore_errors=True)
                job = {
                    "method": method,
                    "kind": kind,
                    "num_proc": num_proc,
                    "source": str(source),
                    "out": str(data_dir),
                }
                job["tokenizer"] = str(bpe_file) if kind == "bpe" else None
                r = run_child(job, env)
                shutil.rmtree(data_dir, ignore_errors=True)
                plain_sha = r["sha256"] if method == "plain" else plain_sha
                same = "-" if method == "plain" or plain_sha is None else ("yes" if r["sha256"] == plain_sha else "NO")
                row = (
                    f"| {size_mb:.1f} | {kind} | {method} | {num_proc if method == 'prepare' else '-'} | {r['seconds']:.1f} | {size_mb / r['seconds']:.1f} "
                    f"| {r['tokens'] / r['seconds'] / 1e6:.2f} | {r['rss_mb']:.0f} | {r['private_mb']:.0f} | {same} |"
                )
                rows.append(row)
                print(row, flush=True)


if __name__ == "__main__":
    main()
