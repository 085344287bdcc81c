"""Evaluation metrics (numpy) and training metrics (Keras) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tumorseg import metrics as M

# 4x4 truth (4 tumour pixels) and prediction (5 pixels): TP 3, FP 2, FN 1, TN 10.
TRUTH = np.array(
    [
        [0, 0, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
    ],
    dtype=np.uint8,
)
PRED = np.array(
    [
        [1, 0, 0, 0],
        [0, 1, 1, 1],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ],
    dtype=np.uint8,
)


def test_confusion_counts_by_hand():
    assert M.confusion_counts(TRUTH, PRED) == (3, 2, 1, 10)
    # bool, 0/255 and probability inputs mean the same masks
    assert M.confusion_counts(TRUTH.astype(bool), PRED * 255) == (3, 2, 1, 10)
    assert M.confusion_counts(TRUTH, np.where(PRED > 0, 0.9, 0.2)) == (3, 2, 1, 10)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (M.dice, 6 / 9),
        (M.iou, 3 / 6),
        (M.precision, 3 / 5),
        (M.recall, 3 / 4),
        (M.specificity, 10 / 12),
        (M.accuracy, 13 / 16),
        (M.tversky_index, 3 / (3 + 0.3 * 2 + 0.7 * 1)),
    ],
)
def test_scores_by_hand(function, expected):
    assert function(TRUTH, PRED) == pytest.approx(expected)


def test_tversky_alpha_beta_are_fp_and_fn_weights():
    assert M.tversky_index(TRUTH, PRED, alpha=1.0, beta=0.0) == pytest.approx(3 / 5)  # = precision
    assert M.tversky_index(TRUTH, PRED, alpha=0.0, beta=1.0) == pytest.approx(3 / 4)  # = recall
    assert M.tversky_index(TRUTH, PRED, alpha=0.5, beta=0.5) == pytest.approx(M.dice(TRUTH, PRED))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice(TRUTH, PRED[:3])


def test_empty_truth_and_empty_prediction_is_perfect():
    empty = np.zeros((5, 5), bool)
    for function in (M.dice, M.iou, M.precision, M.recall, M.specificity, M.accuracy, M.tversky_index):
        assert function(empty, empty) == 1.0
    assert math.isnan(M.hd95(empty, empty))
    assert math.isnan(M.average_surface_distance(empty, empty))


def test_empty_truth_with_false_positives_scores_zero():
    empty = np.zeros((5, 5), bool)
    pred = empty.copy()
    pred[2, 2] = True
    assert M.dice(empty, pred) == 0.0
    assert M.iou(empty, pred) == 0.0
    assert M.precision(empty, pred) == 0.0
    assert M.recall(empty, pred) == 0.0
    assert M.specificity(empty, pred) == pytest.approx(24 / 25)
    assert math.isnan(M.hd95(empty, pred))


def test_missed_tumour_scores_zero():
    truth = np.zeros((5, 5), bool)
    truth[1:3, 1:3] = True
    nothing = np.zeros_like(truth)
    assert M.dice(truth, nothing) == 0.0
    assert M.recall(truth, nothing) == 0.0
    assert M.precision(truth, nothing) == 0.0
    assert M.specificity(truth, nothing) == 1.0
    assert math.isnan(M.hd95(truth, nothing))


def test_full_masks():
    full = np.ones((6, 6), bool)
    assert M.dice(full, full) == 1.0
    assert M.specificity(full, full) == 1.0  # TN + FP = 0, prediction exact
    assert M.hd95(full, full) == 0.0
    half = full.copy()
    half[:, 3:] = False
    assert M.specificity(full, half) == 0.0  # TN + FP = 0, prediction wrong
    assert M.dice(full, half) == pytest.approx(2 * 18 / (36 + 18))


def _square(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_surface_distances_single_pixels():
    truth = _square((8, 8), (2, 3), (2, 3))
    pred = _square((8, 8), (2, 3), (5, 6))  # 3 columns to the right
    assert M.hd95(truth, pred) == pytest.approx(3.0)
    assert M.average_surface_distance(truth, pred) == pytest.approx(3.0)
    # anisotropic pixel size (rows 2, columns 0.5): the offset is along columns
    assert M.hd95(truth, pred, spacing=(2.0, 0.5)) == pytest.approx(1.5)


def test_hd95_shifted_square_by_hand():
    # 3x3 squares shifted by one column. Surfaces (4-connected erosion) = the 8 border pixels.
    # pred surface -> truth surface: 0,0,1,1,1,0,0,1 ; truth surface -> pred surface: the mirror.
    # 16 distances: 8 zeros and 8 ones -> 95th percentile 1, mean 0.5.
    truth = _square((8, 8), (1, 4), (1, 4))
    pred = _square((8, 8), (1, 4), (2, 5))
    assert M.hd95(truth, pred) == pytest.approx(1.0)
    assert M.average_surface_distance(truth, pred) == pytest.approx(0.5)
    assert M.hd95(truth, pred, spacing=2.0) == pytest.approx(2.0)
    assert M.average_surface_distance(truth, pred, spacing=2.0) == pytest.approx(1.0)


def test_hd95_is_the_interpolated_95th_percentile():
    # Same square plus one stray predicted pixel 4 columns from the truth surface:
    # 17 distances = 16 zeros and one 4. numpy's linear 95th percentile: rank 0.95*16 = 15.2
    # -> 0 + 0.2 * (4 - 0) = 0.8; ASD = 4 / 17. The maximum (plain Hausdorff) would be 4.
    truth = _square((8, 8), (1, 4), (1, 4))
    pred = truth.copy()
    pred[1, 7] = True
    assert M.hd95(truth, pred) == pytest.approx(0.8)
    assert M.average_surface_distance(truth, pred) == pytest.approx(4 / 17)


def test_surface_distance_accepts_channel_axis():
    truth = _square((8, 8), (1, 4), (1, 4))[..., None]
    pred = _square((8, 8), (1, 4), (2, 5))[..., None]
    assert M.hd95(truth, pred) == pytest.approx(1.0)


def _big_and_tiny():
    """Image 0: 100-pixel tumour found exactly. Image 1: 1-pixel tumour missed (nothing predicted)."""
    truths = np.zeros((2, 16, 16), bool)
    truths[0, 2:12, 2:12] = True
    truths[1, 8, 8] = True
    preds = np.zeros_like(truths)
    preds[0] = truths[0]
    return truths, preds


def test_evaluate_masks_per_image_and_global_differ():
    truths, preds = _big_and_tiny()
    result = M.evaluate_masks(truths, preds)
    assert result["n_images"] == 2
    assert result["per_image_mean"]["dice"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert result["global"]["dice"] == pytest.approx(200 / 201)  # pooled: TP 100, FN 1
    assert result["global"]["recall"] == pytest.approx(100 / 101)
    assert result["per_image_mean"]["recall"] == pytest.approx(0.5)
    assert (result["global"]["tp"], result["global"]["fn"], result["global"]["fp"]) == (100, 1, 0)
    # image 1 has an empty prediction -> its HD95 is undefined, excluded from the mean
    assert result["hd95_undefined"] == 1
    assert result["per_image_mean"]["hd95"] == 0.0
    rows = result["per_image"]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[0]["dice"] == 1.0 and rows[1]["dice"] == 0.0
    assert math.isnan(rows[1]["hd95"]) and math.isnan(rows[1]["asd"])
    assert rows[1]["truth_pixels"] == 1 and rows[1]["pred_pixels"] == 0


def test_evaluate_masks_matches_single_image_functions():
    rng = np.random.default_rng(0)
    truths = rng.random((3, 12, 12, 1)) > 0.6
    preds = rng.random((3, 12, 12, 1)) > 0.5
    result = M.evaluate_masks(truths, preds, tversky_alpha=0.2, tversky_beta=0.8)
    for i, row in enumerate(result["per_image"]):
        assert row["dice"] == pytest.approx(M.dice(truths[i], preds[i]))
        assert row["tversky"] == pytest.approx(M.tversky_index(truths[i], preds[i], 0.2, 0.8))
        assert row["hd95"] == pytest.approx(M.hd95(truths[i], preds[i]))
        assert row["asd"] == pytest.approx(M.average_surface_distance(truths[i], preds[i]))
    assert result["per_image_mean"]["iou"] == pytest.approx(np.mean([M.iou(t, p) for t, p in zip(truths, preds)]))
    assert result["global"]["iou"] == pytest.approx(M.iou(truths, preds))  # pooled = one big image


def test_evaluate_masks_all_undefined_hd95_is_nan_without_warning():
    empty = np.zeros((2, 8, 8), bool)
    with np.errstate(all="raise"):
        result = M.evaluate_masks(empty, empty)
    assert result["hd95_undefined"] == 2
    assert math.isnan(result["per_image_mean"]["hd95"])
    assert result["per_image_mean"]["dice"] == 1.0


def test_evaluate_masks_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="truths"):
        M.evaluate_masks(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))


# --- Keras metrics --------------------------------------------------------------------------------


def _keras_batch():
    rng = np.random.default_rng(3)
    truths = (rng.random((6, 16, 16, 1)) > 0.7).astype("float32")
    probs = rng.random((6, 16, 16, 1)).astype("float32")
    truths[0] = 0.0  # empty truth, empty prediction -> scores 1
    probs[0] = 0.1
    truths[1] = 0.0  # empty truth with false positives -> Dice 0
    probs[1, 3, 3] = 0.9
    return truths, probs


@pytest.mark.parametrize("aggregation", ["per_image", "global"])
def test_keras_metrics_agree_with_numpy(aggregation):
    truths, probs = _keras_batch()
    expected = M.evaluate_masks(truths, probs > 0.5, surface=False)
    key = "per_image_mean" if aggregation == "per_image" else "global"
    for metric in M.segmentation_metrics(aggregation=aggregation):
        metric.update_state(truths[:4], probs[:4])  # two batches accumulate
        metric.update_state(truths[4:], probs[4:])
        assert float(metric.result()) == pytest.approx(expected[key][metric.name], abs=1e-6), metric.name


def test_keras_per_image_and_global_differ_and_reset():
    truths, preds = _big_and_tiny()
    truths, preds = truths[..., None].astype("float32"), preds[..., None].astype("float32")
    per_image = M.DiceCoefficient()
    pooled = M.DiceCoefficient(aggregation="global")
    per_image.update_state(truths, preds)
    pooled.update_state(truths, preds)
    assert float(per_image.result()) == pytest.approx(0.5)
    assert float(pooled.result()) == pytest.approx(200 / 201)
    per_image.reset_state()
    per_image.update_state(truths[:1], preds[:1])
    assert float(per_image.result()) == pytest.approx(1.0)


def test_keras_metric_threshold():
    truth = np.ones((1, 2, 2, 1), "float32")
    probs = np.array([0.4, 0.6, 0.6, 0.6], "float32").reshape(1, 2, 2, 1)
    recall = M.PixelRecall()
    recall.update_state(truth, probs)
    assert float(recall.result()) == pytest.approx(0.75)
    strict = M.PixelRecall(threshold=0.7)
    strict.update_state(truth, probs)
    assert float(strict.result()) == pytest.approx(0.0)


def test_keras_metrics_serialize():
    import keras

    metric = M.TverskyIndex(alpha=0.2, beta=0.8, aggregation="global", threshold=0.4)
    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(clone) is M.TverskyIndex
    assert (clone.alpha, clone.beta, clone.aggregation, clone.threshold) == (0.2, 0.8, "global", 0.4)
    with pytest.raises(ValueError, match="aggregation"):
        M.DiceCoefficient(aggregation="mean")
