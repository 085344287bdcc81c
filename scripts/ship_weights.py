"""Copy a trained model into ``weights/`` for shipping: optimizer state stripped (a third of the
size) as training publishes ``models/``, loaded back and checked to predict identically, then
``weights/SHA256SUMS`` rewritten.

    python scripts/ship_weights.py models/umobilenetv2.keras weights/umobilenetv2-figshare.keras

The model card (weights/MODEL_CARD.md) is written by hand from metrics/evaluate_<model>.json.
Replace shipped files only when test Dice improves by >= 0.01 (keeps the git history small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

MAX_BYTES = 25 * 1024 * 1024


def write_checksums(folder: Path) -> Path:
    from tumorseg.io import atomic_write_text, sha256_file

    lines = [f"{sha256_file(path)}  {path.name}\n" for path in sorted(folder.glob("*.keras"))]
    target = folder / "SHA256SUMS"
    atomic_write_text(target, "".join(lines))
    return target


def ship(source: Path, target: Path) -> None:
    from tumorseg.inference import open_keras_model
    from tumorseg.io import atomic_write_bytes
    from tumorseg.models import inference_model
    from tumorseg.resume import publish_without_optimizer

    model = inference_model(open_keras_model(source))  # what the shipped file must reproduce
    with tempfile.TemporaryDirectory() as scratch:
        stripped = Path(scratch) / target.name
        publish_without_optimizer(source, stripped)  # as training publishes models/: no optimizer state, no deep-supervision heads
        reloaded = open_keras_model(stripped)
        size = model.input_shape[1]
        probe = np.random.default_rng(0).integers(0, 256, (2, size, size, 1)).astype("float32")
        difference = float(np.abs(model.predict(probe, verbose=0) - reloaded.predict(probe, verbose=0)).max())
        if difference > 1e-6:
            raise SystemExit(f"reloaded model differs from {source} by {difference}")
        if stripped.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{target.name} would be {stripped.stat().st_size / 2**20:.1f} MB (> 25 MB)")
        atomic_write_bytes(target, stripped.read_bytes())
    print(f"{source} -> {target} ({target.stat().st_size / 2**20:.1f} MB, {model.count_params():,} params)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="trained .keras file (e.g. models/umobilenetv2.keras)")
    parser.add_argument("target", type=Path, help="weights/<name>.keras")
    args = parser.parse_args()
    ship(args.source, args.target)  # the atomic write makes the target's folder
    print(f"checksums -> {write_checksums(args.target.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
