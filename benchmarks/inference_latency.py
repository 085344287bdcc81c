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
    python benchmarks/run.py --only inference_latency      # the same, as part of the suite
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import RESULTS_DIR, ForeignCpu, cores, load_average, ratio, result_payload, timings_ms, untrained_params  # noqa: E402

common.quiet_environment()

MODELS = ("unet", "umobilenetv2")
TFLITE_VARIANTS = ("none", "float16", "dynamic")

log = functools.partial(common.log, who="latency")


def build(name: str, size: int):
    import keras

    from tumorseg.models import build_model

    keras.backend.clear_session()
    return build_model(name, (size, size, 1), **untrained_params(name))


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
        ms_b1 = timings_ms(lambda run=run: run(x1), warmup=warmup, repeats=repeats)["median_ms"]
        ms_b8 = (
            timings_ms(lambda run=run: run(x8), warmup=max(1, warmup // 2), repeats=max(1, repeats // 2))["median_ms"]
            if label != "naive model.predict per image"
            else None
        )
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
        f"median of {payload['repeats']} runs, {payload['machine']['date'][:10]}; "
        f"other processes used {100 * (payload['foreign_cpu_fraction'] or 0):.0f}% of the CPU meanwhile"
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
    lines.append(
        f"Produced by `python benchmarks/inference_latency.py{' --quick' if payload['quick'] else ''}`; untrained models (latency does not depend on weights)."
    )
    return "\n".join(lines) + "\n"


def latency_benchmark(*, quick: bool, size: int = 256, models: tuple[str, ...] = MODELS, repeats: int | None = None, warmup: int = 3) -> dict[str, Any]:
    """The result body (rows, a table, ratios vs the naive loop); :func:`common.result_payload` adds the machine."""
    from tumorseg.runtime import configure_runtime

    repeats = repeats or (3 if quick else 20)
    warmup = 1 if quick else warmup
    configure_runtime(seed=0, threads=0, deterministic=False)  # all cores, as in training and tumorseg predict
    rows = []
    with tempfile.TemporaryDirectory(prefix="tumorseg-latency-") as scratch:
        for name in models:
            rows += measure(name, size, warmup=warmup, repeats=repeats, scratch=Path(scratch))
    ratios = []
    for name in models:
        mine = {r["runtime"]: r for r in rows if r["model"] == name}
        naive = mine["naive model.predict per image"]["ms_per_image_batch1"]
        for runtime in ("Keras predict_on_batch", "TFLite float32", "ONNX Runtime float32"):
            ratios.append(ratio(f"{name}: {runtime} vs naive model.predict, batch 1 speed-up", naive / mine[runtime]["ms_per_image_batch1"], target=2.0))
    columns = ["model", "runtime", "ms/image (batch 1)", "images/s (batch 8)", "file MB", "max |diff| vs Keras"]
    table_rows = [[r["model"], r["runtime"], r["ms_per_image_batch1"], r["images_per_s_batch8"], r["file_mb"], r["max_abs_difference_vs_keras"]] for r in rows]
    return {
        "size": size,
        "models": list(models),
        "repeats": repeats,
        "warmup": warmup,
        "reference": "the naive per-image `model.predict(x)` loop (what a user writes first)",
        "rows": rows,
        "table": {"columns": columns, "rows": table_rows},
        "ratios": ratios,
        "notes": [
            "ms/image at batch 1 = median wall time of one call on one image; images/s at batch 8 = 8 / median time of one 8-image call",
            "untrained models at the default config (umobilenetv2 with encoder_weights none): latency does not depend on the weights",
            "TFLite runs with num_threads = cores; ONNX Runtime with its default (all cores); Keras with the training thread settings",
        ],
    }


def write_extra(payload: dict[str, Any], results: Path) -> Path:
    """The README's latency table, beside the JSON (``benchmarks/run.py`` calls this too)."""
    from tumorseg.io import atomic_write_text

    return atomic_write_text(Path(results) / "inference_latency.md", markdown(payload))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="input side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per runtime (default: 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="few repeats: checks the script works; timings are rough")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output folder: inference_latency.json and .md (default: %(default)s)")
    args = parser.parse_args(argv)

    from tumorseg.io import atomic_write_json

    load_start, started = load_average(), time.perf_counter()
    with ForeignCpu() as foreign:
        body = latency_benchmark(quick=args.quick, size=args.size, models=tuple(args.models), repeats=args.repeats, warmup=args.warmup)
    payload = result_payload("inference_latency", quick=args.quick, started=started, load_start=load_start, body=body, foreign=foreign)
    out = atomic_write_json(Path(args.results) / "inference_latency.json", payload)
    log(f"wrote {out} and {write_extra(payload, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
