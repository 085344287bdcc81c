"""Export (TFLite, ONNX) with the automatic check against Keras, and the MLflow registry round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import blob_pair, brightness_model, write_pair
from tumorseg.cli import main
from tumorseg.export import ExportError, export_model, sample_images
from tumorseg.inference import Predictor
from tumorseg.metrics import dice

# Every test here converts a model (TFLite/ONNX) or logs one to the MLflow registry: `make test-fast` skips them.
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def unet_path(tmp_path_factory) -> Path:
    """A tiny hybrid U-Net (HAC blocks) with the output bias set so that about half the pixels of
    the sample images are tumour: many pixels sit near the threshold, a strict test of agreement."""
    import keras

    from tumorseg.models import build_model

    keras.utils.set_random_seed(1)
    model = build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_caspp=False, dropout=0.0)
    images = np.stack(sample_images(32, 4)).astype(np.float32)[..., None]
    probability = np.clip(model.predict(images, verbose=0), 1e-6, 1 - 1e-6)
    kernel, bias = model.get_layer("mask").get_weights()
    model.get_layer("mask").set_weights([kernel, bias - np.median(np.log(probability / (1 - probability)))])
    path = tmp_path_factory.mktemp("unet") / "unet.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def bright_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bright") / "bright.keras"
    brightness_model().save(path)
    return path


def _agreement(reference: Predictor, exported: Predictor, images) -> float:
    return float(np.mean([dice(a.mask > 0, b.mask > 0) for a, b in zip(reference.predict(images), exported.predict(images))]))


def test_tflite_export_matches_keras_and_runs_behind_the_predictor(tmp_path: Path, unet_path: Path):
    out = tmp_path / "unet.tflite"
    result = export_model(str(unet_path), "tflite", out, sample_count=6, timing_repeats=1)
    check = json.loads((tmp_path / "unet.tflite.check.json").read_text())
    assert result.passed and check["passed"] and check["images"] == 6 and check["min_dice"] == 0.99
    assert check["dice_mean"] >= 0.99 and check["size_bytes"] == out.stat().st_size > 0
    assert check["ms_per_image_export"] > 0 and check["ms_per_image_keras"] > 0
    assert 0.2 < check["reference_tumour_pixels"] / (6 * 32 * 32) < 0.8  # non-trivial masks
    reference, exported = Predictor.load(str(unet_path)), Predictor.load(str(out), batch_size=3)
    assert exported.model is None and exported.input_size == 32
    images = [blob_pair(size, seed=size)[0] for size in (32, 50, 24, 64)]  # batches of 3 and 1, resized
    assert _agreement(reference, exported, images) >= 0.99
    for a, b in zip(reference.predict(images), exported.predict(images)):
        assert b.mask.shape == a.mask.shape
        np.testing.assert_allclose(b.probability, a.probability, atol=1e-4)
    assert not list(tmp_path.glob(".*staged*"))


def test_onnx_export_via_the_command(tmp_path: Path, unet_path: Path, capsys):
    out = tmp_path / "models" / "unet.onnx"
    assert main(["export", "--model", str(unet_path), "--format", "onnx", "--out", str(out), "--samples", "6"]) == 0
    assert "mask Dice vs Keras mean" in capsys.readouterr().out
    check = json.loads(out.with_name("unet.onnx.check.json").read_text())
    assert check["passed"] and check["dice_mean"] >= 0.99 and check["format"] == "onnx"
    reference, exported = Predictor.load(str(unet_path)), Predictor.load(str(out), tta=True)
    images = [blob_pair(48, seed=s)[0] for s in range(3)]
    reference.tta = True
    for a, b in zip(reference.predict(images), exported.predict(images)):
        np.testing.assert_allclose(b.probability, a.probability, atol=1e-4)


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_a_model_with_the_transformer_bottleneck_exports_and_passes_its_check(tmp_path: Path, fmt: str):
    """Self-attention, LayerNorm and the MLP's activation convert to both formats (exact GELU would
    not: tf2onnx has no Erfc); the export's own check compares its masks with Keras'."""
    from tumorseg.models import build_model

    model = build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_caspp=False, dropout=0.0, transformer_depth=1, transformer_heads=2)
    model.save(tmp_path / "attended.keras")
    result = export_model(str(tmp_path / "attended.keras"), fmt, tmp_path / f"attended.{fmt}", sample_count=4, timing_repeats=1)
    check = json.loads((tmp_path / f"attended.{fmt}.check.json").read_text())
    assert result.passed and check["passed"] and check["images"] == 4


def test_int8_export_calibrates_on_given_images(tmp_path: Path, bright_path: Path):
    for index in range(8):
        write_pair(tmp_path / "calib", f"{index}.png", *blob_pair(32, seed=index))
    out = tmp_path / "bright-int8.tflite"
    result = export_model(str(bright_path), "tflite", out, quantize="int8", calibration_dir=tmp_path / "calib" / "images", sample_count=4, timing_repeats=1)
    assert result.passed and result.check["quantize"] == "int8" and result.check["images"] == 4
    assert result.check["calibration_images"] == 4 and not result.check["calibration_is_check_set"]  # calibrated on the other half
    assert result.check["sample_images"].endswith("images") and result.check["dice_mean"] >= 0.9
    from tumorseg.inference import tflite_interpreter

    ops = {op["op_name"] for op in tflite_interpreter(out)._get_ops_details()}
    assert "QUANTIZE" in ops  # activations really are int8 inside (float in and out)


def test_an_export_failing_its_check_is_not_put_in_place(tmp_path: Path, bright_path: Path, capsys, caplog):
    out = tmp_path / "bright.tflite"
    with caplog.at_level("INFO", logger="tumorseg.export"), pytest.raises(ExportError, match="does not match the Keras model"):
        export_model(str(bright_path), "tflite", out, min_dice=1.01, sample_count=4, timing_repeats=1)
    progress = [r.getMessage() for r in caplog.records if r.name == "tumorseg.export"]  # a long conversion says what it is doing
    assert progress[0].startswith(f"export: converting {bright_path}") and "to tflite" in progress[0]
    assert progress[1].startswith("export: converted in") and "checking it against the Keras model on 4 images" in progress[1]
    assert not out.exists() and not list(tmp_path.glob("*.staged*")) and not list(tmp_path.glob(".*staged*"))
    check = json.loads((tmp_path / "bright.tflite.check.json").read_text())
    assert check["passed"] is False and check["dice_mean"] >= 0.99
    assert main(["export", "--model", str(bright_path), "--format", "onnx", "--quantize", "float16", "--out", str(out)]) == 1
    assert "not available for onnx" in capsys.readouterr().err


def test_registry_round_trip(tmp_path: Path, unet_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts beside the store's working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["register", "--model", str(unet_path), "--name", "tiny-unet"]) == 0
    out = capsys.readouterr().out
    assert "version 1" in out and "models:/tiny-unet/1" in out
    model_id = out.split("registered models:/")[1].split(" ")[0]  # a LoggedModel: the experiment's Models tab lists it
    import mlflow

    logged = mlflow.get_logged_model(model_id)
    run_id = logged.source_run_id
    assert str(logged.status).endswith("READY") and logged.name == "model" and run_id
    assert main(["register", "--run-id", run_id, "--name", "tiny-unet"]) == 0
    assert "version 2" in capsys.readouterr().out
    # the same logged model again, with an alias: no new version, the alias points at it
    assert main(["register", "--model-id", model_id, "--name", "tiny-unet", "--alias", "champion"]) == 0
    out = capsys.readouterr().out
    assert "version 3" not in out and "models:/tiny-unet@champion" in out

    images = [blob_pair(40, seed=s)[0] for s in range(3)]
    expected = Predictor.load(str(unet_path)).predict(images)
    for uri in ("models:/tiny-unet/1", "models:/tiny-unet/2", f"runs:/{run_id}/model", f"models:/{model_id}", "models:/tiny-unet@champion"):
        for a, b in zip(expected, Predictor.load(uri).predict(images)):
            np.testing.assert_array_equal(a.mask, b.mask)
    assert main(["register", "--run-id", "0" * 32, "--name", "tiny-unet"]) == 1
    assert "no MLflow run" in capsys.readouterr().err
    import cv2

    assert cv2.imwrite(str(tmp_path / "scan.png"), images[0])
    assert main(["predict", str(tmp_path / "scan.png"), "--model", "models:/tiny-unet/9", "--out", str(tmp_path / "o")]) == 1
    assert "cannot load 'models:/tiny-unet/9'" in capsys.readouterr().err
