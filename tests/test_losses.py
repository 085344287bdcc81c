"""Losses equal their formulas, stay finite on empty masks/predictions, and serialize."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tumorseg import losses as L

# one image of 4 pixels: t = [1, 1, 0, 0], p = [0.5, 1, 0, 0.5]
T1 = np.array([1, 1, 0, 0], "float32").reshape(1, 2, 2, 1)
P1 = np.array([0.5, 1, 0, 0.5], "float32").reshape(1, 2, 2, 1)


def test_hand_values():
    # BCE: two pixels at p = 0.5 cost ln 2 each, two are (almost) exact -> ln(2) / 2
    assert float(L.bce_loss(T1, P1)[0]) == pytest.approx(np.log(2) / 2, abs=1e-5)
    # Dice: sum(pt) = 1.5, sum(p) = 2, sum(t) = 2 -> 1 - (3 + 1) / (4 + 1) = 0.2
    assert float(L.dice_loss(T1, P1)[0]) == pytest.approx(0.2, abs=1e-5)
    # Tversky: TP 1.5, FP 0.5, FN 0.5 -> 1 - 2.5 / (1.5 + 0.15 + 0.35 + 1) = 1/6
    assert float(L.tversky_loss(T1, P1)[0]) == pytest.approx(1 / 6, abs=1e-5)
    # smoothing changes the value as the formula says
    assert float(L.dice_loss(T1, P1, smooth=0.5)[0]) == pytest.approx(1 - 3.5 / 4.5, abs=1e-5)


def _numpy_losses(t, p, alpha, beta, smooth):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    axes = (1, 2, 3)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(axis=axes)
    tp = (t * p).sum(axis=axes)
    dice = 1 - (2 * tp + smooth) / (t.sum(axis=axes) + p.sum(axis=axes) + smooth)
    fp = ((1 - t) * p).sum(axis=axes)
    fn = (t * (1 - p)).sum(axis=axes)
    tversky = 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return bce, dice, tversky


def test_losses_are_per_image_and_match_numpy():
    rng = np.random.default_rng(1)
    t = (rng.random((3, 8, 8, 1)) > 0.6).astype("float32")
    p = rng.random((3, 8, 8, 1)).astype("float32")
    bce, dice, tversky = _numpy_losses(t, p, 0.2, 0.8, 2.0)
    np.testing.assert_allclose(np.asarray(L.bce_loss(t, p)), bce, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(L.dice_loss(t, p, smooth=2.0)), dice, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(L.tversky_loss(t, p, alpha=0.2, beta=0.8, smooth=2.0)), tversky, rtol=1e-5)
    # the Keras loss object averages the per-image values over the batch
    loss = L.combined_loss(tversky_alpha=0.2, tversky_beta=0.8, smooth=2.0)
    assert float(loss(t, p)) == pytest.approx(float(np.mean(bce + dice + tversky)), rel=1e-5)


def test_tversky_with_equal_weights_is_dice():
    rng = np.random.default_rng(2)
    t = (rng.random((2, 8, 8, 1)) > 0.5).astype("float32")
    p = rng.random((2, 8, 8, 1)).astype("float32")
    # (TP + s) / (TP + FP/2 + FN/2 + s) = (2TP + 2s) / (2TP + FP + FN + 2s): Dice with smoothing 2s
    np.testing.assert_allclose(
        np.asarray(L.tversky_loss(t, p, 0.5, 0.5, smooth=1.0)), np.asarray(L.dice_loss(t, p, smooth=2.0)), rtol=1e-5
    )


def test_combined_is_weighted_sum():
    rng = np.random.default_rng(4)
    t = (rng.random((2, 8, 8, 1)) > 0.5).astype("float32")
    p = rng.random((2, 8, 8, 1)).astype("float32")
    loss = L.combined_loss(bce_weight=0.5, dice_weight=2.0, tversky_weight=1.5, tversky_alpha=0.4, tversky_beta=0.6, smooth=1.0)
    expected = (
        0.5 * np.asarray(L.bce_loss(t, p))
        + 2.0 * np.asarray(L.dice_loss(t, p, 1.0))
        + 1.5 * np.asarray(L.tversky_loss(t, p, 0.4, 0.6, 1.0))
    ).mean()
    assert float(loss(t, p)) == pytest.approx(float(expected), rel=1e-6)
    only_dice = L.combined_loss(bce_weight=0.0, dice_weight=1.0, tversky_weight=0.0)
    assert float(only_dice(t, p)) == pytest.approx(float(np.mean(L.dice_loss(t, p))), rel=1e-6)


@pytest.mark.parametrize(
    ("truth_value", "pred_value"),
    [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.0, 0.5)],
    ids=["empty-mask-empty-pred", "empty-mask-full-pred", "full-mask-empty-pred", "full-full", "empty-mask-half"],
)
def test_no_nan_and_finite_gradients(truth_value, pred_value):
    t = tf.fill((2, 8, 8, 1), truth_value)
    p = tf.Variable(tf.fill((2, 8, 8, 1), pred_value))
    for loss in (L.bce_loss, L.dice_loss, L.tversky_loss, L.combined_loss()):
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(loss(t, p))
        grad = tape.gradient(value, p)
        assert np.isfinite(float(value)), loss
        assert grad is not None and np.all(np.isfinite(grad.numpy())), loss


def test_empty_mask_empty_prediction_costs_nothing():
    zeros = np.zeros((1, 8, 8, 1), "float32")
    assert float(L.dice_loss(zeros, zeros)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(L.tversky_loss(zeros, zeros)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(L.combined_loss()(zeros, zeros)) == pytest.approx(0.0, abs=1e-5)
    # a fully wrong prediction costs close to the maximum
    ones = np.ones_like(zeros)
    assert float(L.dice_loss(zeros, ones)[0]) == pytest.approx(1 - 1 / 65, abs=1e-5)


def test_gradient_pushes_towards_the_mask():
    t = tf.constant(T1)
    p = tf.Variable(tf.fill(T1.shape, 0.5))
    with tf.GradientTape() as tape:
        value = L.combined_loss()(t, p)
    grad = tape.gradient(value, p).numpy().ravel()
    assert np.all(grad[:2] < 0) and np.all(grad[2:] > 0)  # raise p on tumour, lower it elsewhere


def test_invalid_parameters_raise():
    with pytest.raises(ValueError, match="at least one"):
        L.combined_loss(bce_weight=0.0, dice_weight=0.0, tversky_weight=0.0)
    with pytest.raises(ValueError, match="tversky_alpha"):
        L.combined_loss(tversky_alpha=1.5)
    with pytest.raises(ValueError, match="smooth"):
        L.combined_loss(smooth=0.0)
    with pytest.raises(ValueError, match="bce_weight"):
        L.combined_loss(bce_weight=-1)


def test_accepts_loss_config_fields_and_serializes():
    from tumorseg.config import LossConfig

    config = LossConfig(bce_weight=0.5, tversky_alpha=0.4, tversky_beta=0.6, smooth=2.0)
    loss = L.combined_loss(config)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, L.CombinedLoss)
    assert clone.get_config() == loss.get_config()
    assert (clone.bce_weight, clone.tversky_alpha, clone.smooth) == (0.5, 0.4, 2.0)


def test_focal_term_hand_values_and_weight():
    # the two p = 0.5 pixels cost ln 2 * (1 - 0.5)^2 each, the two exact ones ~0 -> ln(2) / 8
    assert float(L.focal_loss(T1, P1, gamma=2.0)[0]) == pytest.approx(np.log(2) / 8, abs=1e-5)
    assert float(L.focal_loss(T1, P1, gamma=0.0)[0]) == pytest.approx(float(L.bce_loss(T1, P1)[0]), abs=1e-5)
    rng = np.random.default_rng(5)
    t = (rng.random((3, 8, 8, 1)) > 0.5).astype("float32")
    p = rng.random((3, 8, 8, 1)).astype("float32")
    assert L.focal_loss(t, p).shape == (3,)
    with_focal = L.combined_loss(focal_weight=2.0, focal_gamma=1.0)
    expected = float(L.combined_loss()(t, p)) + 2.0 * float(np.mean(L.focal_loss(t, p, 1.0)))
    assert float(with_focal(t, p)) == pytest.approx(expected, rel=1e-6)
    only_focal = L.combined_loss(bce_weight=0.0, dice_weight=0.0, tversky_weight=0.0, focal_weight=1.0)
    assert keras.losses.deserialize(keras.losses.serialize(only_focal)).get_config() == only_focal.get_config()
    with pytest.raises(ValueError, match="focal_gamma"):
        L.combined_loss(focal_gamma=-1.0)


def test_boundary_band_and_term_match_their_formula():
    from scipy import ndimage

    mask = np.zeros((1, 12, 12, 1), "float32")
    mask[0, 3:9, 3:9] = 1.0  # a 6x6 square
    band = np.asarray(L.boundary_band(mask, width=1))[0, ..., 0]
    window = np.ones((3, 3))
    expected = ndimage.grey_dilation(mask[0, ..., 0], footprint=window) - ndimage.grey_erosion(mask[0, ..., 0], footprint=window)
    np.testing.assert_array_equal(band, expected)
    assert band.sum() == 8 * 8 - 4 * 4  # one ring outside the square and one inside; the centre 4x4 is not outline

    perfect = np.clip(mask, 1e-7, 1 - 1e-7)
    assert float(L.boundary_loss(mask, perfect, width=1)[0]) == pytest.approx(0.0, abs=1e-5)
    hollow = mask.copy()
    hollow[0, 5:7, 5:7] = 0.0  # wrong in the middle, far from the outline: BCE sees it, the boundary term does not
    assert float(L.boundary_loss(mask, hollow, width=1)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(L.bce_loss(mask, hollow)[0]) > 0.1
    shrunk = mask.copy()
    shrunk[0, 3, 3:9] = 0.5  # the top row of the outline unsure: 6 band pixels at ln 2 over the 48 of the band
    assert float(L.boundary_loss(mask, shrunk, width=1)[0]) == pytest.approx(6 * np.log(2) / 48, abs=1e-5)
    assert float(L.boundary_loss(np.zeros_like(mask), np.full_like(mask, 0.9), width=1)[0]) == 0.0  # no outline: nothing to weigh


def test_boundary_term_adds_with_its_weight_and_serializes():
    rng = np.random.default_rng(6)
    t = np.zeros((2, 16, 16, 1), "float32")
    t[:, 4:10, 5:12] = 1.0
    p = rng.random((2, 16, 16, 1)).astype("float32")
    with_boundary = L.combined_loss(boundary_weight=0.5, boundary_width=3)
    expected = float(L.combined_loss()(t, p)) + 0.5 * float(np.mean(L.boundary_loss(t, p, 3)))
    assert float(with_boundary(t, p)) == pytest.approx(expected, rel=1e-6)
    clone = keras.losses.deserialize(keras.losses.serialize(with_boundary))
    assert clone.get_config() == with_boundary.get_config() and clone.boundary_width == 3
    # a checkpoint compiled before the term existed has no boundary keys: it still loads, term off
    old = {k: v for k, v in L.combined_loss().get_config().items() if not k.startswith("boundary")}
    assert L.CombinedLoss.from_config(old).boundary_weight == 0.0
    with pytest.raises(ValueError, match="boundary_width"):
        L.combined_loss(boundary_weight=1.0, boundary_width=0)
