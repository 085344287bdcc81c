"""Score predictions of a labelled split: the headline per-image Dice, its breakdowns, the loss.

Evaluation never runs a model itself: it takes a *predict* callable (images -> probability maps
at each image's size, see :class:`~tumorseg.inference.PredictedSplit`), which the pipeline builds
from :class:`~tumorseg.inference.Predictor`, and cuts the maps with the same
:class:`~tumorseg.inference.PostProcessing` that ``tumorseg predict`` applies. The masks scored
are therefore exactly the masks a user gets for the same images and settings.

The headline is the per-image mean (every slice weighs the same, so small tumours count); the
pooled "global" Dice is reported beside it. Where a split also holds tumour-free slices (real
scans), the headline scores are over the tumour slices, and beside them: the false-positive rate
on the tumour-free slices (share with any predicted tumour after the blob filter), the detection
sensitivity (tumour slices whose prediction overlaps the tumour) and, where slices are grouped by
patient, the per-patient Dice (all of a patient's slices stacked, the usual volume metric).
Every output states the data it was measured on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import SINGLE_CHANNEL
from tumorseg.data.pairs import load_pairs
from tumorseg.images import read_image, to_gray_uint8
from tumorseg.inference import PostProcessing, PredictedSplit
from tumorseg.io import atomic_write_png, atomic_write_text, write_metrics
from tumorseg.metrics import SCORE_NAMES, dice, evaluate_masks
from tumorseg.overlays import PREDICTION_BGR, TRUTH_BGR, caption, fit_tile, frame_tile, overlay_outline
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
    images: list[np.ndarray]  # uint8 (h, w), or (h, w, C) for C sequences; sizes may differ
    truths: list[np.ndarray]  # bool (h, w), the same sizes
    resolution: str
    patients: list[str] | None = None  # each slice's patient (prepare.group_by regex ids), or None


def load_scoring_split(
    split_dir: Path,
    resolution: str,
    *,
    manifest_path: Path | None = None,
    mask_threshold: int = 127,
    raw_dir: Path | None = None,
    channels: Sequence[str] = (SINGLE_CHANNEL,),
) -> LabelledImages:
    """The images and truths of a prepared split at ``resolution``.

    ``original``: each image and mask listed in the prepare manifest, read as ``predict`` reads a
    user's file (the decode gate), from ``raw_dir/<channel>`` and ``raw_dir/masks`` when given (else
    at the manifest's paths); ``prepared``: the split's own resized pairs. ``channels``: the
    prepared folders (``images``, or one per sequence, stacked as ``(h, w, C)``; a sequence that
    prepare filled with zeros is zeros here too).
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"evaluate.resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    channels = tuple(channels)
    single = channels == (SINGLE_CHANNEL,)
    names, prepared_images, prepared_masks = load_pairs(split_dir, channels=channels)
    if not names:
        raise FileNotFoundError(f"no pairs in {split_dir}; the split is empty (prepare.val_fraction / test_fraction)")
    manifest = None
    if manifest_path is not None and manifest_path.is_file():
        manifest = pd.read_csv(manifest_path, dtype={"id": str, "group": str}, keep_default_na=False).set_index("id")
    patients = _patients(manifest, names)
    if resolution == "prepared":
        images = [i[..., 0] if single else i for i in prepared_images]
        return LabelledImages(split_dir.name, names, images, [m[..., 0] > 0 for m in prepared_masks], resolution, patients)
    import cv2

    from tumorseg.data.prepare import binarise_mask

    if manifest is None:
        raise FileNotFoundError(
            f"evaluate.resolution is `original` but the prepare manifest {manifest_path} is missing: "
            "re-run the prepare stage or set evaluate.resolution: prepared"
        )
    images, truths = [], []
    for name in names:
        stem = Path(name).stem
        if stem not in manifest.index:
            raise KeyError(f"{name} is not in {manifest_path}: the prepared data and its manifest disagree; re-run the prepare stage")
        mask_path = Path(manifest.at[stem, "mask_path"])
        if raw_dir is not None:
            mask_path = raw_dir / "masks" / mask_path.name
        raw = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise FileNotFoundError(
                f"cannot read the original mask {mask_path} (listed in {manifest_path}); "
                "restore data/raw (`dvc checkout`) or set evaluate.resolution: prepared"
            )
        truths.append(binarise_mask(raw, mask_threshold)[0] > 0)
        planes = []
        for channel in channels:
            listed = manifest.at[stem, "image_path" if single else f"{channel}_path"]
            if not listed:  # a sequence prepare filled with zeros
                planes.append(np.zeros(truths[-1].shape, np.uint8))
                continue
            image_path = Path(listed) if raw_dir is None else raw_dir / channel / Path(listed).name
            if not image_path.is_file():
                raise FileNotFoundError(
                    f"cannot find the original image {image_path} (listed in {manifest_path}); "
                    "restore data/raw (`dvc checkout`) or set evaluate.resolution: prepared"
                )
            planes.append(to_gray_uint8(read_image(image_path)))
            if planes[-1].shape != truths[-1].shape:
                raise ValueError(
                    f"{image_path} is {planes[-1].shape[1]}x{planes[-1].shape[0]} "
                    f"but its mask {mask_path} is {truths[-1].shape[1]}x{truths[-1].shape[0]}"
                )
        images.append(planes[0] if single else np.stack(planes, axis=-1))
    return LabelledImages(split_dir.name, names, images, truths, resolution, patients)


def _patients(manifest: pd.DataFrame | None, names: list[str]) -> list[str] | None:
    """Each slice's patient where prepare grouped by an id in the file name (``regex:``); None for
    block or per-file groups, which are not patients."""
    if manifest is None or "group" not in manifest.columns:
        return None
    groups = [manifest["group"].get(Path(name).stem, "") for name in names]
    if not groups or not all(isinstance(g, str) and g.startswith("id:") for g in groups):
        return None
    return [g.removeprefix("id:") for g in groups]


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
    has_tumour = np.array([truth.any() for truth in test.truths])
    if not has_tumour.any():
        raise ValueError(f"the {test.split} split has no slice with a tumour: Dice cannot be measured")
    all_scores = evaluate_masks(test.truths, masks)
    # The headline is over tumour slices (on a tumour-free slice Dice is only "anything predicted?").
    scores = all_scores if has_tumour.all() else evaluate_masks([t for t, k in zip(test.truths, has_tumour) if k], [m for m, k in zip(masks, has_tumour) if k])
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
        "n_images": all_scores["n_images"],
        "threshold": post.threshold,
        "min_component_px": post.min_component_px,
        "tta": tta,
        "tuned_on": "val" if tuned else "none",
        "val_dice_tuned": tuned.get("dice"),
        "resolution": test.resolution,
        "aggregation": "per-image mean (global_* = pooled pixels)",
    }
    per_image = pd.DataFrame(all_scores["per_image"]).drop(columns=["index"])
    per_image.insert(0, "file", test.names)
    per_image.insert(1, "tumour_fraction", per_image["truth_pixels"] / np.array([t.size for t in test.truths]))
    if test.patients is not None:
        per_image.insert(1, "patient", test.patients)
    if not has_tumour.all():
        metrics.update(scan_metrics(test.truths, masks))
        metrics["aggregation"] = "per-image mean over tumour slices (global_* = pooled pixels of those slices)"
    if test.patients is not None:
        metrics.update(patient_metrics(test.truths, masks, test.patients))
    if labels is not None:
        stems = [Path(n).stem for n in test.names]
        per_image.insert(1, "tumour_type", [labels["tumour_type"].get(s) for s in stems])
        unlabelled = per_image["tumour_type"].isna().sum()
        if unlabelled:
            log.warning("%d of %d test images have no entry in the labels file", unlabelled, len(per_image))
    metrics.update(breakdowns(per_image[has_tumour].copy()))
    return Evaluation(metrics, per_image, test, masks)


def scan_metrics(truths: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, Any]:
    """What matters on real scans, where many slices hold no tumour:

    - ``false_positive_rate``: tumour-free slices with any predicted tumour / tumour-free slices;
    - ``detection_sensitivity``: tumour slices whose prediction overlaps the tumour / tumour slices.
    """
    has_tumour = [bool(t.any()) for t in truths]
    free = [bool(m.any()) for m, k in zip(masks, has_tumour) if not k]
    found = [bool(np.logical_and(t, m).any()) for t, m, k in zip(truths, masks, has_tumour) if k]
    return {
        "n_tumour_slices": len(found),
        "n_tumour_free_slices": len(free),
        "false_positive_rate": float(np.mean(free)) if free else None,
        "detection_sensitivity": float(np.mean(found)) if found else None,
    }


def patient_metrics(truths: Sequence[np.ndarray], masks: Sequence[np.ndarray], patients: Sequence[str]) -> dict[str, Any]:
    """``patient_dice``: per patient, the Dice of all its slices stacked (2·TP / (2·TP + FP + FN)
    with the counts summed over its slices; 1 when neither holds any tumour), then the mean over
    patients; ``patient_dice_by_patient`` gives each patient's."""
    counts: dict[str, np.ndarray] = {}
    for patient, truth, mask in zip(patients, truths, masks):
        tp = int(np.count_nonzero(truth & mask))
        counts.setdefault(patient, np.zeros(3, np.int64))[:] += (tp, int(np.count_nonzero(mask)) - tp, int(np.count_nonzero(truth)) - tp)
    by_patient = {p: (1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)) for p, (tp, fp, fn) in sorted(counts.items())}
    return {"n_patients": len(by_patient), "patient_dice": float(np.mean(list(by_patient.values()))), "patient_dice_by_patient": by_patient}


def overlay_grid(evaluation: Evaluation, count: int = 4) -> np.ndarray:
    """Best and worst cases by Dice: image with truth outline (green) and the scored mask (red)."""
    order = evaluation.per_image["dice"].to_numpy().argsort(kind="stable")
    tumour = evaluation.per_image["truth_pixels"].to_numpy() > 0  # a clean tumour-free slice is no "best case"
    worst, best = list(order[:count]), [i for i in order[::-1] if tumour[i]][:count]
    scored = evaluation.scored
    side = max(160, min(256, max(max(image.shape[:2]) for image in scored.images)))  # one tile size for images of any sizes
    rows = []
    for indices in (best, worst):
        tiles = []
        for index in indices:
            image = scored.images[index] if scored.images[index].ndim == 2 else np.ascontiguousarray(scored.images[index][..., 0])
            tile = overlay_outline(image, scored.truths[index].astype(np.uint8) * 255, TRUTH_BGR)
            tile = overlay_outline(tile, evaluation.masks[index].astype(np.uint8) * 255, PREDICTION_BGR)
            tiles.append(frame_tile(fit_tile(tile, side), min_side=side))
        while len(tiles) < count:
            tiles.append(np.full_like(tiles[0], 255))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([caption(grid.shape[1], f"top: best {count}, bottom: worst {count} by Dice | green: truth, red: prediction"), grid], axis=0)


def write_evaluation(out_metrics: Path, out_dir: Path, evaluation: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``out_metrics`` (numbers only; NaN as null) with what describes them in its ``.info.json``
    sibling (:func:`tumorseg.io.write_metrics`), ``out_dir/per_image.csv`` and ``out_dir/overlays.png``.
    Returns both merged."""
    metrics = finite(evaluation.metrics | (extra or {}))
    write_metrics(out_metrics, metrics, detail=("patient_dice_by_patient",))
    atomic_write_text(out_dir / "per_image.csv", evaluation.per_image.to_csv(index=False, float_format="%.6g"))
    atomic_write_png(out_dir / "overlays.png", overlay_grid(evaluation))
    return metrics
