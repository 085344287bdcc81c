"""Prepare-stage throughput: pairs/s on N synthetic pairs, all cores vs a single process.

    python benchmarks/prepare_throughput.py [--count 3000] [--size 512] [--out-size 256]

Writes benchmarks/results/prepare_throughput.json. The synthetic inputs are generated once into a
temporary folder (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tumorseg.data.prepare import prepare_dataset
from tumorseg.processes import default_workers
from tumorseg.data.synthetic import write_synthetic_dataset
from tumorseg.io import atomic_write_json


def time_prepare(root: Path, out: Path, size: int, workers: int) -> float:
    started = time.perf_counter()
    report = prepare_dataset(root / "images", root / "masks", out, size=size, workers=workers, progress=False)
    elapsed = time.perf_counter() - started
    return report.valid_pairs / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out-size", type=int, default=256)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "prepare_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "synthetic"
        write_synthetic_dataset(root, count=args.count, size=args.size, seed=0, progress=sys.stderr.isatty())
        cores = default_workers()
        parallel = time_prepare(root, Path(scratch) / "parallel", args.out_size, cores)
        single = time_prepare(root, Path(scratch) / "single", args.out_size, 1)
    result = {
        "benchmark": "prepare_throughput",
        "data": f"synthetic phantoms, {args.count} pairs at {args.size}x{args.size} -> {args.out_size}",
        "cores": cores,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "pairs_per_s_all_cores": round(parallel, 1),
        "pairs_per_s_one_process": round(single, 1),
        "speedup": round(parallel / single, 2),
    }
    atomic_write_json(args.results, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
