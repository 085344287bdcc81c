"""Score predictions of a labelled split: the headline per-image Dice, its breakdowns, the loss.

Evaluation never runs a model itself: it takes a *predict* callable (images -> probability maps
at each image's size, see :class:`~tumorseg.inference.PredictedSplit`), which the pipeline builds
from :class:`~tumorseg.inference.Predictor`, and cuts the maps with the same
:class:`~tumorseg.inference.PostProcessing` that ``tumorseg predict`` applies. The masks scored
are therefore exactly the masks a user gets for the same images and settings.

The headline is the per-image mean (every slice weighs the same, so small tumours count); the
pooled "global" Dice is reported beside it. Every output states the data it was measured on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.pairs import load_pairs
from tumorseg.images import read_image
from tumorseg.inference import PostProcessing, PredictedSplit
from tumorseg.io import atomic_write_json, atomic_write_png, atomic_write_text
from tumorseg.metrics import SCORE_NAMES, dice, evaluate_masks
from tumorseg.overlays import caption, fit_tile, frame_tile, overlay_outline
from tumorseg.reporting import SIZE_BANDS, finite

log = logging.getLogger(__name__)

RESOLUTIONS = ("original", "prepared")
DEFAULT_POST = PostProcessing()  # threshold 0.5, no blob filter (frozen: safe to share as a default)


@dataclass
class LabelledImages:
    """A split's images and truth masks at the resolution they are scored at: ``original`` = the
    raw files a user would give ``tumorseg predict``; ``prepared`` = the resized training copies."""

    split: str
    names: list[str]
    images: list[np.ndarray]  # uint8 (h, w), sizes may differ
    truths: list[np.ndarray]  # bool (h, w), the same sizes
    resolution: str


def load_scoring_split(
    split_dir: Path,
    resolution: str,
    *,
    manifest_path: Path | None = None,
    mask_threshold: int = 127,
    raw_dir: Path | None = None,
) -> LabelledImages:
    """The images and truths of a prepared split at ``resolution``.

    ``original``: each image and mask listed in the prepare manifest, read as ``predict`` reads a
    user's file (the decode gate), from ``raw_dir/images`` and ``raw_dir/masks`` when given (else
    at the manifest's paths); ``prepared``: the split's own resized pairs.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"evaluate.resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    names, prepared_images, prepared_masks = load_pairs(split_dir)
    if not names:
        raise FileNotFoundError(f"no pairs in {split_dir}; the split is empty (prepare.val_fraction / test_fraction)")
    if resolution == "prepared":
        return LabelledImages(split_dir.name, names, [i[..., 0] for i in prepared_images], [m[..., 0] > 0 for m in prepared_masks], resolution)
    import cv2

    from tumorseg.data.prepare import binarise_mask

    if manifest_path is None or not manifest_path.is_file():
        raise FileNotFoundError(
            f"evaluate.resolution is `original` but the prepare manifest {manifest_path} is missing: "
            "re-run the prepare stage or set evaluate.resolution: prepared"
        )
    manifest = pd.read_csv(manifest_path, dtype={"id": str}).set_index("id")
    images, truths = [], []
    for name in names:
        stem = Path(name).stem
        if stem not in manifest.index:
            raise KeyError(f"{name} is not in {manifest_path}: the prepared data and its manifest disagree; re-run the prepare stage")
        image_path, mask_path = Path(manifest.at[stem, "image_path"]), Path(manifest.at[stem, "mask_path"])
        if raw_dir is not None:
            image_path, mask_path = raw_dir / "images" / image_path.name, raw_dir / "masks" / mask_path.name
        if not image_path.is_file():
            raise FileNotFoundError(
                f"cannot find the original image {image_path} (listed in {manifest_path}); "
                "restore data/raw (`dvc checkout`) or set evaluate.resolution: prepared"
            )
        raw = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise FileNotFoundError(
                f"cannot read the original mask {mask_path} (listed in {manifest_path}); "
                "restore data/raw (`dvc checkout`) or set evaluate.resolution: prepared"
            )
        images.append(read_image(image_path))
        truths.append(binarise_mask(raw, mask_threshold)[0] > 0)
        if truths[-1].shape != images[-1].shape:
            raise ValueError(
                f"{image_path} is {images[-1].shape[1]}x{images[-1].shape[0]} "
                f"but its mask {mask_path} is {truths[-1].shape[1]}x{truths[-1].shape[0]}"
            )
    return LabelledImages(split_dir.name, names, images, truths, resolution)


def mean_loss(loss_fn, truths: Sequence[np.ndarray], probabilities: Sequence[np.ndarray]) -> float:
    """The training loss on the scored images: per image at its own size, then the mean (every
    image weighs the same, as in the headline Dice)."""
    total = 0.0
    for truth, probability in zip(truths, probabilities):
        total += float(loss_fn(truth.astype("float32")[None, :, :, None], probability[None, :, :, None]))
    return total / max(1, len(truths))


def tune_postprocessing(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray], *, thresholds=None, min_sizes=None) -> dict[str, float]:
    """Threshold and minimum blob size with the best per-image mean Dice on these (validation) images."""
    thresholds = np.round(np.arange(0.3, 0.71, 0.05), 2) if thresholds is None else thresholds
    min_sizes = (0, 10, 25, 50, 100, 200) if min_sizes is None else min_sizes
    best = {"threshold": 0.5, "min_component_px": 0, "dice": -1.0}
    for threshold in thresholds:
        for min_size in min_sizes:
            post = PostProcessing(float(threshold), int(min_size))
            score = float(np.mean([dice(t, post.mask(p)) for t, p in zip(truths, probabilities)]))
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


@dataclass
class Evaluation:
    """What scoring a split gives: the metrics JSON, the per-image table and the masks scored."""

    metrics: dict[str, Any]
    per_image: pd.DataFrame
    scored: LabelledImages
    masks: list[np.ndarray]  # bool (h, w): the predicted masks that were scored


def evaluate_split(
    predict: Callable[[LabelledImages], PredictedSplit],
    test: LabelledImages,
    *,
    post: PostProcessing = DEFAULT_POST,
    val: LabelledImages | None = None,
    loss_fn=None,
    labels: pd.DataFrame | None = None,
    tta: bool = False,
) -> Evaluation:
    """Score ``predict``'s maps of ``test`` cut by ``post``. With ``val`` the threshold and minimum
    blob size are first chosen on that validation split (the test split is never used for a
    choice). ``tta`` is recorded, not applied: it is the predictor's."""
    tuned: dict[str, float] = {}
    if val is not None:
        predicted_val = predict(val)
        tuned = tune_postprocessing(predicted_val.probabilities, val.truths)
        post = PostProcessing(tuned["threshold"], int(tuned["min_component_px"]))
        log.info(
            "tuned on %d validation images: threshold %.2f, min blob %d px (val Dice %.4f)",
            len(val.names),
            post.threshold,
            post.min_component_px,
            tuned["dice"],
        )

    predicted = predict(test)
    if predicted.names != test.names:
        raise ValueError(f"the predictions are of other images than the {test.split} split's")
    masks = [post.mask(p) for p in predicted.probabilities]
    scores = evaluate_masks(test.truths, masks)
    headline = scores["per_image_mean"]
    metrics = {
        **{name: headline[name] for name in SCORE_NAMES},
        "hd95": headline["hd95"],
        "asd": headline["asd"],
        "hd95_undefined": scores["hd95_undefined"],
        "global_dice": scores["global"]["dice"],
        "global_iou": scores["global"]["iou"],
        "loss": mean_loss(loss_fn, test.truths, predicted.probabilities) if loss_fn is not None else None,
        "ms_per_image": predicted.ms_per_image,
        "n_images": scores["n_images"],
        "threshold": post.threshold,
        "min_component_px": post.min_component_px,
        "tta": tta,
        "tuned_on": "val" if tuned else "none",
        "val_dice_tuned": tuned.get("dice"),
        "resolution": test.resolution,
        "aggregation": "per-image mean (global_* = pooled pixels)",
    }
    per_image = pd.DataFrame(scores["per_image"]).drop(columns=["index"])
    per_image.insert(0, "file", test.names)
    per_image.insert(1, "tumour_fraction", per_image["truth_pixels"] / np.array([t.size for t in test.truths]))
    if labels is not None:
        stems = [Path(n).stem for n in test.names]
        per_image.insert(1, "tumour_type", [labels["tumour_type"].get(s) for s in stems])
        unlabelled = per_image["tumour_type"].isna().sum()
        if unlabelled:
            log.warning("%d of %d test images have no entry in the labels file", unlabelled, len(per_image))
    metrics.update(breakdowns(per_image))
    return Evaluation(metrics, per_image, test, masks)


def overlay_grid(evaluation: Evaluation, count: int = 4) -> np.ndarray:
    """Best and worst cases by Dice: image with truth outline (green) and the scored mask (red)."""
    order = evaluation.per_image["dice"].to_numpy().argsort(kind="stable")
    worst, best = list(order[:count]), list(order[::-1][:count])
    scored = evaluation.scored
    side = max(160, min(256, max(max(image.shape) for image in scored.images)))  # one tile size for images of any sizes
    rows = []
    for indices in (best, worst):
        tiles = []
        for index in indices:
            tile = overlay_outline(scored.images[index], scored.truths[index].astype(np.uint8) * 255, (0, 255, 0))
            tile = overlay_outline(tile, evaluation.masks[index].astype(np.uint8) * 255, (0, 0, 255))
            tiles.append(frame_tile(fit_tile(tile, side), min_side=side))
        while len(tiles) < count:
            tiles.append(np.full_like(tiles[0], 255))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([caption(grid.shape[1], f"top: best {count}, bottom: worst {count} by Dice | green: truth, red: prediction"), grid], axis=0)


def write_evaluation(out_metrics: Path, out_dir: Path, evaluation: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``out_metrics`` (JSON; NaN as null), ``out_dir/per_image.csv`` and ``out_dir/overlays.png``."""
    metrics = finite(evaluation.metrics | (extra or {}))
    atomic_write_json(out_metrics, metrics)
    atomic_write_text(out_dir / "per_image.csv", evaluation.per_image.to_csv(index=False, float_format="%.6g"))
    atomic_write_png(out_dir / "overlays.png", overlay_grid(evaluation))
    return metrics
