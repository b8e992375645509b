"""Benchmark: peak resident memory of IP scoring does not grow with the number of training samples.

Each measurement runs in a fresh subprocess, which scores a STREAMED training set (a ``Dataset``
that draws sample ``i`` from a generator seeded with ``i`` when it is read; nothing is held in
memory) of the reference SmallCNN against 500 targets, and reports its peak resident set size
(``VmHWM`` in ``/proc/self/status``), with glibc's mmap threshold fixed at 1 MiB so that freed
tensors leave the resident set (otherwise the peak wanders with heap fragmentation, both up and
down, whatever ``n``). Two scorers: ``robust_infl.influence`` (method ``ip``, one
forward-mode pass) and ``robust_infl.distributed.sharded_influence`` writing into a chunked
on-disk store. The growth from 4,000 to 40,000 samples must stay <= 10 %.

    PYTHONPATH=. .venv/bin/python experiments/bench_memory.py [--sizes 4000 40000] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

TARGET_GROWTH = 0.10
MMAP_THRESHOLD = 1 << 20  # bytes
SCORERS = ("influence", "sharded+store")


class StreamedImages(Dataset):
    """``n`` random 1x28x28 images in [0, 1] with labels, sample ``i`` drawn from seed ``seed + i`` on read."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed + int(index))
        return torch.rand(1, 28, 28, generator=generator), int(torch.randint(0, 10, (), generator=generator))


def peak_rss_kb() -> int:
    """Peak resident set size of this process in kB (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def current_rss_kb() -> int:
    """Current resident set size of this process in kB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def measure(n: int, scorer: str, batch_size: int, threads: int) -> dict:
    """Score ``n`` streamed samples with ``scorer`` in this process; return sizes and timings."""
    import robust_infl as ri
    from robust_infl.distributed import sharded_influence
    from robust_infl.models import SmallCNN

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    generator = torch.Generator().manual_seed(1)
    target = (torch.rand(500, 1, 28, 28, generator=generator), torch.randint(0, 10, (500,), generator=generator))
    train = StreamedImages(n)
    before = current_rss_kb()
    start = time.perf_counter()
    options = dict(objective=ri.Utility(), batch_size=batch_size, progress=False)
    if scorer == "influence":
        scores = ri.influence(model, train, target, **options)
    else:
        with tempfile.TemporaryDirectory() as folder:
            scores = sharded_influence(model, train, target, store=Path(folder) / "store", **options)
    return {"n": n, "scorer": scorer, "peak_kb": peak_rss_kb(), "before_kb": before,
            "seconds": time.perf_counter() - start, "finite": bool(torch.isfinite(scores).all()), "len": len(scores)}


def main() -> None:
    """Measure each size and scorer in a fresh subprocess; print the peaks and the growth."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[4000, 40000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("N", "SCORER"), help=argparse.SUPPRESS)
    parser.add_argument("--write-results", action="store_true", help="write a section of experiments/RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(int(args.worker[0]), args.worker[1], args.batch_size, args.threads)))
        return

    root = Path(__file__).resolve().parents[1]
    runs = {}
    for scorer in SCORERS:
        for n in args.sizes:
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), scorer,
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env={
                **os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1",
                # A fixed glibc mmap threshold: large tensors are returned to the OS when freed, so
                # the peak measures live memory, not where the allocator's heap happened to grow.
                "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            })
            runs[scorer, n] = json.loads(done.stdout.strip().splitlines()[-1])
            assert runs[scorer, n]["finite"] and runs[scorer, n]["len"] == n

    small, large = args.sizes
    lines = [
        f"SmallCNN, ip (aggregate), 500 targets, streamed Dataset, batch {args.batch_size}, "
        f"{args.threads} thread(s); peak RSS (VmHWM) of a fresh process per run",
        "",
        "| scorer | n | RSS before scoring (MB) | peak RSS (MB) | seconds |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for scorer in SCORERS:
        for n in args.sizes:
            run = runs[scorer, n]
            lines.append(f"| {scorer} | {n:,} | {run['before_kb'] / 1024:.0f} | {run['peak_kb'] / 1024:.0f} | "
                         f"{run['seconds']:.1f} |")
        growth = runs[scorer, large]["peak_kb"] / runs[scorer, small]["peak_kb"] - 1
        verdicts.append(f"{scorer}: peak growth {small:,} -> {large:,} samples = {100 * growth:+.1f} % "
                        f"(target <= {100 * TARGET_GROWTH:.0f} %: {'MET' if growth <= TARGET_GROWTH else 'NOT MET'})")
    lines += [""] + verdicts
    print("\n".join(lines))
    if args.write_results:
        from experiments._results import write_section

        write_section("bench_memory", "## Memory against n (experiments/bench_memory.py)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
