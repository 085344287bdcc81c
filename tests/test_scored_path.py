"""What is scored is what ships: the per-image Dice that the evaluate stage writes equals the Dice
of the masks ``tumorseg predict`` writes for the same images with the same settings (to 1e-6).

Once with stub models on generated data (always), once with the shipped weights on real Figshare
slices (skipped without ../shared).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from helpers import PROJECT_ROOT, blob_pair, shared_dataset, write_pair
from tumorseg.cli import main as tumorseg
from tumorseg.config import load_config
from tumorseg.io import read_metrics
from tumorseg.metrics import dice
from tumorseg.pipeline.evaluate import evaluate_step
from tumorseg.pipeline.prepare import prepare_step

CFG = load_config(PROJECT_ROOT / "params.yaml")


def _threshold_model(size: int, bias: float):
    """A Keras model at ``size``² calling pixels brighter than about ``-bias / 0.05`` tumour, with soft edges."""
    import keras

    inputs = keras.Input((size, size, 1), name="image")
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 1] = 0.03
    kernel[1, 2] = 0.02  # not symmetric: flip TTA changes the maps
    conv.set_weights([kernel, np.array([bias], np.float32)])
    return model


def _predicted_dice(tmp_path: Path, models: list[Path], files: list[Path], masks_dir: Path, metrics: dict, batch_size: int, tag: str) -> list[float]:
    """Run ``tumorseg predict`` on ``files`` with the evaluation's settings; Dice of each mask written."""
    out = tmp_path / f"predicted-{tag}"
    args = [a for model in models for a in ("--model", str(model))]
    args += [
        "--out", str(out),
        "--threshold", str(metrics["threshold"]),
        "--min-component-px", str(metrics["min_component_px"]),
        "--batch-size", str(batch_size),
    ]  # fmt: skip
    if metrics["tta"]:
        args.append("--tta")
    assert tumorseg(["predict", *map(str, files), *args]) == 0
    scores = []
    for file in files:
        mask = cv2.imread(str(out / f"{file.stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        truth = cv2.imread(str(masks_dir / file.name), cv2.IMREAD_GRAYSCALE) > 127
        scores.append(dice(truth, mask))
    return scores


def _assert_scored_equals_predicted(tmp_path: Path, cfg, names: list[str], models_dir: Path, raw: Path, prepared: Path):
    work = tmp_path / "work"
    evaluate_step(cfg, names, prepared_dir=prepared, models_dir=models_dir, metrics_dir=work / "metrics", reports_dir=work / "reports", raw_dir=raw)
    for name in [*names, "ensemble"] if len(names) > 1 else names:
        metrics = read_metrics(work / "metrics" / f"evaluate_{name}.json")
        per_image = pd.read_csv(work / "reports" / f"evaluate_{name}" / "per_image.csv", dtype={"file": str})
        files = [raw / "images" / file for file in per_image["file"]]  # the split's order: the same batches
        models = [models_dir / f"{m}.keras" for m in (names if name == "ensemble" else [name])]
        predicted = _predicted_dice(tmp_path, models, files, raw / "masks", metrics, cfg.batch_size, name)
        assert np.abs(np.array(predicted) - per_image["dice"].to_numpy()).max() <= 1e-6, name
        assert np.mean(predicted) == pytest.approx(metrics["dice"], abs=1e-6), name


def test_evaluate_scores_exactly_the_masks_predict_writes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tmp_path / "raw"
    for index in range(1, 41):
        write_pair(raw, f"{index}.png", *blob_pair(80 if index % 3 else 64, index))  # two raw sizes
    cfg = CFG.model_copy(update={"prepare": CFG.prepare.model_copy(update={"group_by": "none"})})
    prepare_step(cfg, raw / "images", raw / "masks", tmp_path / "prepared", progress=False, size=32)
    models = tmp_path / "models"
    models.mkdir()
    _threshold_model(32, -7.0).save(models / "unet.keras")
    _threshold_model(64, -6.5).save(models / "umobilenetv2.keras")  # another input size than image_size
    evaluate = CFG.evaluate.model_copy(update={"tta": True, "tune_on_val": True, "resolution": "original"})
    cfg = cfg.model_copy(update={"image_size": 32, "batch_size": 4, "evaluate": evaluate})
    _assert_scored_equals_predicted(tmp_path, cfg, ["unet", "umobilenetv2"], models, raw, tmp_path / "prepared")


@pytest.mark.slow
@pytest.mark.shared
def test_shipped_weights_score_what_predict_writes_on_real_slices(tmp_path: Path, monkeypatch):
    """The shipped pair on 60 real Figshare slices prepared at the shipped models' 128² input."""
    root = shared_dataset("figshare-256")
    weights = PROJECT_ROOT / "weights"
    shipped = {"unet": weights / "unet-figshare.keras", "umobilenetv2": weights / "umobilenetv2-figshare.keras"}
    if not all(path.is_file() for path in shipped.values()):
        pytest.skip("the shipped weights are not in weights/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tmp_path / "raw"
    test_files = (weights / "test_split.txt").read_text().split()[:60]  # never seen in training or selection
    for folder in ("images", "masks"):
        (raw / folder).mkdir(parents=True)
        for file in test_files:
            shutil.copyfile(root / folder / file, raw / folder / file)
    prepare = CFG.prepare.model_copy(update={"group_by": "block:5", "val_fraction": 0.25, "test_fraction": 0.5})
    cfg = CFG.model_copy(update={"image_size": 128, "prepare": prepare, "evaluate": CFG.evaluate.model_copy(update={"tta": True, "tune_on_val": True})})
    prepare_step(cfg, raw / "images", raw / "masks", tmp_path / "prepared", progress=False)
    models = tmp_path / "models"
    models.mkdir()
    for name, path in shipped.items():
        shutil.copyfile(path, models / f"{name}.keras")
    _assert_scored_equals_predicted(tmp_path, cfg, list(shipped), models, raw, tmp_path / "prepared")
