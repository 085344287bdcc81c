"""Comparison reports: the models' test metrics side by side (Markdown + JSON), their training
facts, and the charts (learning curves, metric bars).

Reads only what the evaluate and train stages wrote; never a model or an image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.io import atomic_write_figure

ENSEMBLE = "ensemble"  # the evaluated mean of all models: metrics/evaluate_ensemble.json
SIZE_BANDS = ("small", "medium", "large")  # per-image tumour-size terciles (evaluation's breakdown)

# The reference work's reported test results (Hybrid U-Net + MobileNetV2; random image-level split,
# ImageNet encoder): context for our numbers, not a like-for-like comparison.
REFERENCE_RESULTS = {
    "unet": {"dice": 0.7556},
    "umobilenetv2": {"dice": 0.8249, "accuracy": 0.9946, "loss": 0.1489},
}


def finite(payload: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: undefined values become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}


COMPARE_ROWS = [
    # key, label, higher is better
    ("dice", "Dice (per-image mean)", True),
    ("patient_dice", "Dice per patient (slices stacked)", True),  # rows like this one: only where measured
    ("global_dice", "Dice (global, pooled pixels)", True),
    ("detection_sensitivity", "Detection sensitivity (tumour slices found)", True),
    ("false_positive_rate", "False-positive rate (tumour-free slices)", False),
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

OPTIONAL_ROWS = {"patient_dice", "detection_sensitivity", "false_positive_rate"}  # real-scan metrics (evaluation.scan_metrics)

# Rows of the "how each model was trained" table: (key of metrics/train_<name>.json, label).
TRAINING_ROWS = [
    ("image_size", "input size (px)"),
    ("init_from", "started from"),  # a warm start (`train.init_from`): the epochs below come on top
    ("distill_teachers", "distilled from"),  # knowledge distillation (`train.distill`): the teacher files
    ("epochs_run", "epochs trained"),
    ("epochs_planned", "epochs planned (early stopping may end sooner)"),
    ("best_epoch", "best epoch (validation)"),
    ("best_val_dice", "best validation Dice"),
    ("batch_size", "batch"),
    ("effective_lr", "learning rate (peak)"),
]


def training_table(training: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of each model's own training facts (its train JSON). Compared models may come
    from different runs, so these are per model, never the workspace's params.yaml."""
    names = [n for n, facts in training.items() if facts]
    if not names:
        return []
    lines = ["", "## How each model was trained", "", "| | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for key, label in TRAINING_ROWS:
        values = [training[n].get(key) for n in names]
        if all(v is None for v in values):  # train JSONs written before the key existed
            continue
        values = [(", ".join(v) or "none") if isinstance(v, list) else v for v in values]
        cells = [f"`{v}`" if isinstance(v, str) else f"{v:g}" if key == "effective_lr" and isinstance(v, float) else format_number(v) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def compare_models(
    results: dict[str, dict[str, Any]],
    data_label: str,
    run_facts: str,
    training: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any]]:
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
        if key in OPTIONAL_ROWS and all(v is None for v in values.values()):
            continue  # e.g. no tumour-free slices, no patient ids: the row would be empty
        known = {n: v for n, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        winner = ""
        if len(known) == len(names) and len(names) > 1 and len(set(known.values())) > 1:
            winner = (max if higher else min)(known, key=known.get)
            winners[key] = winner
        elif len(known) == len(names) and len(names) > 1:
            winner = "tie"
            winners[key] = "tie"
        lines.append(f"| {label} | " + " | ".join(format_number(values[n]) for n in names) + f" | {winner} |")
    lines += breakdown_table(results)
    lines += training_table(training or {})
    lines += ["", "## Reference paper (for context)", "", "| model | Dice | accuracy | loss |", "| --- | ---: | ---: | ---: |"]
    for name, reference in REFERENCE_RESULTS.items():
        lines.append(
            f"| {name} | {format_number(reference.get('dice'))} | {format_number(reference.get('accuracy'))} | {format_number(reference.get('loss'))} |"
        )
    lines += [
        "",
        "The paper used an ImageNet-pretrained encoder and a random image-level split (slices of one patient on both",
        "sides), so its numbers are optimistic; ours use a patient-safe grouped split. Numbers measured on synthetic",
        "data say nothing about MRI.",
    ]
    if "dice" in winners:
        lines += ["", f"**Winner on per-image Dice: {winners['dice']}.**"]
    summary = {"data_source": data_label, "winners": winners, "models": {n: finite(results[n]) for n in names}}
    return "\n".join(lines) + "\n", summary


def breakdown_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of per-class and per-size-tercile Dice, when the evaluation produced them."""
    names = list(results)
    rows: list[tuple[str, dict[str, Any]]] = []
    classes = sorted({c for r in results.values() for c in (r.get("dice_by_class") or {})})
    for cls in classes:
        counts = {r.get("n_by_class", {}).get(cls) for r in results.values()} - {None}
        label = f"{cls} (n={counts.pop()})" if len(counts) == 1 else cls
        rows.append((label, {n: (results[n].get("dice_by_class") or {}).get(cls) for n in names}))
    for band in SIZE_BANDS:
        if any(band in (r.get("dice_by_size") or {}) for r in results.values()):
            rows.append((f"{band} tumours (size tercile)", {n: (results[n].get("dice_by_size") or {}).get(band) for n in names}))
    if not rows:
        return []
    lines = ["", "## Dice by tumour type and size", "", "| group | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    lines += [f"| {label} | " + " | ".join(format_number(values[n]) for n in names) + " |" for label, values in rows]
    return lines


def format_number(value: Any) -> str:
    """Scores (< 10) to 4 decimals; distances and timings to 1 decimal; counts with separators."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) < 10:
        return f"{value:.4f}"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"


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
    atomic_write_figure(path, fig)


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
    atomic_write_figure(path, fig)
