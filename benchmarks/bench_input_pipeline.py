"""Does the input pipeline stall training? And how many intra-op threads pay off?

One epoch of ``model.fit`` fed by the real ``tumorseg.training.make_dataset`` pipeline (shuffle,
cast, batch, prefetch; with and without on-the-fly albumentations, ``train.online_augment``) vs the
same steps fed from a ``.cache()`` of that pipeline's batches (already in memory: the input costs
~nothing). stall = (real - cached) / real. Model: umobilenetv2 from the default config (the faster
of our two, so a stall would show most), compiled as training compiles it.

Thread sweep: training ms/step with TensorFlow intra-op threads 1 vs all cores, each in a fresh
process (the pools are fixed when TensorFlow starts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import cores, env_for_subprocess, log, ratio, untrained_params


def _phantoms(count: int, size: int, seed: int):
    import numpy as np

    from tumorseg.data.synthetic import phantom_for_index

    pairs = [phantom_for_index(seed, i, size) for i in range(1, count + 1)]
    images = np.stack([p[0] for p in pairs])[..., None]
    masks = (np.stack([p[1] for p in pairs]) > 127).astype(np.uint8)[..., None]
    return images, masks


def _epoch_seconds(model, dataset, epochs: int) -> list[float]:
    import keras

    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(dataset, epochs=epochs, verbose=0, callbacks=[Timer()], shuffle=False)
    return times[1:]  # the first epoch traces the graph: warm-up


def input_pipeline_benchmark(
    *,
    quick: bool,
    size: int | None = None,
    count: int | None = None,
    epochs: int | None = None,
    model: str = "umobilenetv2",
    overrides: dict | None = None,
    thread_sweep: bool = True,
) -> dict[str, Any]:
    import keras
    import numpy as np

    from tumorseg.config import Config
    from tumorseg.data.augment import build_augmentation
    from tumorseg.data.pairs import make_dataset
    from tumorseg.models import build_model
    from tumorseg.runtime import configure_runtime
    from tumorseg.training import compile_for_training

    cfg = Config()
    size = size or (64 if quick else 128)
    count = count or (32 if quick else 96)
    epochs = epochs or (2 if quick else 4)
    batch = cfg.batch_size
    configure_runtime(seed=cfg.seed, threads=cfg.train.threads, deterministic=cfg.train.deterministic)
    images, masks = _phantoms(count, size, cfg.seed)
    net = build_model(model, (size, size, 1), **untrained_params(model, overrides, cfg=cfg))
    steps = -(-count // batch)
    compile_for_training(net, train=cfg.train, loss=cfg.loss, learning_rate=cfg.lr, steps_per_epoch=steps, stop_epoch=epochs)

    # Warm up first: the model's first epochs ever (graph tracing, oneDNN kernel selection, memory
    # pools) are slow whatever feeds them, and would be charged to whichever input is timed first.
    net.fit(make_dataset(images, masks, batch_size=batch, shuffle=False, seed=cfg.seed).cache(), epochs=2, verbose=0)
    results: dict[str, list[float]] = {}
    for online in (False, True):
        augment = build_augmentation(cfg.augment, cfg.seed) if online else None
        real = make_dataset(images, masks, batch_size=batch, shuffle=True, seed=cfg.seed, augment=augment)
        cached = make_dataset(images, masks, batch_size=batch, shuffle=True, seed=cfg.seed, augment=augment).cache()
        for _ in cached:  # fill the cache (untimed)
            pass
        label = "online augment" if online else "no online augment"
        log(f"input_pipeline: {label}, {epochs} epochs of {steps} steps each, real then cached input")
        results[f"real, {label}"] = _epoch_seconds(net, real, epochs)
        results[f"cached, {label}"] = _epoch_seconds(net, cached, epochs)
    med = {k: round(float(np.median(v)), 3) for k, v in results.items()}
    keras.backend.clear_session()

    ratios, rows = [], []
    for label in ("no online augment", "online augment"):
        real, cached = med[f"real, {label}"], med[f"cached, {label}"]
        stall = (real - cached) / real
        rows.append([label, real, cached, round(100 * stall, 1)])
        ratios.append(ratio(f"input pipeline stall, {label}: (real - cached) / real epoch time", stall, target=0.1, higher_is_better=False))

    sweep = thread_sweep_ms(size, quick) if thread_sweep and cores() > 1 else None
    notes = []
    if sweep:
        ratios.append(
            ratio(f"train step {size}², {model}: ms/step with 1 intra-op thread / with {cores()}", sweep["1"]["median_ms"] / sweep[str(cores())]["median_ms"])
        )
    else:
        notes.append("thread sweep skipped (one core, or thread_sweep=False)")
    return {
        "reference": "the same training steps fed from a .cache() of the pipeline's batches (input costs ~nothing)",
        "model": model,
        "size": size,
        "pairs": count,
        "batch": batch,
        "steps_per_epoch": steps,
        "timed_epochs": epochs - 1,
        "epoch_seconds_median": med,
        "epoch_seconds_all": {k: [round(x, 3) for x in v] for k, v in results.items()},
        "thread_sweep": sweep,
        "table": {"columns": ["on-the-fly augmentation", "epoch s, real pipeline", "epoch s, cached", "stall %"], "rows": rows},
        "ratios": ratios,
        "notes": notes,
    }


def thread_sweep_ms(size: int, quick: bool) -> dict[str, Any]:
    """Training ms/step with 1 and with all intra-op threads, each in a fresh process."""
    sweep = {}
    for threads in sorted({1, cores()}):
        log(f"input_pipeline: thread sweep, intra-op threads = {threads}")
        command = [sys.executable, str(Path(__file__).resolve()), "--threads-child", str(threads), "--size", str(size), "--steps", str(3 if quick else 6)]
        result = subprocess.run(command, capture_output=True, text=True, env=env_for_subprocess(), timeout=1200)
        if result.returncode != 0:
            raise RuntimeError(f"thread sweep with {threads} threads failed:\n{result.stderr[-3000:]}")
        sweep[str(threads)] = json.loads(result.stdout.strip().splitlines()[-1])
    return sweep


def _threads_child(threads: int, size: int, steps: int) -> dict[str, Any]:
    from bench_train_step import ours
    from tumorseg.config import Config
    from tumorseg.runtime import configure_runtime

    cfg = Config()
    configure_runtime(seed=cfg.seed, threads=threads, deterministic=cfg.train.deterministic)
    return ours("umobilenetv2", size, batch=cfg.batch_size, warmup=2, steps=steps) | {"intra_op_threads": threads}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads-child", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(_threads_child(args.threads_child, args.size, args.steps)))
