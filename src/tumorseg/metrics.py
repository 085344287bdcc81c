"""Segmentation metrics: Keras metrics for training, numpy functions for evaluation.

Definitions (TP, FP, FN, TN = pixel counts of a binary prediction against a binary truth)::

    Dice        = 2TP / (2TP + FP + FN)
    IoU         = TP / (TP + FP + FN)
    precision   = TP / (TP + FP)
    recall      = TP / (TP + FN)                  (sensitivity)
    specificity = TN / (TN + FP)
    accuracy    = (TP + TN) / (TP + FP + FN + TN)  (pixel accuracy)
    Tversky     = TP / (TP + alpha FP + beta FN)   (alpha = 0.3, beta = 0.7 as in the loss)

Zero denominators (the one convention for every ratio): a ratio whose denominator is 0 is 1 when
the prediction is exactly right (FP = FN = 0) and 0 otherwise. Hence:

* empty truth & empty prediction -> Dice = IoU = precision = recall = Tversky = 1;
* empty truth with false positives -> Dice = IoU = recall = 0 (and precision 0, TP = 0);
* tumour present, nothing predicted -> Dice = IoU = recall = 0 and precision = 0.

Surface distances (HD95, ASD) use the pixel surfaces of both masks (a pixel is on the surface if
it is foreground and has a 4-connected (face) neighbour in the background or on the image border,
i.e. ``mask & ~binary_erosion(mask)``) and Euclidean distance transforms from ``scipy.ndimage``,
in units of ``spacing`` (pixels by default). With an empty truth or prediction they are undefined:
NaN, left out of the mean and counted as ``hd95_undefined``.

Aggregation: :func:`evaluate_masks` reports the *per-image mean* (each image scored, then
averaged: the headline, every image weighs the same) and the *global* score (TP/FP/FN/TN pooled
over all pixels of all images, then scored: dominated by large tumours).

The Keras metrics threshold predictions at ``> threshold`` (0.5) and truths at ``> 0.5``; by
default they accumulate the per-image scores of every batch and report their mean
(``aggregation="per_image"``, consistent with :func:`evaluate_masks`' headline); with
``aggregation="global"`` they pool TP/FP/FN/TN instead. As every Keras metric, the value shown
during an epoch is over the batches seen so far in that epoch (state reset each epoch), and the
validation value is over the whole validation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops
from scipy import ndimage

__all__ = [
    "ConfusionCounts",
    "DiceCoefficient",
    "IoUScore",
    "PixelAccuracy",
    "PixelPrecision",
    "PixelRecall",
    "SCORE_NAMES",
    "Specificity",
    "TverskyIndex",
    "accuracy",
    "average_surface_distance",
    "confusion_counts",
    "dice",
    "evaluate_masks",
    "hd95",
    "iou",
    "precision",
    "recall",
    "segmentation_metrics",
    "specificity",
    "tversky_index",
]

SCORE_NAMES = ("dice", "iou", "precision", "recall", "specificity", "accuracy", "tversky")


# --- one formula table for numpy and Keras ----------------------------------------------------------


def _ratio(xp, numerator, denominator, fp, fn):
    """numerator / denominator; where the denominator is 0: 1 if FP = FN = 0 else 0."""
    defined = denominator > 0
    safe = xp.where(defined, denominator, 1.0)
    perfect = xp.where((fp + fn) == 0, 1.0, 0.0)
    return xp.where(defined, numerator / safe, perfect)


def _score(xp, name: str, tp, fp, fn, tn, alpha: float = 0.3, beta: float = 0.7):
    if name == "dice":
        return _ratio(xp, 2 * tp, 2 * tp + fp + fn, fp, fn)
    if name == "iou":
        return _ratio(xp, tp, tp + fp + fn, fp, fn)
    if name == "precision":
        return _ratio(xp, tp, tp + fp, fp, fn)
    if name == "recall":
        return _ratio(xp, tp, tp + fn, fp, fn)
    if name == "specificity":
        return _ratio(xp, tn, tn + fp, fp, fn)
    if name == "accuracy":
        return _ratio(xp, tp + tn, tp + tn + fp + fn, fp, fn)
    if name == "tversky":
        return _ratio(xp, tp, tp + alpha * fp + beta * fn, fp, fn)
    raise ValueError(f"unknown score {name!r}; known: {', '.join(SCORE_NAMES)}")


# --- numpy evaluation --------------------------------------------------------------------------------


class ConfusionCounts(NamedTuple):
    tp: int
    fp: int
    fn: int
    tn: int


def _as_mask(array) -> np.ndarray:
    """Boolean mask: bool arrays as they are, numbers > 0.5 (0/1, 0/255, probabilities) are foreground."""
    array = np.asarray(array)
    return array if array.dtype == bool else array > 0.5


def _pair(truth, pred) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = _as_mask(truth), _as_mask(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction shapes differ: {truth.shape} vs {pred.shape}")
    return truth, pred


def confusion_counts(truth, pred) -> ConfusionCounts:
    """Pixel counts ``(tp, fp, fn, tn)`` of a binary prediction against a binary truth (any shape)."""
    truth, pred = _pair(truth, pred)
    tp = int(np.count_nonzero(truth & pred))
    fp = int(np.count_nonzero(~truth & pred))
    fn = int(np.count_nonzero(truth & ~pred))
    return ConfusionCounts(tp, fp, fn, truth.size - tp - fp - fn)


def _np_score(name: str, counts: ConfusionCounts, alpha: float = 0.3, beta: float = 0.7) -> float:
    tp, fp, fn, tn = (np.float64(v) for v in counts)
    return float(_score(np, name, tp, fp, fn, tn, alpha, beta))


def dice(truth, pred) -> float:
    """Dice = 2TP / (2TP + FP + FN); both masks empty -> 1."""
    return _np_score("dice", confusion_counts(truth, pred))


def iou(truth, pred) -> float:
    """IoU (Jaccard) = TP / (TP + FP + FN); both masks empty -> 1."""
    return _np_score("iou", confusion_counts(truth, pred))


def precision(truth, pred) -> float:
    """TP / (TP + FP); nothing predicted -> 1 if the truth is empty too, else 0."""
    return _np_score("precision", confusion_counts(truth, pred))


def recall(truth, pred) -> float:
    """Sensitivity TP / (TP + FN); empty truth -> 1 if nothing predicted, else 0."""
    return _np_score("recall", confusion_counts(truth, pred))


def specificity(truth, pred) -> float:
    """TN / (TN + FP); all-tumour truth -> 1 if predicted exactly, else 0."""
    return _np_score("specificity", confusion_counts(truth, pred))


def accuracy(truth, pred) -> float:
    """Pixel accuracy (TP + TN) / all pixels."""
    return _np_score("accuracy", confusion_counts(truth, pred))


def tversky_index(truth, pred, alpha: float = 0.3, beta: float = 0.7) -> float:
    """TP / (TP + alpha FP + beta FN); zero denominator -> 1 if exact, else 0."""
    return _np_score("tversky", confusion_counts(truth, pred), alpha, beta)


def _squeeze_channel(mask: np.ndarray) -> np.ndarray:
    return mask[..., 0] if mask.ndim >= 3 and mask.shape[-1] == 1 else mask


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(truth, pred, spacing: float | Sequence[float] = 1.0) -> np.ndarray | None:
    """Distances from every pred surface pixel to the truth surface, followed by those from every
    truth surface pixel to the pred surface (symmetric set); ``None`` if either mask is empty.

    A trailing channel axis of size 1 is dropped. ``spacing`` is the pixel size (one value, or one
    per axis); distances are Euclidean, from ``scipy.ndimage.distance_transform_edt``.
    """
    truth, pred = _pair(truth, pred)
    truth, pred = _squeeze_channel(truth), _squeeze_channel(pred)
    if not truth.any() or not pred.any():
        return None
    sampling = [float(spacing)] * truth.ndim if np.isscalar(spacing) else [float(s) for s in spacing]
    if len(sampling) != truth.ndim:
        raise ValueError(f"spacing needs {truth.ndim} values for {truth.ndim}-D masks, got {spacing!r}")
    truth_surface, pred_surface = _surface(truth), _surface(pred)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return np.concatenate([to_truth[pred_surface], to_pred[truth_surface]])


def hd95(truth, pred, spacing: float | Sequence[float] = 1.0) -> float:
    """95th percentile (numpy's linear interpolation) of the symmetric surface distances.

    The pooled distances of both directions are used (as MedPy's ``hd95``). NaN when the truth
    or the prediction is empty.
    """
    distances = surface_distances(truth, pred, spacing)
    return math.nan if distances is None else float(np.percentile(distances, 95))


def average_surface_distance(truth, pred, spacing: float | Sequence[float] = 1.0) -> float:
    """Average symmetric surface distance: the mean over the pooled distances of both directions
    (sum of all surface distances / number of surface pixels of both masks). NaN when either mask
    is empty."""
    distances = surface_distances(truth, pred, spacing)
    return math.nan if distances is None else float(np.mean(distances))


def _stack(masks, label: str) -> list[np.ndarray]:
    if isinstance(masks, np.ndarray):
        if masks.ndim < 3:
            raise ValueError(f"{label}: expected a batch of masks (N, H, W[, 1]), got shape {masks.shape}")
        return [masks[i] for i in range(masks.shape[0])]
    return [np.asarray(m) for m in masks]


def evaluate_masks(
    truths,
    preds,
    *,
    spacing: float | Sequence[float] = 1.0,
    tversky_alpha: float = 0.3,
    tversky_beta: float = 0.7,
    surface: bool = True,
) -> dict[str, Any]:
    """Score a set of predictions against their truths.

    ``truths``/``preds``: arrays ``(N, H, W)`` or ``(N, H, W, 1)`` or sequences of masks (bool, or
    numbers with > 0.5 = foreground: threshold probabilities before if you want another cut).

    Returns::

        {
          "n_images": N,
          "per_image_mean": {dice, iou, precision, recall, specificity, accuracy, tversky,
                             hd95, asd},                 # headline: mean of per-image scores
          "global": {dice, iou, precision, recall, specificity, accuracy, tversky,
                     tp, fp, fn, tn},                    # counts pooled over all pixels
          "hd95_undefined": k,   # images whose truth or prediction is empty (HD95/ASD NaN, not in the mean)
          "per_image": [{"index", "tp", "fp", "fn", "tn", "truth_pixels", "pred_pixels",
                         dice, ..., "hd95", "asd"}, ...],
        }

    ``surface=False`` skips HD95/ASD (NaN everywhere) for speed.
    """
    truth_list, pred_list = _stack(truths, "truths"), _stack(preds, "preds")
    if len(truth_list) != len(pred_list):
        raise ValueError(f"{len(truth_list)} truths but {len(pred_list)} predictions")
    if not truth_list:
        raise ValueError("evaluate_masks needs at least one image")
    rows: list[dict[str, Any]] = []
    pooled = np.zeros(4, dtype=np.int64)
    for index, (truth, pred) in enumerate(zip(truth_list, pred_list)):
        truth, pred = _pair(truth, pred)
        counts = confusion_counts(truth, pred)
        pooled += counts
        row: dict[str, Any] = {
            "index": index,
            **counts._asdict(),
            "truth_pixels": counts.tp + counts.fn,
            "pred_pixels": counts.tp + counts.fp,
        }
        for name in SCORE_NAMES:
            row[name] = _np_score(name, counts, tversky_alpha, tversky_beta)
        distances = surface_distances(truth, pred, spacing) if surface else None
        row["hd95"] = math.nan if distances is None else float(np.percentile(distances, 95))
        row["asd"] = math.nan if distances is None else float(np.mean(distances))
        rows.append(row)

    def nanmean(key: str) -> float:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else math.nan

    per_image_mean = {name: nanmean(name) for name in (*SCORE_NAMES, "hd95", "asd")}
    global_counts = ConfusionCounts(*(int(v) for v in pooled))
    global_scores = {name: _np_score(name, global_counts, tversky_alpha, tversky_beta) for name in SCORE_NAMES}
    undefined = sum(1 for r in rows if math.isnan(r["hd95"]))
    return {
        "n_images": len(rows),
        "per_image_mean": per_image_mean,
        "global": {**global_scores, **global_counts._asdict()},
        "hd95_undefined": undefined,
        "per_image": rows,
    }


# --- Keras metrics ---------------------------------------------------------------------------------


class _SegmentationMetric(keras.metrics.Metric):
    """Thresholded pixel metric accumulated over batches (see module docstring for aggregation)."""

    score_name: str = ""

    def __init__(
        self,
        threshold: float = 0.5,
        aggregation: str = "per_image",
        name: str | None = None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(name=name or self.score_name, dtype=dtype, **kwargs)
        if aggregation not in ("per_image", "global"):
            raise ValueError(f"aggregation must be 'per_image' or 'global', got {aggregation!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.aggregation = aggregation
        # float64 state: pooled pixel counts pass 2**24 within an epoch
        self.score_sum = self.add_variable((), initializer="zeros", dtype="float64", name="score_sum")
        self.image_count = self.add_variable((), initializer="zeros", dtype="float64", name="image_count")
        self.counts = self.add_variable((4,), initializer="zeros", dtype="float64", name="tp_fp_fn_tn")

    def _compute(self, tp, fp, fn, tn):
        return _score(ops, self.score_name, tp, fp, fn, tn)

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.cast(y_true, "float32") > 0.5, "float64")
        pred = ops.cast(ops.cast(y_pred, "float32") > self.threshold, "float64")
        batch = ops.shape(truth)[0]
        truth = ops.reshape(truth, (batch, -1))
        pred = ops.reshape(pred, (batch, -1))
        tp = ops.sum(truth * pred, axis=1)
        fp = ops.sum((1.0 - truth) * pred, axis=1)
        fn = ops.sum(truth * (1.0 - pred), axis=1)
        tn = ops.sum((1.0 - truth) * (1.0 - pred), axis=1)
        weight = ops.ones_like(tp) if sample_weight is None else ops.reshape(ops.cast(sample_weight, "float64"), (-1,))
        weight = ops.broadcast_to(weight, ops.shape(tp))
        scores = self._compute(tp, fp, fn, tn)
        self.score_sum.assign_add(ops.sum(scores * weight))
        self.image_count.assign_add(ops.sum(weight))
        self.counts.assign_add(ops.stack([ops.sum(v * weight) for v in (tp, fp, fn, tn)]))

    def result(self):
        if self.aggregation == "per_image":
            value = ops.where(self.image_count > 0, self.score_sum / ops.maximum(self.image_count, 1.0), 0.0)
        else:
            value = self._compute(*(self.counts[i] for i in range(4)))
        return ops.cast(value, "float32")

    def reset_state(self):
        for variable in (self.score_sum, self.image_count, self.counts):
            variable.assign(ops.zeros(variable.shape, dtype="float64"))

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "aggregation": self.aggregation}


def _register(cls):
    return keras.saving.register_keras_serializable(package="tumorseg")(cls)


@_register
class DiceCoefficient(_SegmentationMetric):
    """Dice of the thresholded prediction (per-image mean by default)."""

    score_name = "dice"


@_register
class IoUScore(_SegmentationMetric):
    """IoU (Jaccard) of the thresholded prediction."""

    score_name = "iou"


@_register
class PixelPrecision(_SegmentationMetric):
    """Precision TP / (TP + FP) of the thresholded prediction."""

    score_name = "precision"


@_register
class PixelRecall(_SegmentationMetric):
    """Recall (sensitivity) TP / (TP + FN) of the thresholded prediction."""

    score_name = "recall"


@_register
class Specificity(_SegmentationMetric):
    """Specificity TN / (TN + FP) of the thresholded prediction."""

    score_name = "specificity"


@_register
class PixelAccuracy(_SegmentationMetric):
    """Pixel accuracy of the thresholded prediction."""

    score_name = "accuracy"


@_register
class TverskyIndex(_SegmentationMetric):
    """Tversky index TP / (TP + alpha FP + beta FN) of the thresholded prediction."""

    score_name = "tversky"

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def _compute(self, tp, fp, fn, tn):
        return _score(ops, "tversky", tp, fp, fn, tn, self.alpha, self.beta)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


_METRIC_CLASSES: dict[str, Callable[..., _SegmentationMetric]] = {
    "dice": DiceCoefficient,
    "iou": IoUScore,
    "precision": PixelPrecision,
    "recall": PixelRecall,
    "specificity": Specificity,
    "accuracy": PixelAccuracy,
    "tversky": TverskyIndex,
}


def segmentation_metrics(
    threshold: float = 0.5,
    aggregation: str = "per_image",
    tversky_alpha: float = 0.3,
    tversky_beta: float = 0.7,
) -> list[_SegmentationMetric]:
    """All seven training metrics (named dice, iou, precision, recall, specificity, accuracy,
    tversky) for ``model.compile(metrics=...)``."""
    metrics = []
    for name, cls in _METRIC_CLASSES.items():
        extra = {"alpha": tversky_alpha, "beta": tversky_beta} if name == "tversky" else {}
        metrics.append(cls(threshold=threshold, aggregation=aggregation, **extra))
    return metrics
