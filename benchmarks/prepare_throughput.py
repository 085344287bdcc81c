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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import prepare_rate, synthetic_pairs  # noqa: E402 - the suite's prepare benchmark, timed the same way
from common import RESULTS_DIR, cores  # noqa: E402
from tumorseg.io import atomic_write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out-size", type=int, default=256)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "prepare_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        images, masks = synthetic_pairs(Path(scratch) / "synthetic", args.count, args.size, progress=sys.stderr.isatty())
        workers = cores()
        parallel = prepare_rate(images, masks, Path(scratch) / "parallel", args.out_size, workers)
        single = prepare_rate(images, masks, Path(scratch) / "single", args.out_size, 1)
    result = {
        "benchmark": "prepare_throughput",
        "data": f"synthetic phantoms, {args.count} pairs at {args.size}x{args.size} -> {args.out_size}",
        "cores": workers,
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
