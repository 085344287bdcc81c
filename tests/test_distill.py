"""Knowledge distillation (``train.distill``): soft targets from teacher models, carried through
the input pipeline and online augmentation, computed through the shipped prediction path, and a
student run that a resume reproduces exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import PROJECT_ROOT, TINY_UNET, blob_pair, brightness_model, train_tiny_unet, write_pair
from tumorseg.config import ConfigError, load_config
from tumorseg.data.pairs import load_pairs, make_dataset, soft_targets

CFG = load_config(PROJECT_ROOT / "params.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    for split, count in (("train", 16), ("val", 8)):
        for index in range(count):
            write_pair(root / split, f"{split}{index}.png", *blob_pair(32, 7 * index + len(split), radius=5))
    return root


def test_soft_targets_blend_mask_and_teacher_as_uint8():
    masks = np.array([[[[1], [0]], [[1], [0]]]], np.uint8)  # (1, 2, 2, 1)
    teacher = np.array([[[0.2, 0.9], [1.3, -0.1]]], np.float32)  # (1, 2, 2); out of [0, 1] is clipped
    assert np.array_equal(soft_targets(masks, teacher, 0.0), masks * 255)
    assert np.array_equal(soft_targets(masks, teacher, 1.0)[..., 0], [[[51, 230], [255, 0]]])
    half = soft_targets(masks, teacher, 0.5)
    assert half.dtype == np.uint8 and half.shape == masks.shape
    assert np.array_equal(half[..., 0], np.rint(255 * np.array([[[0.6, 0.45], [1.0, 0.0]]])).astype(np.uint8))
    with pytest.raises(ValueError, match="weight"):
        soft_targets(masks, teacher, 1.5)


def test_soft_targets_reach_training_in_zero_to_one_and_survive_online_augmentation(prepared: Path):
    from tumorseg.data.augment import build_augmentation

    _, images, masks = load_pairs(prepared / "train", 32)
    targets = soft_targets(masks, np.full(masks.shape, 0.5, np.float32), 0.5)  # tumour 0.75, background 0.25
    plain = np.concatenate([y.numpy() for _, y in make_dataset(images, targets, batch_size=16, shuffle=False, seed=0, soft=True)])
    assert np.allclose(plain, targets / 255.0)
    assert np.allclose(np.unique(plain), [64 / 255, 191 / 255])

    pipeline = build_augmentation(CFG.augment, seed=0)
    for x, y in make_dataset(images, targets, batch_size=16, shuffle=False, seed=0, augment=pipeline, soft=True):
        x, y = x.numpy(), y.numpy()
        assert 0.0 <= y.min() and y.max() <= 1.0
        soft_values = (y > 0.05) & (y < 0.95)
        assert soft_values.mean() > 0.5, "augmentation must move soft targets, not threshold them to 0/1"
        bright = x > 150  # the blob, wherever the geometry took it, still carries the tumour target
        assert (y[bright] > 0.5).mean() > 0.8


def test_distill_teachers_are_listed_per_model_and_checked_before_training(tmp_path: Path):
    import yaml

    from tumorseg.pipeline.train import distillation_teachers

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"]["distill"]["umobilenetv2"] = [str(tmp_path / "missing.keras")]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = load_config(path)
    assert cfg.train.distill.teachers("unet") == () and cfg.train.distill.teachers("umobilenetv2") == (str(tmp_path / "missing.keras"),)
    assert distillation_teachers(cfg, "unet") == []
    with pytest.raises(FileNotFoundError, match=r"train\.distill\.umobilenetv2: .*missing\.keras: does not exist"):
        distillation_teachers(cfg, "umobilenetv2")
    (tmp_path / "missing.keras").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(FileNotFoundError, match="a PNG image, not a Keras model"):
        distillation_teachers(cfg, "umobilenetv2")

    params["train"]["distill"]["umobilenetv2"] = "weights/unet-figshare.keras"  # a file, not a list
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train\.distill\.umobilenetv2"):
        load_config(path)


def test_the_teacher_is_the_prediction_path_with_flip_tta(prepared: Path, tmp_path: Path):
    """The soft targets are exactly what `tumorseg predict` computes with those models (flip TTA on)."""
    from tumorseg.errors import SequenceMismatch
    from tumorseg.inference import Predictor
    from tumorseg.pipeline.train import distillation_teacher

    teacher_file = tmp_path / "teacher.keras"
    brightness_model(32).save(teacher_file)
    _, images, _ = load_pairs(prepared / "train", 32)
    teacher = distillation_teacher(CFG, [teacher_file, teacher_file], chunk=5)  # 16 images in 4 chunks
    maps = teacher(images)
    expected = Predictor.load(teacher_file, tta=True).probability_maps(list(images[..., 0]))
    assert maps.shape == (16, 32, 32) and np.allclose(maps, np.stack(expected), atol=1e-6)
    no_tta = CFG.train.model_copy(update={"distill": CFG.train.distill.model_copy(update={"tta": False})})
    without_tta = distillation_teacher(CFG.model_copy(update={"train": no_tta}), [teacher_file])
    assert not np.allclose(without_tta(images), maps, atol=1e-4)  # the brightness model is not mirror-symmetric

    three = CFG.model_copy(update={"data": CFG.data.model_copy(update={"sequences": ("t1", "flair", "t1ce")})})
    with pytest.raises(SequenceMismatch, match="train.distill: the model was trained on one grayscale image, the input has t1, flair, t1ce"):
        distillation_teacher(three, [teacher_file])(np.zeros((1, 32, 32, 3), np.uint8))


def _train(prepared: Path, out: Path, epochs: int, teacher=None, weight: float = 0.5):
    distill = CFG.train.distill.model_copy(update={"weight": weight})
    return train_tiny_unet(prepared, out, epochs, teacher=teacher, deterministic=True, online_augment=True, distill=distill)


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    import tumorseg.models  # noqa: F401

    return keras.models.load_model(path, compile=False).get_weights()


def _mean_probability(path: Path, prepared: Path) -> float:
    import keras

    import tumorseg.models  # noqa: F401

    _, images, _ = load_pairs(prepared / "train", 32)
    return float(keras.models.load_model(path, compile=False).predict(images.astype(np.float32), verbose=0).mean())


@pytest.mark.slow  # trains a tiny U-Net five times (6 epochs in all)
def test_a_distilled_run_trains_toward_the_teacher_and_resumes_identically(prepared: Path, tmp_path: Path):
    calls = []

    def empty_teacher(images: np.ndarray) -> np.ndarray:
        calls.append(images.shape)
        return np.zeros(images.shape[:3], np.float32)

    # weight 0: the targets are the masks, and the student is bit for bit the plain run (the
    # teachers' inference leaves the random streams as they were)
    _train(prepared, tmp_path / "plain", 1)
    _train(prepared, tmp_path / "weight0", 1, teacher=empty_teacher, weight=0.0)
    assert calls == [(16, 32, 32, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(tmp_path / "plain" / "unet.keras"), _weights(tmp_path / "weight0" / "unet.keras")))

    # weight 1 toward a teacher that sees no tumour: a different student, and one that predicts less tumour
    _train(prepared, tmp_path / "weight1", 1, teacher=empty_teacher, weight=1.0)
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(tmp_path / "plain" / "unet.keras"), _weights(tmp_path / "weight1" / "unet.keras")))
    assert _mean_probability(tmp_path / "weight1" / "unet.keras", prepared) < _mean_probability(tmp_path / "plain" / "unet.keras", prepared)

    # a distilled run stopped after epoch 1 and resumed equals the uninterrupted one
    _train(prepared, tmp_path / "resumed", 1, teacher=empty_teacher)
    _train(prepared, tmp_path / "resumed", 2, teacher=empty_teacher)
    _train(prepared, tmp_path / "whole", 2, teacher=empty_teacher)
    assert all(np.array_equal(a, b) for a, b in zip(_weights(tmp_path / "resumed" / "unet.keras"), _weights(tmp_path / "whole" / "unet.keras")))


@pytest.mark.slow  # the train stage as a subprocess (1 epoch of a tiny U-Net)
def test_the_train_stage_distils_from_the_listed_teachers_and_records_them(tmp_path: Path):
    import json
    import os
    import subprocess

    import yaml

    from helpers import train_stage_command
    from tumorseg.config import load_config
    from tumorseg.io import sha256_file
    from tumorseg.pipeline.prepare import prepare_step

    teacher_file = tmp_path / "teacher.keras"
    brightness_model(32).save(teacher_file)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(profile="full", epochs=1, image_size=32, batch_size=8, lr=3e-3)
    params["models"]["unet"].update(TINY_UNET)
    params["train"].update(threads=1, use_augmented=False, early_stopping_patience=0)
    params["train"]["distill"].update(unet=[str(teacher_file)], weight=0.5)
    params["prepare"].update(group_by="none", workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for index in range(1, 25):
        write_pair(tmp_path / "raw", f"{index}.png", *blob_pair(32, index))
    prepare_step(load_config(tmp_path / "params.yaml"), tmp_path / "raw" / "images", tmp_path / "raw" / "masks", tmp_path / "data" / "prepared",
                 progress=False, report_extra={"data_source": "synthetic", "data_origin": "test", "data_hash": "0" * 64})
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", CI="true", TF_CPP_MIN_LOG_LEVEL="3", TUMORSEG_PROGRESS="0")
    result = subprocess.run(train_stage_command(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distillation: the teachers predict the" in result.stderr
    summary = json.loads((tmp_path / "metrics" / "train_unet.info.json").read_text()) | json.loads((tmp_path / "metrics" / "train_unet.json").read_text())
    assert summary["distill_teachers"] == [str(teacher_file)] and summary["distill_weight"] == 0.5

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["distill_teachers_sha256"] == sha256_file(teacher_file)
    assert run.data.params["train.distill.unet"] == str([str(teacher_file)]) and run.data.params["train.distill.weight"] == "0.5"
