"""Benchmark the streaming, sharded prepare: peak memory (and seconds) at corpus sizes of 1 GB and more.

    nice -n 19 python bench/prepare_shards.py --gb 1 --gb 4        # the real run; --gb 0.05 checks the script

For each size, Tiny Shakespeare and the Sonnets, cut into documents of about 4 KB (FineWeb's documents average
about 3 KB), are repeated into .jsonl files of FILE_MB each in a temporary folder, until the text reaches that many
GB (10^9 bytes of text). Then, in a fresh process, `prepare` (data.shard_tokens > 0: dist_gpt/streaming.py)
builds shards of 100M tokens with the char tokenizer (a vocabulary sampled from the first 64 MB, as the streaming
prepare does) or a BPE tokenizer trained once on Tiny Shakespeare and passed in, as a finetune would. Everything
is deleted afterwards.

Memory is the result that matters here (a first row gives what the libraries alone take): "peak private" is the largest sum of Pss_Anon over the prepare's process
tree (anonymous memory: what the processes own, pages shared by forked relatives counted once), sampled every
50 ms; "peak RSS" is the largest ru_maxrss of any of its processes (it also counts page cache of the memory-mapped
and written files that the kernel can drop). Seconds are wall time on this machine as it was: under load they are
not a measure of the code, so the load average (1 minute) at the start and the end is printed beside them.
"same count" checks that the shards hold as many tokens as the text has characters (char) or as encoding it does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIST_GPT_SHARED", REPO.parent / "shared")) / "data"
CORPORA = [SHARED / "tinyshakespeare" / "input.txt", SHARED / "sonnets" / "sonnets_gut.txt"]
DOC_CHARS = 4096
FILE_MB = 256
SHARD_TOKENS = 100_000_000
VAL_TOKENS = 1_000_000

_spec = importlib.util.spec_from_file_location("bench_prepare", REPO / "bench" / "prepare.py")
bench_prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_prepare)  # its process-tree memory sampling: tree(), private_kb()


# ----------------------------------------------------------------------------- the measured work (in a fresh process)


def imports() -> None:
    """What every prepare process holds before it reads a byte: the libraries (datasets imports torch when it streams)."""
    import datasets  # noqa: F401
    import torch  # noqa: F401

    import dist_gpt.streaming  # noqa: F401


def baseline() -> dict:
    imports()
    time.sleep(1.0)  # long enough for the memory sampler
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(job: dict) -> dict:
    imports()  # before the clock starts

    from dist_gpt.config import DataConfig
    from dist_gpt.prepare import prepare
    from dist_gpt.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(job["tokenizer"]) if job["tokenizer"] else None
    cfg = DataConfig(
        source=job["source"],
        tokenizer=job["kind"],
        num_proc=job["num_proc"],
        shard_tokens=SHARD_TOKENS,
        val_tokens=VAL_TOKENS,
    )
    t0 = time.perf_counter()
    meta = prepare(cfg, data_dir=Path(job["out"]), tokenizer=tokenizer, log=lambda _: None)
    seconds = time.perf_counter() - t0
    rss = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    shards = len(meta["shards"]["train"]) + len(meta["shards"]["val"])
    return {"seconds": seconds, "tokens": sum(meta["tokens"].values()), "shards": shards, "rss_mb": rss / 1024}


def train_bpe(out: str) -> dict:
    from dist_gpt.tokenizers import train_tokenizer

    train_tokenizer("bpe", [CORPORA[0].read_text(encoding="utf-8")], vocab_size=2048).save(out)
    return {}


def expected_tokens(job: dict) -> int:
    """What the shards must hold: the text's characters (char), or the sum of encoding each document (bpe)."""
    if job["kind"] == "char":
        return job["chars"]
    from dist_gpt.tokenizers import load_tokenizer

    tok = load_tokenizer(job["tokenizer"])
    return sum(len(tok.encode(d)) for d in documents()) * job["copies"]


# ----------------------------------------------------------------------------- the driver


def documents() -> list[str]:
    """The shared corpora cut into pieces of about DOC_CHARS characters, at line breaks."""
    docs = []
    for path in CORPORA:
        text, start = path.read_text(encoding="utf-8"), 0
        while start < len(text):
            end = text.find("\n", start + DOC_CHARS)
            end = len(text) if end < 0 else end + 1
            docs.append(text[start:end])
            start = end
    return docs


def write_corpus(gb: float, folder: Path) -> dict:
    """.jsonl files of about FILE_MB each, whole copies of the documents, until the text reaches `gb` * 10^9 bytes."""
    docs = documents()
    block = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    copy_bytes, copy_chars = sum(len(d.encode("utf-8")) for d in docs), sum(map(len, docs))
    copies = int(-(-gb * 1e9 // copy_bytes))
    per_file = max(int(FILE_MB * 1e6 // len(block)), 1)
    files = 0
    for start in range(0, copies, per_file):
        with open(folder / f"part_{files:04d}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(min(per_file, copies - start)):
                f.write(block)
        files += 1
    return {"chars": copies * copy_chars, "bytes": copies * copy_bytes, "copies": copies, "files": files}


def run_child(job: dict, env: dict) -> dict:
    """One job in a fresh interpreter at the lowest priority; its process tree's private memory sampled meanwhile."""
    cmd = ["nice", "-n", "19", sys.executable, __file__, "--worker", json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(bench_prepare.private_kb(p) for p in bench_prepare.tree(proc.pid)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark job failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "private_mb": peak[0] / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, action="append", help="GB of text; repeat for several (default: 1 and 4)")
    parser.add_argument("--kinds", nargs="+", default=["char"], choices=["char", "bpe"])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values")
    parser.add_argument(
        "--tmp",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the corpus and the shards go (deleted after)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        method = {"train_bpe": lambda: train_bpe(job["out"]), "baseline": baseline}.get(
            job.get("method", ""), lambda: worker(job)
        )
        print(json.dumps(method()))
        return

    root = Path(tempfile.mkdtemp(prefix="dist_gpt_shards_bench_", dir=args.tmp))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(root / "hf_home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    try:
        bpe_file = root / "bpe_tokenizer.json"
        if "bpe" in args.kinds:
            run_child({"method": "train_bpe", "out": str(bpe_file)}, env)
        from dist_gpt.hardware import cpu_info  # here: the measured children import dist_gpt, the parent need not

        print(
            f"# streaming sharded prepare, {time.strftime('%Y-%m-%d')}; {cpu_info().describe()}, {os.cpu_count()} CPUs; Python {sys.version.split()[0]}\n",
            flush=True,
        )
        print(
            "| text GB | files | tokenizer | num_proc | shards | peak private MB | peak RSS MB | seconds | MB/s | load avg start / end | same count |"
        )
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
        r = run_child({"method": "baseline"}, env)
        print(
            f"| 0 | - | (the imports alone) | - | - | {r['private_mb']:.0f} | {r['rss_mb']:.0f} | - | - | - | - |",
            flush=True,
        )
        for gb in args.gb or [1, 4]:
            corpus = root / f"corpus_{gb:g}"
            corpus.mkdir()
            info = write_corpus(gb, corpus)
            for kind in args.kinds:
                for num_proc in args.num_proc:
                    out = root / "data"
                    job = {
                        "kind": kind,
                        "num_proc": num_proc,
                        "source": f"{corpus}/*.jsonl",
                        "out": str(out),
                        "copies": info["copies"],
                        "chars": info["chars"],
                    }
                    job["tokenizer"] = str(bpe_file) if kind == "bpe" else None
                    load0 = os.getloadavg()[0]
                    r = run_child(job, env)
                    load1 = os.getloadavg()[0]
                    shutil.rmtree(out, ignore_errors=True)
                    same = "yes" if r["tokens"] == expected_tokens(job) else f"NO ({r['tokens']:,})"
                    mb = info["bytes"] / 1e6
                    print(
                        f"| {info['bytes'] / 1e9:.2f} | {info['files']} | {kind} | {num_proc} | {r['shards']} | {r['private_mb']:.0f} | {r['rss_mb']:.0f} "
                        f"| {r['seconds']:.0f} | {mb / r['seconds']:.1f} | {load0:.1f} / {load1:.1f} | {same} |",
                        flush=True,
                    )
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
