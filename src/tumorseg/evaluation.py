"""Evaluate trained models on the untouched test split, and compare them.

The headline is the per-image mean (every slice weighs the same, so small tumours count); the
pooled "global" Dice is reported beside it. Every output states the data it was measured on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.augment import frame_tile, overlay_outline
from tumorseg.inference import predict_at_size, remove_small_components
from tumorseg.io import atomic_write_figure, atomic_write_json, atomic_write_png, atomic_write_text
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


def predict_probabilities(model, images: np.ndarray, batch_size: int, *, tta: bool = False) -> np.ndarray:
    """Sigmoid outputs ``(N, H, W, 1)``; with ``tta`` the mean over the image and its mirror image
    (the mirror's prediction flipped back), which the models were trained to be invariant to."""
    x = images.astype("float32")
    side = _fixed_input_side(model)
    call = partial(model.predict, batch_size=batch_size, verbose=0)

    def run(batch: np.ndarray) -> np.ndarray:
        # A model built for another size sees the images resized to it, its output back to theirs.
        return call(batch) if side is None else predict_at_size(call, side, batch)

    probabilities = run(x)
    if tta:
        mirrored = run(np.ascontiguousarray(x[:, :, ::-1]))[:, :, ::-1]
        probabilities = (probabilities + mirrored) / 2.0
    return probabilities.astype("float32")


def _fixed_input_side(model) -> int | None:
    """The square input side a Keras model was built for (None: any size, or not a Keras model)."""
    shape = getattr(model, "input_shape", None)
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        return None
    return int(shape[1])


def predict_split(model, split_dir: Path, image_size: int, batch_size: int, *, tta: bool = False) -> Predictions:
    names, images, truths = load_pairs(split_dir, image_size)
    if not names:
        raise FileNotFoundError(f"no pairs in {split_dir}; the split is empty (prepare.val_fraction / test_fraction)")
    predict_probabilities(model, images[:1], 1)  # build/trace once, not timed
    started = time.perf_counter()
    probabilities = predict_probabilities(model, images, batch_size, tta=tta)
    ms_per_image = 1000.0 * (time.perf_counter() - started) / len(names)
    return Predictions(names, images, truths, probabilities, ms_per_image)


def mean_predictions(members: Sequence[Predictions]) -> Predictions:
    """An ensemble's predictions from its members' own: their mean probability. The same as
    predicting with the ensemble (mirroring, averaging and linear resizing commute), for free."""
    first = members[0]
    for other in members[1:]:
        if other.names != first.names:
            raise ValueError("ensemble members were scored on different images")
    probabilities = np.mean([member.probabilities for member in members], axis=0).astype("float32")
    return Predictions(first.names, first.images, first.truths, probabilities, sum(member.ms_per_image for member in members))


def mean_loss(loss_fn, truths: np.ndarray, probabilities: np.ndarray, batch_size: int = 32) -> float:
    """The training loss on the test set (mean over images, as Keras reports it), at model resolution."""
    total, count = 0.0, 0
    for start in range(0, len(truths), batch_size):
        y_true = truths[start : start + batch_size].astype("float32")
        y_pred = probabilities[start : start + batch_size]
        total += float(loss_fn(y_true, y_pred)) * len(y_true)
        count += len(y_true)
    return total / count


def binary_masks(probabilities: list[np.ndarray], threshold: float, min_component_px: int) -> list[np.ndarray]:
    return [remove_small_components(p > threshold, min_component_px) for p in probabilities]


@dataclass
class ScoringTarget:
    """What predictions are scored against: per image, the truth mask and its size."""

    truths: list[np.ndarray]  # bool (h, w), one per image, sizes may differ
    resolution: str  # "original" | "prepared"

    def resize(self, probabilities: np.ndarray) -> list[np.ndarray]:
        """Model outputs (N, S, S, 1) -> one probability map per image at its truth's size."""
        import cv2

        out = []
        for probability, truth in zip(probabilities[..., 0], self.truths):
            if probability.shape != truth.shape:
                probability = cv2.resize(probability, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_LINEAR)
            out.append(probability)
        return out


def scoring_target(predictions: Predictions, resolution: str, *, manifest_path: Path | None, mask_threshold: int, raw_masks_dir: Path | None = None) -> ScoringTarget:
    """``original``: the raw masks listed in the prepare manifest (the resolution a user's images
    have), looked up in ``raw_masks_dir`` when given (else at the manifest's path); ``prepared``:
    the resized masks the model was trained on."""
    if resolution == "prepared":
        return ScoringTarget([t[..., 0] > 0 for t in predictions.truths], "prepared")
    import cv2

    from tumorseg.data.prepare import binarise_mask

    if manifest_path is None or not manifest_path.is_file():
        raise FileNotFoundError(f"evaluate.resolution is `original` but the prepare manifest {manifest_path} is missing: re-run the prepare stage or set evaluate.resolution: prepared")
    manifest = pd.read_csv(manifest_path, dtype={"id": str}).set_index("id")
    truths = []
    for name in predictions.names:
        stem = Path(name).stem
        if stem not in manifest.index:
            raise KeyError(f"{name} is not in {manifest_path}: the prepared data and its manifest disagree; re-run the prepare stage")
        mask_path = Path(manifest.at[stem, "mask_path"])
        if raw_masks_dir is not None:
            mask_path = raw_masks_dir / mask_path.name
        raw = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise FileNotFoundError(f"cannot read the original mask {mask_path} (listed in {manifest_path}); restore data/raw (`dvc checkout`) or set evaluate.resolution: prepared")
        truths.append(binarise_mask(raw, mask_threshold)[0] > 0)
    return ScoringTarget(truths, "original")


def tune_postprocessing(probabilities: list[np.ndarray], truths: list[np.ndarray], *, thresholds=None, min_sizes=None) -> dict[str, float]:
    """Threshold and minimum blob size with the best per-image mean Dice on these (validation) images."""
    from tumorseg.metrics import dice

    thresholds = np.round(np.arange(0.3, 0.71, 0.05), 2) if thresholds is None else thresholds
    min_sizes = (0, 10, 25, 50, 100, 200) if min_sizes is None else min_sizes
    best = {"threshold": 0.5, "min_component_px": 0, "dice": -1.0}
    for threshold in thresholds:
        for min_size in min_sizes:
            masks = binary_masks(probabilities, float(threshold), int(min_size))
            score = float(np.mean([dice(t, m) for t, m in zip(truths, masks)]))
            if score > best["dice"] + 1e-9:
                best = {"threshold": float(threshold), "min_component_px": int(min_size), "dice": score}
    return best


def read_labels(labels: str, raw_dir: Path) -> pd.DataFrame | None:
    """``file,tumour_type`` rows keyed by file stem, or None (``none``, or ``auto`` without a file)."""
    if labels == "none":
        return None
    path = raw_dir / "labels.csv" if labels == "auto" else Path(labels)
    if not path.is_file():
        if labels == "auto":
            return None
        raise FileNotFoundError(f"evaluate.labels: {path} does not exist (a CSV with columns file,tumour_type; or auto / none)")
    table = pd.read_csv(path, dtype=str)
    missing = {"file", "tumour_type"} - set(table.columns)
    if missing:
        raise ValueError(f"evaluate.labels: {path} lacks the column(s) {sorted(missing)} (needs file,tumour_type)")
    table["stem"] = table["file"].map(lambda f: Path(f).stem)
    return table.drop_duplicates("stem").set_index("stem")


SIZE_BANDS = ("small", "medium", "large")


def breakdowns(per_image: pd.DataFrame) -> dict[str, Any]:
    """Per-image mean Dice by tumour type and by tumour-size tercile (of the true area on this split)."""
    out: dict[str, Any] = {}
    if "tumour_type" in per_image and per_image["tumour_type"].notna().any():
        grouped = per_image.dropna(subset=["tumour_type"]).groupby("tumour_type")["dice"]
        out["dice_by_class"] = {k: float(v) for k, v in grouped.mean().items()}
        out["n_by_class"] = {k: int(v) for k, v in grouped.size().items()}
    bounds = np.quantile(per_image["tumour_fraction"], [1 / 3, 2 / 3])
    band = np.digitize(per_image["tumour_fraction"], bounds, right=True)
    per_image["size_band"] = [SIZE_BANDS[b] for b in band]
    out["dice_by_size"] = {name: float(per_image.loc[band == i, "dice"].mean()) for i, name in enumerate(SIZE_BANDS) if (band == i).any()}
    out["size_band_bounds"] = [float(b) for b in bounds]  # tumour area fraction cut points
    return out


def evaluate_model(
    model,
    loss_fn,
    split_dir: Path,
    *,
    image_size: int,
    batch_size: int,
    threshold: float = 0.5,
    tta: bool = False,
    min_component_px: int = 0,
    resolution: str = "prepared",
    manifest_path: Path | None = None,
    mask_threshold: int = 127,
    raw_masks_dir: Path | None = None,
    labels: pd.DataFrame | None = None,
    val_dir: Path | None = None,
    predict: Callable[[Path], Predictions] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, Predictions]:
    """Score ``model`` on ``split_dir``. With ``val_dir`` the threshold and minimum blob size are
    first chosen on that validation split (the test split is never used for a choice).
    ``predict`` (split folder -> predictions) replaces predicting with ``model``, e.g. by cached
    or combined predictions."""
    if predict is None:
        predict = partial(predict_split, model, image_size=image_size, batch_size=batch_size, tta=tta)
    tuned: dict[str, float] = {}
    if val_dir is not None:
        val = predict(val_dir)
        val_target = scoring_target(val, resolution, manifest_path=manifest_path, mask_threshold=mask_threshold, raw_masks_dir=raw_masks_dir)
        tuned = tune_postprocessing(val_target.resize(val.probabilities), val_target.truths)
        threshold, min_component_px = tuned["threshold"], tuned["min_component_px"]
        log.info("tuned on %d validation images: threshold %.2f, min blob %d px (val Dice %.4f)", len(val.names), threshold, min_component_px, tuned["dice"])

    predictions = predict(split_dir)
    target = scoring_target(predictions, resolution, manifest_path=manifest_path, mask_threshold=mask_threshold, raw_masks_dir=raw_masks_dir)
    masks = binary_masks(target.resize(predictions.probabilities), threshold, min_component_px)
    scores = evaluate_masks(target.truths, masks)
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
        "min_component_px": min_component_px,
        "tta": tta,
        "tuned_on": "val" if tuned else "none",
        "val_dice_tuned": tuned.get("dice"),
        "resolution": resolution,
        "aggregation": "per-image mean (global_* = pooled pixels)",
    }
    per_image = pd.DataFrame(scores["per_image"]).drop(columns=["index"])
    per_image.insert(0, "file", predictions.names)
    per_image.insert(1, "tumour_fraction", per_image["truth_pixels"] / np.array([t.size for t in target.truths]))
    if labels is not None:
        stems = [Path(n).stem for n in predictions.names]
        per_image.insert(1, "tumour_type", [labels["tumour_type"].get(s) for s in stems])
        unlabelled = per_image["tumour_type"].isna().sum()
        if unlabelled:
            log.warning("%d of %d test images have no entry in the labels file", unlabelled, len(per_image))
    metrics.update(breakdowns(per_image))
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

# Rows of the "how each model was trained" table: (key of metrics/train_<name>.json, label).
TRAINING_ROWS = [
    ("image_size", "input size (px)"),
    ("init_from", "started from"),  # a warm start (`train.init_from`): the epochs below come on top
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
        cells = [f"`{v}`" if isinstance(v, str) else f"{v:g}" if key == "effective_lr" and isinstance(v, float) else format_number(v) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def compare_models(results: dict[str, dict[str, Any]], data_label: str, run_facts: str, training: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
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
        lines.append(f"| {label} | " + " | ".join(format_number(values[n]) for n in names) + f" | {winner} |")
    lines += breakdown_table(results)
    lines += training_table(training or {})
    lines += ["", "## Reference paper (for context)", "", "| model | Dice | accuracy | loss |", "| --- | ---: | ---: | ---: |"]
    for name, reference in REFERENCE_RESULTS.items():
        lines.append(f"| {name} | {format_number(reference.get('dice'))} | {format_number(reference.get('accuracy'))} | {format_number(reference.get('loss'))} |")
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
