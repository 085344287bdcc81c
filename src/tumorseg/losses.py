"""Segmentation losses: BCE, soft Dice, Tversky, focal BCE and their weighted sum (the reference
loss is the first three).

All functions take ``y_true`` (binary masks, 0/1, or soft targets in [0, 1] under knowledge
distillation: every formula below holds for them) and ``y_pred`` (sigmoid probabilities) of shape
``(N, H, W, 1)`` (any ``(N, ...)`` works) and return ONE LOSS PER IMAGE, shape ``(N,)``; Keras then
averages over the batch (``reduction="sum_over_batch_size"``). So Dice and Tversky are computed
per image and then averaged over the batch - not pooled over the batch's pixels - and every image
weighs the same whatever its tumour size.

With p = y_pred clipped to [eps, 1 - eps] (eps = 1e-7), t = y_true, sums over one image's pixels:

* BCE:      mean_pixels( -[t log p + (1 - t) log(1 - p)] )
* Dice:     1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)
* Tversky:  1 - (TP + s) / (TP + alpha FP + beta FN + s),
            TP = sum(p t), FP = sum(p (1 - t)), FN = sum((1 - p) t)
            (alpha weighs false positives, beta false negatives; alpha = beta = 0.5 is Dice)
* Focal:    mean_pixels( (1 - p_t)^gamma * BCE ), p_t = p where t = 1 else 1 - p (Lin et al. 2017,
            Keras' ``binary_focal_crossentropy``); gamma = 0 is BCE
* Boundary: sum(b * BCE) / max(sum(b), 1), b = dilate_k(t) - erode_k(t) with k = 2 width + 1
            (grey-scale max/min over a k x k window): BCE over the band of pixels within
            ``width`` of the mask's outline, inside and out, so the outline weighs as much as
            the bulk whatever the tumour's size; 0 for a mask without an outline (empty or full).
            Needs ``(N, H, W, C)``.
* Combined: bce_weight * BCE + dice_weight * Dice + tversky_weight * Tversky + focal_weight * Focal
            + boundary_weight * Boundary

The smoothing ``s`` (default 1) keeps Dice/Tversky finite and their gradients defined on empty
masks and empty predictions: an all-zero mask predicted all-zero gives loss 0, not 0/0.
"""

from __future__ import annotations

import keras
from keras import ops

from tumorseg.config import LossConfig

__all__ = ["CombinedLoss", "EPSILON", "bce_loss", "boundary_band", "boundary_loss", "combined_loss", "dice_loss", "focal_loss", "tversky_loss"]

EPSILON = 1e-7


def _prepare(y_true, y_pred):
    y_pred = ops.clip(ops.cast(y_pred, "float32"), EPSILON, 1.0 - EPSILON)
    y_true = ops.cast(y_true, "float32")
    axes = tuple(range(1, len(y_pred.shape)))
    return y_true, y_pred, axes


def _pixel_bce(y_true, y_pred):
    """Binary cross-entropy of each pixel (inputs as :func:`_prepare` returns them)."""
    return -(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))


def bce_loss(y_true, y_pred):
    """Binary cross-entropy on probabilities, mean over each image's pixels -> shape ``(N,)``."""
    y_true, y_pred, axes = _prepare(y_true, y_pred)
    return ops.mean(_pixel_bce(y_true, y_pred), axis=axes)


def dice_loss(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice loss per image: ``1 - (2 sum(pt) + s) / (sum(p) + sum(t) + s)`` -> ``(N,)``."""
    y_true, y_pred, axes = _prepare(y_true, y_pred)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def tversky_loss(y_true, y_pred, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0):
    """Tversky loss per image: ``1 - (TP + s) / (TP + alpha FP + beta FN + s)`` -> ``(N,)``.

    ``alpha`` weighs false positives, ``beta`` false negatives (beta > alpha favours recall).
    """
    y_true, y_pred, axes = _prepare(y_true, y_pred)
    tp = ops.sum(y_true * y_pred, axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    return 1.0 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def focal_loss(y_true, y_pred, gamma: float = 2.0):
    """Focal BCE, mean over each image's pixels -> ``(N,)``. Pixels the model already gets right
    (most of the background) weigh ``(1 - p_t)^gamma`` less, so hard pixels count for more."""
    y_true, y_pred, axes = _prepare(y_true, y_pred)
    # Keras reduces the last axis: give it a length-1 axis to reduce, keeping one value per pixel.
    pixel = keras.losses.binary_focal_crossentropy(y_true[..., None], y_pred[..., None], gamma=gamma)
    return ops.mean(pixel, axis=axes)


def boundary_band(y_true, width: int = 2):
    """The band within ``width`` pixels of the mask's outline, inside and out: grey-scale dilation
    minus erosion over a ``(2 width + 1)``-pixel square window, per channel -> ``(N, H, W, C)``."""
    y_true = ops.cast(y_true, "float32")
    size = 2 * int(width) + 1
    dilated = ops.max_pool(y_true, pool_size=size, strides=1, padding="same")
    eroded = -ops.max_pool(-y_true, pool_size=size, strides=1, padding="same")
    return dilated - eroded


def boundary_loss(y_true, y_pred, width: int = 2):
    """BCE over the band around the mask's outline, ``sum(band * BCE) / max(sum(band), 1)`` per
    image -> ``(N,)``. Where the shipped pair finds a glioma it loses its Dice at the outline
    (docs/levers.md: glioma median Dice 0.73); this term weighs the outline like the bulk,
    whatever the tumour's size. An image whose mask has no outline scores 0."""
    y_true, y_pred, axes = _prepare(y_true, y_pred)
    band = boundary_band(y_true, width)
    return ops.sum(band * _pixel_bce(y_true, y_pred), axis=axes) / ops.maximum(ops.sum(band, axis=axes), 1.0)


@keras.saving.register_keras_serializable(package="tumorseg")
class CombinedLoss(keras.losses.Loss):
    """``bce_weight * BCE + dice_weight * Dice + tversky_weight * Tversky + focal_weight * Focal
    + boundary_weight * Boundary`` (per image, batch mean).

    Parameters are exactly ``LossConfig``'s; a term with weight 0 is not computed. The boundary
    settings have defaults so that checkpoints compiled before they existed still load.
    """

    def __init__(
        self,
        *,
        bce_weight: float,
        dice_weight: float,
        tversky_weight: float,
        tversky_alpha: float,
        tversky_beta: float,
        smooth: float,
        focal_weight: float,
        focal_gamma: float,
        boundary_weight: float = 0.0,
        boundary_width: int = 2,
        name: str = "combined_loss",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        # The rules (ranges, at least one term) are LossConfig's: one place, also for a loss
        # deserialised from a saved model.
        settings = LossConfig(
            bce_weight=bce_weight,
            dice_weight=dice_weight,
            tversky_weight=tversky_weight,
            tversky_alpha=tversky_alpha,
            tversky_beta=tversky_beta,
            smooth=smooth,
            focal_weight=focal_weight,
            focal_gamma=focal_gamma,
            boundary_weight=boundary_weight,
            boundary_width=boundary_width,
        )
        for key, value in settings.model_dump().items():
            setattr(self, key, int(value) if key == "boundary_width" else float(value))

    def call(self, y_true, y_pred):
        total = 0.0
        if self.bce_weight:
            total = total + self.bce_weight * bce_loss(y_true, y_pred)
        if self.dice_weight:
            total = total + self.dice_weight * dice_loss(y_true, y_pred, self.smooth)
        if self.tversky_weight:
            total = total + self.tversky_weight * tversky_loss(
                y_true, y_pred, self.tversky_alpha, self.tversky_beta, self.smooth
            )
        if self.focal_weight:
            total = total + self.focal_weight * focal_loss(y_true, y_pred, self.focal_gamma)
        if self.boundary_weight:
            total = total + self.boundary_weight * boundary_loss(y_true, y_pred, self.boundary_width)
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "bce_weight": self.bce_weight,
            "dice_weight": self.dice_weight,
            "tversky_weight": self.tversky_weight,
            "tversky_alpha": self.tversky_alpha,
            "tversky_beta": self.tversky_beta,
            "smooth": self.smooth,
            "focal_weight": self.focal_weight,
            "focal_gamma": self.focal_gamma,
            "boundary_weight": self.boundary_weight,
            "boundary_width": self.boundary_width,
        }


def combined_loss(settings=None, /, **overrides: float) -> CombinedLoss:
    """The loss of a ``loss:`` section (a :class:`~tumorseg.config.LossConfig`; its defaults, the
    reference BCE + Dice + Tversky, are written there only), with single fields overridden by
    keyword: ``combined_loss(cfg.loss)``, ``combined_loss(dice_weight=0.5)``."""
    base = LossConfig() if settings is None else settings
    return CombinedLoss(**(base.model_dump() | overrides))
