"""Dense indexing at scale: peak memory of a build, and a killed build resumed.

    .venv/bin/python benchmarks/index_scale.py                      # 200k passages, Flat
    .venv/bin/python benchmarks/index_scale.py --factory IVF1024,PQ32 --passages 200000

Builds the `dpr` index (tiny random encoder, 32 dimensions) of a synthetic corpus three
times, each in a fresh process:

1. uninterrupted, in folder `whole/`, measuring the process's peak RSS during the build
   (VmHWM, reset just before) against its RSS before it;
2. in folder `resumed/`, SIGKILLed by itself once half the rows are encoded;
3. again in `resumed/`: the build resumes from its progress file.

It prints the peak RSS growth next to the vector file's size (the acceptance bound is
vector file + 300 MB), the rows each run encoded, and whether `resumed/` holds byte for byte
the files of `whole/`. Exits 1 when either check fails. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

#: words the tiny random encoder's vocabulary holds whole (quick to tokenize)
VOCABULARY = (
    "the of and to in is was for on as with by at from that which it an be are this or his "
    "her their its has had have who what when where how why not but also one two first new "
    "after city year years state capital river country world war time part"
)
WORDS = VOCABULARY.split(" ")
BOUND = 300 * 2**20


def corpus(size: int):
    import numpy as np

    from latentrag.core.types import Corpus, Passage

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 24, size=size)
    words = rng.integers(0, len(WORDS), size=int(lengths.sum()))
    passages, at = [], 0
    for i, length in enumerate(lengths):
        text = " ".join(WORDS[w] for w in words[at : at + length])
        passages.append(Passage(f"d{i}", f"{text} {i}"))
        at += length
    return Corpus(passages)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    """One build in this process; prints a JSON line with what it measured."""
    import faiss
    import torch

    from latentrag.plugins.dpr import DPRConfig
    from latentrag.plugins.dpr.retriever import DPRRetriever

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    passages = corpus(args.passages)
    options = {"index_factory": args.factory} if args.factory else {}
    config = DPRConfig(
        model="tiny-random", index_dir=args.dir, encode_chunk=args.chunk, batch_size=256, **options
    )
    retriever = DPRRetriever(config)
    encoded: list[int] = []

    def on_chunk(done: int) -> None:
        encoded.append(done)
        if args.kill_at and done >= args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    retriever.on_chunk = on_chunk
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    retriever.index(passages)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    first = encoded[0] - args.chunk if encoded else None
    result = {"rss_before": before, "peak": peak, "seconds": seconds, "resumed_from": first}
    print(json.dumps(result))


def _run(args: argparse.Namespace, folder: Path, kill_at: int = 0) -> dict | None:
    command = [
        sys.executable, __file__, "--worker", "--dir", str(folder), "--passages",
        str(args.passages), "--chunk", str(args.chunk), "--threads", str(args.threads),
        "--kill-at", str(kill_at),
    ]  # fmt: skip
    if args.factory:
        command += ["--factory", args.factory]
    done = subprocess.run(command, capture_output=True, text=True)
    if kill_at:
        assert done.returncode == -signal.SIGKILL, done.stderr
        return None
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _digests(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=200_000)
    parser.add_argument("--factory", default=None, help="faiss factory string (default Flat)")
    parser.add_argument("--chunk", type=int, default=8192, help="passages per resumable chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for the indexes (default: temp)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="index-scale-"))
    whole = _run(args, out / "whole")
    half = (args.passages // 2 // args.chunk + 1) * args.chunk
    _run(args, out / "resumed", kill_at=half)
    resumed = _run(args, out / "resumed")
    vector_file = out / "whole" / ("index.faiss" if not args.factory else "vectors.f32")
    size = vector_file.stat().st_size
    growth = whole["peak"] - whole["rss_before"]
    same = _digests(out / "whole") == _digests(out / "resumed")
    mib = 2**20
    print(f"passages {args.passages}, index {args.factory or 'Flat'}, chunk {args.chunk}")
    print(f"uninterrupted build: {whole['seconds']:.1f} s")
    print(
        f"peak RSS growth {growth / mib:.1f} MiB; vector file {size / mib:.1f} MiB; "
        f"bound {(size + BOUND) / mib:.1f} MiB: {'ok' if growth < size + BOUND else 'EXCEEDED'}"
    )
    print(
        f"killed after {half} rows; resumed from row {resumed['resumed_from']} "
        f"({resumed['seconds']:.1f} s); files identical to the uninterrupted build: {same}"
    )
    return 0 if same and growth < size + BOUND else 1


if __name__ == "__main__":
    raise SystemExit(main())
