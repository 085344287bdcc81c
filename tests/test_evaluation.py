"""Scoring: original-resolution masks, flip TTA, post-processing tuned on validation, per-class and
per-size breakdowns (known values with stub models, no training needed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from helpers import PROJECT_ROOT, blob_pair, write_pair
from tumorseg.config import load_config
from tumorseg.data.sources import read_labels
from tumorseg.evaluation import LabelledImages, breakdowns, evaluate_split, load_scoring_split, tune_postprocessing
from tumorseg.inference import PostProcessing, PredictedSplit, Predictor, remove_small_components
from tumorseg.inference.cache import mean_of, predict_timed
from tumorseg.losses import combined_loss
from tumorseg.metrics import dice
from tumorseg.pipeline.prepare import prepare_step
from tumorseg.reporting import compare_models

CFG = load_config(PROJECT_ROOT / "params.yaml")


class Rule:
    """A stub back-end: ``rule(batch)`` at its own input size."""

    name = "stub"

    def __init__(self, size: int, rule) -> None:
        self.input_size, self.rule = size, rule

    def __call__(self, batch):
        return np.asarray(self.rule(np.asarray(batch)), np.float32)


def bright_pixels(size: int = 32) -> Rule:
    """Calls every pixel brighter than 150 tumour: exact on blob_pair images."""
    return Rule(size, lambda x: x > 150)


def column_ramp(size: int) -> Rule:
    """Output = column index / width, whatever the input: tells a mirrored pass from a plain one."""
    return Rule(size, lambda x: np.broadcast_to((np.arange(x.shape[2], dtype="float32") / x.shape[2])[None, None, :, None], x.shape).copy())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Raw 64x64 pairs prepared at 32x32, with a labels file: the models see 32², truth is 64²."""
    root = tmp_path_factory.mktemp("scoring")
    for index in range(1, 61):
        write_pair(root / "raw", f"{index}.png", *blob_pair(64, index))
    labels = pd.DataFrame({"file": [f"{i}.png" for i in range(1, 61)], "tumour_type": ["glioma" if i <= 30 else "meningioma" for i in range(1, 61)]})
    labels.to_csv(root / "raw" / "labels.csv", index=False)
    prepare_step(CFG, root / "raw" / "images", root / "raw" / "masks", root / "prepared", progress=False, size=32)
    return root


def _split(project: Path, split: str, resolution: str) -> LabelledImages:
    return load_scoring_split(project / "prepared" / split, resolution, manifest_path=project / "prepared" / "manifest.csv", raw_dir=project / "raw")


def _evaluate(project: Path, model, *, resolution: str, tta: bool = False, threshold: float = 0.5, min_component_px: int = 0, tune: bool = False, labels=None):
    predictor = Predictor(model, tta=tta, batch_size=8)
    evaluation = evaluate_split(
        lambda split: predict_timed(predictor, split.names, split.images),
        _split(project, "test", resolution),
        post=PostProcessing(threshold, min_component_px),
        val=_split(project, "val", resolution) if tune else None,
        loss_fn=combined_loss(CFG.loss),
        labels=labels,
        tta=tta,
    )
    return evaluation.metrics, evaluation.per_image, evaluation


def test_original_resolution_scores_against_the_raw_masks(project: Path):
    metrics, per_image, evaluation = _evaluate(project, bright_pixels(), resolution="original")
    raw_pixels = [int((cv2.imread(str(project / "raw" / "masks" / name), cv2.IMREAD_GRAYSCALE) > 127).sum()) for name in per_image["file"]]
    assert per_image["truth_pixels"].tolist() == raw_pixels  # 64² truths, not the 32² resized ones
    assert metrics["resolution"] == "original" and evaluation.scored.images[0].shape == (64, 64)  # the raw image, as a user gives it
    assert 0.85 < metrics["dice"] < 1.0  # a 32² prediction at 64²: close to, but not exactly, the truth
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0

    prepared, per_image_32, _ = _evaluate(project, bright_pixels(), resolution="prepared")
    assert prepared["resolution"] == "prepared" and prepared["dice"] > 0.85
    assert (per_image_32["truth_pixels"] < per_image["truth_pixels"]).all()


def test_flip_tta_averages_the_mirrored_prediction():
    images = [np.zeros((8, 8), np.uint8)] * 2
    plain = Predictor(column_ramp(8)).probability_maps(images)
    tta = Predictor(column_ramp(8), tta=True).probability_maps(images)
    assert plain[0][0] == pytest.approx(np.arange(8) / 8)
    assert tta[0] == pytest.approx(np.full((8, 8), 7 / 16))  # (j + (7 - j)) / 2 / 8 everywhere


def test_small_components_are_removed_and_large_ones_kept():
    mask = np.zeros((40, 40), bool)
    mask[2:4, 2:4] = True  # 4 px
    mask[20:30, 20:30] = True  # 100 px
    cleaned = remove_small_components(mask, 10)
    assert cleaned.sum() == 100 and cleaned[25, 25] and not cleaned[3, 3]
    assert remove_small_components(mask, 0).sum() == 104


def test_tuning_finds_the_threshold_and_blob_size_that_fit_validation():
    truth = np.zeros((40, 40), bool)
    truth[10:20, 10:20] = True
    probability = np.where(truth, 0.45, 0.05).astype("float32")
    probability[30:35, 30:35] = 0.9  # a confident 25 px false positive
    best = tune_postprocessing([probability], [truth])
    assert best["threshold"] < 0.45 and 25 < best["min_component_px"] <= 100
    assert best["dice"] == pytest.approx(1.0)
    assert dice(truth, probability > 0.5) == 0.0  # the default cut would have found nothing right


def test_breakdowns_by_class_and_size_have_known_values():
    per_image = pd.DataFrame({
        "dice": [1.0, 0.8, 0.0, 0.6, 0.4, 0.2],
        "tumour_fraction": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
        "tumour_type": ["glioma", "glioma", "pituitary", "pituitary", "meningioma", None],
    })
    out = breakdowns(per_image)
    assert out["dice_by_class"] == pytest.approx({"glioma": 0.9, "pituitary": 0.3, "meningioma": 0.4})
    assert out["n_by_class"] == {"glioma": 2, "pituitary": 2, "meningioma": 1}
    assert out["dice_by_size"] == pytest.approx({"small": 0.9, "medium": 0.3, "large": 0.3})


def test_evaluation_with_labels_and_validation_tuning_reports_everything(project: Path):
    labels = read_labels("auto", project / "raw")
    metrics, per_image, _ = _evaluate(project, bright_pixels(), resolution="original", labels=labels, tune=True, tta=True)
    assert metrics["tuned_on"] == "val" and metrics["val_dice_tuned"] > 0.85
    assert set(metrics["dice_by_class"]) <= {"glioma", "meningioma"}
    for cls, value in metrics["dice_by_class"].items():
        assert value == pytest.approx(per_image.loc[per_image["tumour_type"] == cls, "dice"].mean())
    assert set(metrics["dice_by_size"]) == {"small", "medium", "large"}
    markdown, _ = compare_models({"unet": metrics | {"params_total": 1, "ms_per_step": 1.0}}, "SYNTHETIC phantoms", "")
    assert "## Dice by tumour type and size" in markdown and "small tumours" in markdown


def test_labels_file_errors_name_the_problem(tmp_path: Path):
    assert read_labels("none", tmp_path) is None
    assert read_labels("auto", tmp_path) is None  # no labels.csv shipped: per-class scores are skipped
    with pytest.raises(FileNotFoundError, match="evaluate.labels"):
        read_labels(str(tmp_path / "missing.csv"), tmp_path)
    (tmp_path / "bad.csv").write_text("file,kind\n1.png,glioma\n")
    with pytest.raises(ValueError, match="tumour_type"):
        read_labels(str(tmp_path / "bad.csv"), tmp_path)


def test_an_ensemble_is_scored_as_the_mean_of_its_members(project: Path):
    bright = bright_pixels(32)
    blind = Rule(16, np.zeros_like)  # another input size: resized in and out
    alone, _, _ = _evaluate(project, bright, resolution="prepared", threshold=0.4)
    mean_low, _, _ = _evaluate(project, [bright, blind], resolution="prepared", threshold=0.4)  # mean = 0.5 where bright
    mean_high, _, _ = _evaluate(project, [bright, blind], resolution="prepared", threshold=0.5)
    assert alone["dice"] > 0.85 and mean_low["dice"] == pytest.approx(alone["dice"], abs=0.02)
    assert mean_high["dice"] == pytest.approx(0.0, abs=1e-6)  # 0.5 is not > 0.5: nothing found


def test_ensemble_maps_are_the_mean_of_the_members_on_the_same_images():
    a = PredictedSplit(["1.png", "2.png"], [np.full((4, 4), 0.2, np.float32)] * 2, 3.0)
    b = PredictedSplit(["1.png", "2.png"], [np.full((4, 4), 0.6, np.float32)] * 2, 5.0)
    both = mean_of([a, b])
    assert np.allclose(both.probabilities, 0.4) and both.ms_per_image == 8.0 and both.names == a.names
    with pytest.raises(ValueError, match="different images"):
        mean_of([a, PredictedSplit(["2.png", "1.png"], b.probabilities, 5.0)])


def test_a_model_built_for_another_input_size_is_scored_through_resizing(project: Path):
    metrics, _, evaluation = _evaluate(project, _threshold_model(16), resolution="original")
    assert evaluation.masks[0].shape == (64, 64)  # at the raw image's size
    assert metrics["dice"] > 0.7  # a 16² view of 64² truths: coarse, but it finds the blobs


def _threshold_model(size: int):
    """A Keras model at ``size``² that calls pixels brighter than ~150 tumour."""
    import keras

    inputs = keras.Input((size, size, 1), name="image")
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 0.5, np.float32), np.array([-75.0], np.float32)])
    return model


@pytest.mark.slow  # the whole evaluate step, with MLflow
def test_evaluate_step_scores_outside_models_and_their_ensemble_into_runs_of_their_own(project: Path, tmp_path: Path, monkeypatch):
    """Models not trained by this pipeline (no metrics/train_*.json, e.g. the shipped weights)."""
    import mlflow

    from tumorseg.pipeline.evaluate import evaluate_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = tmp_path / "models"
    models.mkdir()
    _threshold_model(32).save(models / "unet.keras")
    _threshold_model(16).save(models / "umobilenetv2.keras")  # trained at another size: resized
    cfg = CFG.model_copy(update={"image_size": 32})
    kwargs = dict(
        prepared_dir=project / "prepared",
        models_dir=models,
        metrics_dir=tmp_path / "metrics",
        reports_dir=tmp_path / "reports",
        raw_dir=project / "raw",
    )
    results = evaluate_step(cfg, ["unet", "umobilenetv2"], **kwargs)
    assert list(results) == ["unet", "umobilenetv2", "ensemble"]
    assert all(r["dice"] > 0.7 for r in results.values()) and results["ensemble"]["members"] == ["unet", "umobilenetv2"]
    assert (tmp_path / "metrics" / "evaluate_ensemble.json").is_file() and "dice_by_class" in results["ensemble"]
    # scored from the members' own maps, exactly as the ensemble predictor would predict again
    ensemble = Predictor.load([models / "unet.keras", models / "umobilenetv2.keras"], batch_size=cfg.batch_size)
    direct, _, _ = _evaluate(project, ensemble.members, resolution=cfg.evaluate.resolution, threshold=cfg.evaluate.threshold)
    assert results["ensemble"]["dice"] == pytest.approx(direct["dice"], abs=1e-6) and results["ensemble"]["hd95"] == pytest.approx(direct["hd95"], abs=1e-6)

    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tumorseg").experiment_id])
    by_model = {r.data.tags["model"]: r for r in runs}
    assert sorted(by_model) == ["ensemble", "umobilenetv2", "unet"]
    assert by_model["unet"].data.tags["model_file"].endswith("unet.keras") and "test_dice" in by_model["unet"].data.metrics
    assert by_model["ensemble"].data.tags["member_run_unet"] == by_model["unet"].info.run_id
    evaluate_step(cfg, ["unet", "umobilenetv2"], **kwargs)  # the same files re-scored: the same runs
    assert len(client.search_runs([client.get_experiment_by_name("tumorseg").experiment_id])) == 3
