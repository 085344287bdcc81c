"""The peer's training step: segmentation-models ``Unet('mobilenetv2', encoder_weights=None)``.

Runs inside benchmarks/.venv-peer (segmentation-models needs tf-keras, i.e. Keras 2, which cannot
share a venv with this project's Keras 3), started by bench_train_step.py with
``SM_FRAMEWORK=tf.keras TF_USE_LEGACY_KERAS=1``. Imports nothing from tumorseg (only the
standard-library timing of benchmarks/common.py). Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timings_ms  # noqa: E402 - stdlib only: importable from the peer's venv

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, nargs="+", required=True, help="per size")
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="per size")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--inter-op", type=int, default=2)
    parser.add_argument("--deterministic", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    tf.keras.utils.set_random_seed(args.seed)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    import segmentation_models as sm

    rows = []
    for size, warmup, steps in zip(args.sizes, args.warmup, args.steps):
        tf.keras.backend.clear_session()
        model = sm.Unet("mobilenetv2", encoder_weights=None, input_shape=(size, size, 1), classes=1, activation="sigmoid")
        model.compile(
            optimizer=tf.keras.optimizers.Adam(args.lr),
            loss=sm.losses.bce_dice_loss,
            metrics=[sm.metrics.iou_score, sm.metrics.f1_score, sm.metrics.precision, sm.metrics.recall],
        )
        rng = np.random.default_rng(args.seed)
        x = rng.uniform(0, 255, (args.batch, size, size, 1)).astype("float32")
        y = (rng.random((args.batch, size, size, 1)) > 0.98).astype("float32")
        timing = timings_ms(lambda model=model, x=x, y=y: model.train_on_batch(x, y), warmup=warmup, repeats=steps)
        rows.append({"size": size, **timing, "params_total": int(model.count_params())})
        print(f"peer {size}: {rows[-1]['median_ms']:.0f} ms/step", file=sys.stderr, flush=True)
    from importlib.metadata import version

    versions = {"tensorflow": tf.__version__, "tf_keras": version("tf-keras"), "segmentation_models": sm.__version__}
    print(json.dumps({"rows": rows, "versions": versions, "threads": args.threads, "deterministic": bool(args.deterministic)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
