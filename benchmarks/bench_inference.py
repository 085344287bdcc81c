"""Inference images/s: compiled forward passes (and ``tumorseg.inference.Predictor``) vs a naive loop.

The reference is what a user writes first: ``model.predict(image[None])`` once per image.
``model.predict`` builds a data pipeline and a progress callback on every call, which costs more
than the model itself on small inputs. Ours: ``predict_on_batch`` and a ``tf.function`` forward
pass at batch 1 and 8, and the project's ``Predictor`` (which adds the uint8 -> float32 batch
assembly and thresholding a user gets from ``tumorseg predict``). Achieved GFLOP/s (FLOPs from
``tumorseg.models.count_flops``) is put beside a large float32 matmul's GFLOP/s on this machine,
the practical peak for convolutions lowered to matrix products.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cores, log, ratio, timings_ms, untrained_params

NAIVE_TARGET = 2.0


def matmul_gflops(n: int, repeats: int = 5) -> dict[str, Any]:
    """float32 ``n x n`` matmul GFLOP/s (median of ``repeats`` after one warm-up)."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32, seed=1)
    b = tf.random.normal((n, n), dtype=tf.float32, seed=2)
    step = tf.function(lambda: tf.linalg.matmul(a, b)[0, 0])  # a scalar back: no 16 MB copy timed
    seconds = timings_ms(lambda: step().numpy(), warmup=1, repeats=repeats)["median_ms"] / 1000.0
    return {"n": n, "seconds": round(seconds, 4), "gflops": round(2 * n**3 / seconds / 1e9, 1)}


def _images_per_s(run_all, n_images: int, repeats: int) -> float:
    run_all()  # warm-up: traces graphs, allocates buffers
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_all()
        rates.append(n_images / (time.perf_counter() - started))
    return float(sorted(rates)[len(rates) // 2])


def measure_model(model, *, n_images: int, repeats: int) -> dict[str, float]:
    """images/s of each path on the same random images (``n_images`` a multiple of 8)."""
    import numpy as np
    import tensorflow as tf

    from tumorseg.inference import Predictor

    size = model.input_shape[1]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n_images, size, size), dtype=np.uint8)
    x = pixels.astype("float32")[..., None]
    forward = tf.function(lambda t: model(t, training=False), reduce_retracing=True)

    def batches(b: int):
        return [x[i : i + b] for i in range(0, n_images, b)]

    b1, b8 = batches(1), batches(8)
    t1, t8 = [tf.constant(v) for v in b1], [tf.constant(v) for v in b8]
    images = list(pixels)
    paths = {
        "naive model.predict per image": lambda: [model.predict(v, verbose=0) for v in b1],
        "predict_on_batch, batch 1": lambda: [model.predict_on_batch(v) for v in b1],
        "predict_on_batch, batch 8": lambda: [model.predict_on_batch(v) for v in b8],
        "tf.function forward, batch 1": lambda: [forward(v).numpy() for v in t1],
        "tf.function forward, batch 8": lambda: [forward(v).numpy() for v in t8],
        "Predictor, batch 1": lambda: Predictor(model, batch_size=1).predict(images),
        "Predictor, batch 8": lambda: Predictor(model, batch_size=8).predict(images),
    }
    return {label: round(_images_per_s(fn, n_images, repeats), 2) for label, fn in paths.items()}


def _latency_results(path: Path) -> dict[str, Any]:
    """Merge the result of the ``inference_latency`` benchmark (Keras vs TFLite vs ONNX Runtime),
    which ``benchmarks/run.py`` runs as its own benchmark: measuring it here again would only
    duplicate it (and the old subprocess call passed an option the script does not have).

    It measures runtimes this module does not (exported TFLite/ONNX files); this module adds the
    compiled-function and Predictor paths and the share of the machine's matmul peak.
    """
    if not path.is_file():
        return {"file": path.name, "missing": True, "how": "python benchmarks/run.py inference_latency"}
    latency = json.loads(path.read_text())
    return {"file": path.name, "size": latency.get("size"), "repeats": latency.get("repeats"), "rows": latency["rows"]}


def _latency_ratios(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model: the fastest exported runtime at batch 1 vs Keras predict_on_batch at batch 1."""
    out = []
    rows = merged.get("rows", [])
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["runtime"]: r["ms_per_image_batch1"] for r in rows if r["model"] == model}
        keras_ms = mine.get("Keras predict_on_batch")
        exported = {k: v for k, v in mine.items() if k.startswith(("TFLite", "ONNX"))}
        if keras_ms and exported:
            best = min(exported, key=exported.get)
            out.append(
                ratio(
                    f"latency {merged.get('size')}², {model}: Keras predict_on_batch ms / {best} ms, batch 1 (>1 = exported faster)",
                    keras_ms / exported[best],
                )
            )
    return out


def inference_benchmark(
    *,
    quick: bool,
    size: int | None = None,
    n_images: int | None = None,
    repeats: int | None = None,
    models: dict[str, dict] | None = None,
    matmul_n: int | None = None,
    latency_script: bool = True,
    results: Path | None = None,
) -> dict[str, Any]:
    """``results``: where inference_latency.py writes its own JSON (default benchmarks/results)."""
    import keras

    from tumorseg.config import Config
    from tumorseg.models import build_model, count_flops
    from tumorseg.runtime import configure_runtime

    cfg = Config()
    size = size or (128 if quick else 256)
    n_images = n_images or 16
    repeats = repeats or (1 if quick else 3)
    models = models if models is not None else {"unet": {}, "umobilenetv2": {}}
    # Same thread pools as training; op determinism is a training setting (inference does not set it).
    configure_runtime(seed=cfg.seed, threads=cfg.train.threads, deterministic=False)
    peak = matmul_gflops(matmul_n or (1024 if quick else 2048))
    log(f"inference: float32 matmul {peak['n']}² -> {peak['gflops']} GFLOP/s")

    rows, ratios = [], []
    for name, overrides in models.items():
        keras.backend.clear_session()
        model = build_model(name, (size, size, 1), **untrained_params(name, overrides, cfg=cfg))
        flops = count_flops(model)
        log(f"inference: {name} at {size}², {n_images} images x {repeats} repeats per path")
        rates = measure_model(model, n_images=n_images, repeats=repeats)
        naive = rates["naive model.predict per image"]
        for label, rate in rates.items():
            gflops = flops * rate / 1e9
            rows.append(
                {
                    "model": name,
                    "path": label,
                    "images_per_s": rate,
                    "speedup_vs_naive": round(rate / naive, 2),
                    "achieved_gflops": float(f"{gflops:.4g}"),
                    "percent_of_matmul_peak": float(f"{100 * gflops / peak['gflops']:.3g}"),
                }
            )
        best_b1 = max(rates["tf.function forward, batch 1"], rates["predict_on_batch, batch 1"])
        best_b8 = max(rates["tf.function forward, batch 8"], rates["predict_on_batch, batch 8"])
        ratios.append(ratio(f"inference {size}², {name}: best batch-1 path / naive predict loop", best_b1 / naive, target=NAIVE_TARGET))
        ratios.append(ratio(f"inference {size}², {name}: best batch-8 path / naive predict loop", best_b8 / naive, target=NAIVE_TARGET))
        ratios.append(ratio(f"inference {size}², {name}: Predictor batch 8 / naive predict loop", rates["Predictor, batch 8"] / naive, target=NAIVE_TARGET))
        ratios.append(ratio(f"inference {size}², {name}: % of matmul peak (best path)", 100 * flops * max(rates.values()) / 1e9 / peak["gflops"]))
        rows[-len(rates)]["gflops_per_image"] = float(f"{flops / 1e9:.4g}")
    body: dict[str, Any] = {
        "reference": "naive loop: model.predict(image[None]) once per image",
        "size": size,
        "images_per_path": n_images,
        "repeats": repeats,
        "threads": {"intra_op": cfg.train.threads or cores(), "inter_op": 2},
        "matmul_peak": peak,
        "flops_convention": "2 FLOPs per multiply-add of conv/dense layers (tumorseg.models.count_flops)",
        "rows": rows,
        "table": {
            "columns": ["model", "path", "images/s", "x naive", "GFLOP/s", "% of matmul peak"],
            "rows": [[r["model"], r["path"], r["images_per_s"], r["speedup_vs_naive"], r["achieved_gflops"], r["percent_of_matmul_peak"]] for r in rows],
        },
        "ratios": ratios,
        "notes": [f"hardware peak = float32 {peak['n']}x{peak['n']} tf.linalg.matmul: {peak['gflops']} GFLOP/s on {cores()} cores"],
    }
    if latency_script:
        merged = _latency_results((results or RESULTS_DIR) / "inference_latency.json")
        body["latency_script"] = merged
        body["ratios"] += _latency_ratios(merged)
        if merged.get("rows"):
            body["table_latency"] = {
                "columns": ["model", "runtime", "ms/image (batch 1)", "images/s (batch 8)", "file MB"],
                "rows": [[r["model"], r["runtime"], r["ms_per_image_batch1"], r["images_per_s_batch8"], r["file_mb"]] for r in merged["rows"]],
            }
            body["notes"].append(f"exported runtimes (TFLite, ONNX Runtime) from benchmarks/inference_latency.py ({merged['command']}): see {merged['file']}")
        else:
            body["notes"].append(f"benchmarks/inference_latency.py failed (exit code {merged['exit_code']}): {merged.get('stderr_tail', '')[-300:]}")
    return body
