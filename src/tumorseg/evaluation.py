"""Evaluate trained models on the untouched test split, and compare them.

The headline is the per-image mean (every slice weighs the same, so small tumours count); the
pooled "global" Dice is reported beside it. Every output states the data it was measured on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.augment import frame_tile, overlay_outline
from tumorseg.io import atomic_write_json, atomic_write_png, atomic_write_text
from tumorseg.metrics import SCORE_NAMES, evaluate_masks
from tumorseg.training import load_pairs

log = logging.getLogger(__name__)

# The reference work's reported test results (Hybrid U-Net + MobileNetV2; random image-level split,
# ImageNet encoder): context for our numbers, not a like-for-like comparison.
REFERENCE_RESULTS = {
    "unet": {"dice": 0.7556},
    "umobilenetv2": {"dice": 0.8249, "accuracy": 0.9946, "loss": 0.1489},
}


@dataclass
class Predictions:
    names: list[str]
    images: np.ndarray  # uint8 (N, H, W, 1)
    truths: np.ndarray  # 0/1 uint8 (N, H, W, 1)
    probabilities: np.ndarray  # float32 (N, H, W, 1)
    ms_per_image: float


def predict_split(model, split_dir: Path, image_size: int, batch_size: int) -> Predictions:
    names, images, truths = load_pairs(split_dir, image_size)
    if not names:
        raise FileNotFoundError(f"no test pairs in {split_dir}; the test split is empty (prepare.test_fraction)")
    model.predict(images[:1].astype("float32"), verbose=0)  # build/trace once, not timed
    started = time.perf_counter()
    probabilities = model.predict(images.astype("float32"), batch_size=batch_size, verbose=0)
    ms_per_image = 1000.0 * (time.perf_counter() - started) / len(names)
    return Predictions(names, images, truths, probabilities.astype("float32"), ms_per_image)


def mean_loss(loss_fn, truths: np.ndarray, probabilities: np.ndarray, batch_size: int = 32) -> float:
    """The training loss on the test set (mean over images, as Keras reports it)."""
    total, count = 0.0, 0
    for start in range(0, len(truths), batch_size):
        y_true = truths[start : start + batch_size].astype("float32")
        y_pred = probabilities[start : start + batch_size]
        total += float(loss_fn(y_true, y_pred)) * len(y_true)
        count += len(y_true)
    return total / count


def evaluate_model(model, loss_fn, split_dir: Path, *, image_size: int, batch_size: int, threshold: float = 0.5) -> tuple[dict[str, Any], pd.DataFrame, Predictions]:
    predictions = predict_split(model, split_dir, image_size, batch_size)
    masks = predictions.probabilities > threshold
    scores = evaluate_masks(predictions.truths[..., 0] > 0, masks[..., 0])
    headline = scores["per_image_mean"]
    metrics = {
        **{name: headline[name] for name in SCORE_NAMES},
        "hd95": headline["hd95"],
        "asd": headline["asd"],
        "hd95_undefined": scores["hd95_undefined"],
        "global_dice": scores["global"]["dice"],
        "global_iou": scores["global"]["iou"],
        "loss": mean_loss(loss_fn, predictions.truths, predictions.probabilities),
        "ms_per_image": predictions.ms_per_image,
        "n_images": scores["n_images"],
        "threshold": threshold,
        "aggregation": "per-image mean (global_* = pooled pixels)",
    }
    per_image = pd.DataFrame(scores["per_image"]).drop(columns=["index"])
    per_image.insert(0, "file", predictions.names)
    per_image.insert(1, "tumour_fraction", per_image["truth_pixels"] / (image_size * image_size))
    return metrics, per_image, predictions


def overlay_grid(predictions: Predictions, per_image: pd.DataFrame, count: int = 4) -> np.ndarray:
    """Best and worst cases by Dice: image with truth outline (green) and prediction (red)."""
    order = per_image["dice"].to_numpy().argsort(kind="stable")
    worst, best = list(order[:count]), list(order[::-1][:count])
    rows = []
    for indices in (best, worst):
        tiles = []
        for index in indices:
            image = predictions.images[index, ..., 0]
            tile = overlay_outline(image, predictions.truths[index, ..., 0] * 255, (0, 255, 0))
            tile = overlay_outline(tile, (predictions.probabilities[index, ..., 0] > 0.5).astype(np.uint8) * 255, (0, 0, 255))
            tiles.append(frame_tile(tile, min_side=160))
        while len(tiles) < count:
            tiles.append(np.full_like(tiles[0], 255))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([_caption(grid.shape[1], f"top: best {count}, bottom: worst {count} by Dice | green: truth, red: prediction"), grid], axis=0)


def _caption(width: int, text: str) -> np.ndarray:
    import cv2

    band = np.full((22, width, 3), 255, np.uint8)
    cv2.putText(band, text, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def write_evaluation(out_metrics: Path, out_dir: Path, metrics: dict[str, Any], per_image: pd.DataFrame, predictions: Predictions) -> None:
    atomic_write_json(out_metrics, _finite(metrics))
    atomic_write_text(out_dir / "per_image.csv", per_image.to_csv(index=False, float_format="%.6g"))
    atomic_write_png(out_dir / "overlays.png", overlay_grid(predictions, per_image))


def _finite(payload: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: undefined values become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}


# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------

COMPARE_ROWS = [
    # key, label, higher is better
    ("dice", "Dice (per-image mean)", True),
    ("global_dice", "Dice (global, pooled pixels)", True),
    ("iou", "IoU", True),
    ("precision", "Precision", True),
    ("recall", "Recall (sensitivity)", True),
    ("specificity", "Specificity", True),
    ("accuracy", "Pixel accuracy", True),
    ("loss", "Loss (BCE + Dice + Tversky)", False),
    ("hd95", "HD95 (pixels)", False),
    ("params_total", "Parameters", False),
    ("ms_per_step", "Training ms/step", False),
    ("ms_per_image", "Inference ms/image", False),
]


def compare_models(results: dict[str, dict[str, Any]], data_label: str, run_facts: str) -> tuple[str, dict[str, Any]]:
    """Markdown report and JSON summary of the models' test metrics, winner named per metric."""
    names = list(results)
    winners: dict[str, str] = {}
    lines = [
        "# Model comparison",
        "",
        f"**Data: {data_label}.** {run_facts}",
        "",
        "| metric | " + " | ".join(names) + " | better |",
        "| --- | " + " | ".join("---:" for _ in names) + " | --- |",
    ]
    for key, label, higher in COMPARE_ROWS:
        values = {n: results[n].get(key) for n in names}
        known = {n: v for n, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        winner = ""
        if len(known) == len(names) and len(names) > 1 and len(set(known.values())) > 1:
            winner = (max if higher else min)(known, key=known.get)
            winners[key] = winner
        elif len(known) == len(names) and len(names) > 1:
            winner = "tie"
            winners[key] = "tie"
        lines.append(f"| {label} | " + " | ".join(_fmt(values[n]) for n in names) + f" | {winner} |")
    lines += ["", "## Reference paper (for context)", "", "| model | Dice | accuracy | loss |", "| --- | ---: | ---: | ---: |"]
    for name, reference in REFERENCE_RESULTS.items():
        lines.append(f"| {name} | {_fmt(reference.get('dice'))} | {_fmt(reference.get('accuracy'))} | {_fmt(reference.get('loss'))} |")
    lines += [
        "",
        "The paper used an ImageNet-pretrained encoder and a random image-level split (slices of one patient on both",
        "sides), so its numbers are optimistic; ours use a patient-safe grouped split. Numbers measured on synthetic",
        "data say nothing about MRI.",
    ]
    if "dice" in winners:
        lines += ["", f"**Winner on per-image Dice: {winners['dice']}.**"]
    summary = {"data_source": data_label, "winners": winners, "models": {n: _finite(results[n]) for n in names}}
    return "\n".join(lines) + "\n", summary


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"


def _save_figure(fig, path: Path) -> None:
    import io as _io

    import matplotlib.pyplot as plt

    from tumorseg.io import atomic_write_bytes

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def learning_curves_chart(histories: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """Dice and loss per epoch, training and validation, all models on one chart (a PNG, so it
    shows offline: `dvc plots show`'s HTML loads its renderer from a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (dice_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for index, (name, history) in enumerate(histories.items()):
        for ax, metric in ((dice_ax, "dice"), (loss_ax, "loss")):
            for key, style in ((f"val_{metric}", "-"), (metric, ":")):
                if key in history:
                    ax.plot(history["epoch"], history[key], style, color=f"C{index}", label=f"{name} {key}")
    dice_ax.set(xlabel="epoch", ylabel="Dice (per-image mean)", ylim=(0, 1))
    loss_ax.set(xlabel="epoch", ylabel="loss (BCE + Dice + Tversky)")
    for ax in (dice_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def comparison_chart(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["dice", "global_dice", "iou", "precision", "recall"]
    names = list(results)
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for offset, name in enumerate(names):
        values = [results[name].get(k) or 0.0 for k in keys]
        bars = ax.bar(x + offset * width - 0.4 + width / 2, values, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, ["Dice", "Dice (global)", "IoU", "Precision", "Recall"])
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
