"""Training ms/step: our two models vs segmentation-models' ``Unet('mobilenetv2')``.

Ours: the default config (``tumorseg.config.Config()``; umobilenetv2 with ``encoder_weights=none``),
runtime set up by ``configure_runtime`` and compiled by ``compile_for_training`` — the very calls
``train_model`` makes (reference loss BCE + Dice + Tversky, seven metrics, Adam). The peer:
``sm.Unet('mobilenetv2', encoder_weights=None)`` with the peer's own ``bce_dice_loss`` (BCE + Dice)
and its four metrics (IoU, F1, precision, recall), Adam, in benchmarks/.venv-peer (created on
first use: segmentation-models needs tf-keras, which cannot share this project's Keras 3 venv).
Both: the same TensorFlow version, intra/inter-op threads, op determinism and random input
(step time does not depend on content); ``train_on_batch`` on batch 8; warm-up steps excluded;
median of the timed steps.

Ours is also timed with Keras 3's own (unfused) BatchNormalization at 128²
(``train.fused_batch_norm: false``) in the same process, in turn with the default (fused)
rows, so the saving of tumorseg.models.fused_norm is measured beside the peer. Goal (issue 25):
UMobileNetV2's step at 128² <= 0.75x the peer's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from common import PROJECT_ROOT, cores, env_for_subprocess, log, ratio, sample_ms, summarise_ms, untrained_params

PEER_VENV = PROJECT_ROOT / "benchmarks" / ".venv-peer"
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_train_step.py"
PEER_ENV = {"SM_FRAMEWORK": "tf.keras", "TF_USE_LEGACY_KERAS": "1"}


def tensorflow_version() -> str:
    for name in ("tensorflow-cpu", "tensorflow"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("TensorFlow is not installed in this environment")


def peer_requirements() -> list[str]:
    """pyproject's ``benchmark`` extra, with TensorFlow and tf-keras pinned to our TensorFlow."""
    extra = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["benchmark"]
    tf = tensorflow_version()
    major_minor = ".".join(tf.split(".")[:2])
    pinned = {"tensorflow-cpu": f"tensorflow-cpu=={tf}", "tf-keras": f"tf-keras=={major_minor}.*"}
    names = [req.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower() for req in extra]
    return [pinned.get(name, req) for name, req in zip(names, extra)] + [p for n, p in pinned.items() if n not in names]


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """Create the peer's venv on first use; returns its python."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import segmentation_models, tf_keras"]
    if python.exists() and subprocess.run(check, env=env_for_subprocess(**PEER_ENV), capture_output=True).returncode == 0:
        return python
    requirements = peer_requirements()
    log(f"creating {venv} (one-off, a few minutes): pip install {' '.join(requirements)}")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements], check=True)
    subprocess.run(check, env=env_for_subprocess(**PEER_ENV), check=True)
    return python


def run_peer(
    sizes: list[int],
    warmups: list[int],
    steps: list[int],
    *,
    batch: int,
    threads: int,
    deterministic: bool,
    seed: int,
    lr: float,
    venv: Path = PEER_VENV,
) -> dict[str, Any]:
    python = ensure_peer_venv(venv)
    command = [
        str(python), str(PEER_SCRIPT), "--sizes", *map(str, sizes), "--warmup", *map(str, warmups), "--steps", *map(str, steps),
        "--batch", str(batch), "--threads", str(threads), "--deterministic", str(int(deterministic)), "--seed", str(seed), "--lr", str(lr),
    ]  # fmt: skip
    result = subprocess.run(command, env=env_for_subprocess(**PEER_ENV), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"the peer benchmark failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


STEP_GOAL = 0.75  # issue 25: UMobileNetV2 128² step / the peer's
UNFUSED = {"fused_batch_norm": False}


def ours(name: str, size: int, *, batch: int, overrides: dict | None = None, train_overrides: dict | None = None) -> tuple[Callable[[], Any], int]:
    """One training step of one of our models, built and compiled exactly as ``train_model`` does
    (``train_overrides``: fields of the ``train:`` section, e.g. :data:`UNFUSED`), and its
    parameter count. Models stay alive: rounds of all rows alternate."""
    import numpy as np

    from tumorseg.config import Config
    from tumorseg.models import build_model
    from tumorseg.training import compile_for_training

    cfg = Config()
    model = build_model(name, (size, size, 1), **untrained_params(name, overrides, cfg=cfg))
    train = cfg.train.model_copy(update=train_overrides or {})
    compile_for_training(model, train=train, loss=cfg.loss, learning_rate=cfg.lr * cfg.train.lr_scale, steps_per_epoch=100, stop_epoch=cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    x = rng.uniform(0, 255, (batch, size, size, 1)).astype("float32")
    y = (rng.random((batch, size, size, 1)) > 0.98).astype("float32")
    return (lambda: model.train_on_batch(x, y)), int(model.count_params())


def train_step_benchmark(
    *,
    quick: bool,
    sizes: list[int] | None = None,
    warmup: list[int] | None = None,
    steps: list[int] | None = None,
    batch: int = 8,
    models: dict[str, dict] | None = None,
    peer: bool = True,
    peer_venv: Path = PEER_VENV,
    unfused: bool = True,
    rounds: int | None = None,
) -> dict[str, Any]:
    """``models`` maps our model names to parameter overrides (tests use tiny models);
    ``unfused``: also time each model with Keras' unfused BatchNormalization at the first size.

    ``rounds`` (default 3, quick 1): every row of ours, then the peer, are timed once per round,
    so a machine whose speed drifts over minutes (measured here: +-20 % between processes) slows
    both sides alike; ours: the median of all rounds' steps, the peer: the median of its rounds'
    medians."""
    from tumorseg.config import Config
    from tumorseg.runtime import configure_runtime

    cfg = Config()
    sizes = sizes or ([128] if quick else [128, 256])
    warmup = warmup or ([2] * len(sizes) if quick else [3, 2][: len(sizes)])
    steps = steps or ([4] * len(sizes) if quick else [10, 6][: len(sizes)])
    models = models if models is not None else {"unet": {}, "umobilenetv2": {}}
    threads = cfg.train.threads or cores()
    configure_runtime(seed=cfg.seed, threads=cfg.train.threads, deterministic=cfg.train.deterministic)

    rounds = rounds or (1 if quick else 3)
    built: dict[tuple[str, int, str], tuple[Callable[[], Any], int, int, int]] = {}
    for size, w, n in zip(sizes, warmup, steps):
        for name, overrides in models.items():
            variants = [("fused BN", None), ("unfused BN", UNFUSED)] if unfused and size == sizes[0] else [("fused BN", None)]
            for batch_norm, train_overrides in variants:
                step, params = ours(name, size, batch=batch, overrides=overrides, train_overrides=train_overrides)
                built[(name, size, batch_norm)] = (step, params, w, n)
    samples: dict[tuple[str, int, str], list[float]] = {key: [] for key in built}
    peer_rounds: list[dict[str, Any]] = []
    for round_index in range(rounds):
        for (name, size, batch_norm), (step, _, w, n) in built.items():
            log(f"train_step: round {round_index + 1}/{rounds}, {name} at {size}² ({batch_norm}), {n} timed steps")
            samples[(name, size, batch_norm)] += sample_ms(step, warmup=w if round_index == 0 else 1, repeats=n)
        if peer:
            log(f"train_step: round {round_index + 1}/{rounds}, the peer (segmentation-models Unet mobilenetv2) in its own venv")
            peer_rounds.append(
                run_peer(sizes, warmup, steps, batch=batch, threads=threads, deterministic=cfg.train.deterministic, seed=cfg.seed, lr=cfg.lr, venv=peer_venv)
            )
    rows: list[dict[str, Any]] = [
        {"model": name, "side": "ours", "batch_norm": batch_norm, "size": size, **summarise_ms(samples[(name, size, batch_norm)], w), "params_total": params}
        for (name, size, batch_norm), (_, params, w, _) in built.items()
    ]
    peer_info: dict[str, Any] = peer_rounds[0] if peer_rounds else {}
    notes = [f"{rounds} round(s): each round times every row of ours, then runs the peer"]
    if peer:
        for index, first in enumerate(peer_info["rows"]):
            medians = [run["rows"][index]["median_ms"] for run in peer_rounds]
            row = {**first, "median_ms": round(statistics.median(medians), 3), "round_medians_ms": medians}
            row["n"] = sum(run["rows"][index]["n"] for run in peer_rounds)
            row["min_ms"] = min(run["rows"][index]["min_ms"] for run in peer_rounds)
            row["max_ms"] = max(run["rows"][index]["max_ms"] for run in peer_rounds)
            rows.append({"model": "sm.Unet(mobilenetv2)", "side": "peer", "batch_norm": "fused (tf.keras)", **row})
    else:
        notes.append("peer not run (peer=False)")
    for row in rows:
        row["ms_per_step_per_million_params"] = round(row["median_ms"] / (row["params_total"] / 1e6), 3)

    ratios = []
    for size in sizes:
        reference = next((r for r in rows if r["side"] == "peer" and r["size"] == size), None)
        if reference is None:
            continue
        for row in rows:
            if row["side"] == "ours" and row["size"] == size and row["batch_norm"] == "fused BN":
                goal = STEP_GOAL if (row["model"], size) == ("umobilenetv2", 128) else None
                ratios.append(
                    ratio(
                        f"train step {size}², {row['model']} / sm.Unet(mobilenetv2), ms/step (<1 = ours faster)",
                        row["median_ms"] / reference["median_ms"],
                        target=goal,
                        higher_is_better=False,
                    )
                )
                ratios.append(
                    ratio(
                        f"train step {size}², {row['model']} / peer, ms/step per M params",
                        row["ms_per_step_per_million_params"] / reference["ms_per_step_per_million_params"],
                        higher_is_better=False,
                    )
                )
    unfused_rows = {(r["model"], r["size"]): r for r in rows if r["batch_norm"] == "unfused BN"}
    for row in rows:  # what fusing saved, same process, same size
        twin = unfused_rows.get((row["model"], row["size"]))
        if row["side"] == "ours" and row["batch_norm"] == "fused BN" and twin is not None:
            what = f"train step {row['size']}², {row['model']}: fused / unfused BatchNorm, ms/step"
            ratios.append(ratio(what, row["median_ms"] / twin["median_ms"], higher_is_better=False))
    return {
        "reference": "segmentation-models Unet('mobilenetv2', encoder_weights=None), loss bce_dice_loss (BCE + Dice), "
        "metrics IoU/F1/precision/recall, Adam, tf-keras in benchmarks/.venv-peer",
        "ours_compiled_as": "tumorseg.training.compile_for_training with Config() defaults: loss BCE + Dice + Tversky, "
        "metrics dice/iou/precision/recall/specificity/accuracy/tversky, Adam; BatchNorm fused (train.fused_batch_norm) unless a row says unfused",
        "batch": batch,
        "threads": {"intra_op": threads, "inter_op": 2, "deterministic_ops": cfg.train.deterministic, "jit_compile": cfg.train.jit_compile},
        "input": "random float32 images in [0, 255] and random 0/1 masks (step time does not depend on content)",
        "peer_versions": peer_info.get("versions"),
        "rows": rows,
        "table": {
            "columns": ["model", "BatchNorm", "size", "ms/step (median)", "params", "ms/step per M params"],
            "rows": [
                [r["model"], r["batch_norm"], f"{r['size']}²", r["median_ms"], r["params_total"], r["ms_per_step_per_million_params"]]
                for r in rows
            ],
        },
        "ratios": ratios,
        "notes": notes,
    }
