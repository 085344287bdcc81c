"""Inference latency on this CPU: ms/image at batch 1 and images/s at batch 8, per runtime.

Both models are built untrained at their default config (``umobilenetv2`` with
``encoder_weights: none``): latency does not depend on the weights. Runtimes compared on the
same random 0..255 inputs:

* Keras ``model(x, training=False)`` (eager call) and ``model.predict_on_batch`` (compiled graph);
* the naive ``model.predict(x)`` once per image (what a user writes first);
* TFLite float32, float16 weights and dynamic-range (int8 weights), converted by ``tumorseg.export``;
* ONNX Runtime float32 (``tf2onnx``), CPU execution provider.

Writes ``benchmarks/results/inference_latency.json`` (with the machine, versions and the load
average and the CPU share other processes used meanwhile: a number taken on a busy machine is marked as such) and a markdown
table ``benchmarks/results/inference_latency.md``.

    python benchmarks/inference_latency.py                 # full: 256x256, 20 repeats
    python benchmarks/inference_latency.py --quick         # a smoke run: few repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ForeignCpu, load_average, machine_info, not_quiet_note  # noqa: E402

MODELS = ("unet", "umobilenetv2")
TFLITE_VARIANTS = ("none", "float16", "dynamic")


def median_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(1000.0 * (time.perf_counter() - started))
    return statistics.median(samples)


def build(name: str, size: int):
    import keras

    from tumorseg.config import Config
    from tumorseg.models import build_model

    params = getattr(Config().models, name).model_dump()
    if name == "umobilenetv2":
        params["encoder_weights"] = "none"
    keras.backend.clear_session()
    return build_model(name, (size, size, 1), **params)


def measure(name: str, size: int, *, warmup: int, repeats: int, scratch: Path) -> list[dict[str, Any]]:
    """One row per runtime: ms/image at batch 1, images/s at batch 8, file size where exported."""
    import numpy as np

    from tumorseg.export import to_onnx, to_tflite
    from tumorseg.inference import OnnxBackend, TFLiteBackend

    model = build(name, size)
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, size, size, 1)).astype(np.float32)
    x8 = rng.integers(0, 256, (8, size, size, 1)).astype(np.float32)
    keras_file = scratch / f"{name}.keras"
    model.save(keras_file)

    runtimes: dict[str, tuple[Callable[[np.ndarray], Any], int | None]] = {
        "Keras model(x, training=False)": (lambda x: model(x, training=False).numpy(), keras_file.stat().st_size),
        "Keras predict_on_batch": (model.predict_on_batch, keras_file.stat().st_size),
        "naive model.predict per image": (lambda x: model.predict(x, verbose=0), keras_file.stat().st_size),
    }
    for quantize in TFLITE_VARIANTS:
        path = scratch / f"{name}-{quantize}.tflite"
        started = time.perf_counter()
        path.write_bytes(to_tflite(model, quantize))
        log(f"{name}: TFLite {quantize} converted in {time.perf_counter() - started:.0f} s")
        runtimes[f"TFLite {'float32' if quantize == 'none' else quantize}"] = (TFLiteBackend(path, num_threads=cores()), path.stat().st_size)
    path = scratch / f"{name}.onnx"
    started = time.perf_counter()
    path.write_bytes(to_onnx(model))
    log(f"{name}: ONNX converted in {time.perf_counter() - started:.0f} s")
    runtimes["ONNX Runtime float32"] = (OnnxBackend(path), path.stat().st_size)

    reference = model.predict_on_batch(x1)
    rows = []
    for label, (run, size_bytes) in runtimes.items():
        difference = float(np.abs(np.asarray(run(x1)) - reference).max())
        ms_b1 = median_ms(lambda run=run: run(x1), warmup=warmup, repeats=repeats)
        ms_b8 = median_ms(lambda run=run: run(x8), warmup=max(1, warmup // 2), repeats=max(1, repeats // 2)) if label != "naive model.predict per image" else None
        row = {
            "model": name,
            "runtime": label,
            "ms_per_image_batch1": round(ms_b1, 2),
            "images_per_s_batch8": round(8000.0 / ms_b8, 2) if ms_b8 else None,
            "file_mb": round(size_bytes / 2**20, 2) if size_bytes else None,
            "max_abs_difference_vs_keras": difference,
        }
        rows.append(row)
        log(f"{name}: {label}: {row['ms_per_image_batch1']} ms/image (batch 1), {row['images_per_s_batch8']} images/s (batch 8)")
    return rows


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    models = payload["models"]
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    cell = {(r["model"], r["runtime"]): r for r in rows}
    head = ["runtime"] + [f"{m} ms/image (b1)" for m in models] + [f"{m} images/s (b8)" for m in models] + [f"{m} file MB" for m in models]
    lines = [
        f"Inference latency at {payload['size']}x{payload['size']}, {payload['machine']['cores']} cores ({payload['machine']['cpu_model']}), "
        f"median of {payload['repeats']} runs; other processes used {100 * (payload['foreign_cpu_fraction'] or 0):.0f}% of the CPU meanwhile"
        + ("" if payload["quiet_machine"] else " — **busy machine: not a valid timing, re-run on a quiet one**"),
        "",
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
    ]
    for runtime in runtimes:
        values = [runtime]
        for key in ("ms_per_image_batch1", "images_per_s_batch8", "file_mb"):
            for model in models:
                value = cell.get((model, runtime), {}).get(key)
                values.append("–" if value is None else f"{value:g}")
        lines.append("| " + " | ".join(values) + " |")
    lines.append("")
    lines.append(f"Produced by `python benchmarks/inference_latency.py{' --quick' if payload['quick'] else ''}`; untrained models (latency does not depend on weights).")
    return "\n".join(lines) + "\n"


def log(message: str) -> None:
    print(f"[latency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="input side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per runtime (default: 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="few repeats: checks the script works; timings are rough")
    parser.add_argument("--out", default=str(RESULTS_DIR / "inference_latency.json"), help="result JSON (the .md goes beside it)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else args.warmup

    from tumorseg.io import atomic_write_json, atomic_write_text
    from tumorseg.training import configure_runtime

    load_start = load_average()
    started = time.perf_counter()
    configure_runtime(seed=0, threads=0, deterministic=False)  # all cores, as in training and tumorseg predict
    rows = []
    with tempfile.TemporaryDirectory(prefix="tumorseg-latency-") as scratch, ForeignCpu() as foreign:
        for name in args.models:
            rows += measure(name, args.size, warmup=warmup, repeats=repeats, scratch=Path(scratch))
    load_end = load_average()
    payload = {
        "benchmark": "inference_latency",
        "quick": args.quick,
        "size": args.size,
        "models": args.models,
        "repeats": repeats,
        "warmup": warmup,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "foreign_cpu_fraction": foreign.fraction,
        "quiet_machine": foreign.quiet,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info() | {"load_avg_start": load_start, "load_avg_end": load_end},
        "rows": rows,
        "notes": [
            "ms/image at batch 1 = median wall time of one call on one image; images/s at batch 8 = 8 / median time of one 8-image call",
            "untrained models at the default config (umobilenetv2 with encoder_weights none): latency does not depend on the weights",
            "TFLite runs with num_threads = cores; ONNX Runtime with its default (all cores); Keras with the training thread settings",
        ],
    }
    if not payload["quiet_machine"]:
        payload["notes"].append(not_quiet_note(load_start[0], load_end[0], foreign))
    out = Path(args.out)
    atomic_write_json(out, payload)
    atomic_write_text(out.with_suffix(".md"), markdown(payload))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
