"""Models that load anywhere (issue 23): the U-Net is a graph of stock Keras layers, its files load
with plain ``keras.models.load_model`` in a Python without tumorseg, and older files with the
legacy HAC/CASPP layer classes are converted to that graph with their weights, exactly."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import PROJECT_ROOT, legacy_unet, predict_without_tumorseg, randomise_batchnorm
from tumorseg.models import (
    DeeplySupervised,
    blocks_in,
    build_model,
    is_legacy,
    to_portable,
    with_deep_supervision,
)
from tumorseg.models.legacy import saved_with_legacy_layers

# Keras' own get_weights() trips numpy 2's copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = {"base_filters": 4, "depth": 2, "attention_gates": True}  # HAC + CASPP + attention gates


def _images(n: int, size: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype("float32")


def _eager(model, images) -> np.ndarray:
    """Inference-mode output of an eager call (predict()'s compiled graph rounds per graph)."""
    outputs = model(images, training=False)
    return np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs)


def _config_text(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.read("config.json").decode()


def test_fresh_unet_loads_and_predicts_without_tumorseg(tmp_path):
    model = build_model("unet", (32, 32, 1), **TINY)
    randomise_batchnorm(model, seed=1)
    assert blocks_in(model) == {"enc1": "hac", "enc2": "hac", "caspp": "caspp", "dec2": "hac", "dec1": "hac"}
    portable, legacy = tmp_path / "unet.keras", tmp_path / "legacy.keras"
    model.save(portable)
    legacy_unet((32, 32, 1), **TINY).save(legacy)
    config = _config_text(portable)
    assert "tumorseg" not in config and '"Lambda"' not in config  # stock layers only, nothing safe mode refuses
    assert not saved_with_legacy_layers(portable) and saved_with_legacy_layers(legacy)

    attended = build_model("unet", (32, 32, 1), **TINY, transformer_depth=1, transformer_heads=2)  # + self-attention
    attended.save(tmp_path / "transformer.keras")

    probe = _images(3, 32, seed=2)
    loaded, refused, loaded_attended = predict_without_tumorseg(
        [(portable, probe), (legacy, probe), (tmp_path / "transformer.keras", probe)], tmp_path / "elsewhere"
    )
    assert isinstance(loaded, np.ndarray), loaded
    difference = float(np.abs(loaded - model.predict(probe, verbose=0)).max())
    assert difference < 1e-5, difference
    assert isinstance(loaded_attended, np.ndarray), loaded_attended
    assert float(np.abs(loaded_attended - attended.predict(probe, verbose=0)).max()) < 1e-5
    assert float(loaded.std()) > 1e-3  # the predictions are not a constant that anything would match
    # the check can fail: the same process refuses a legacy file, as it refused unet-figshare.keras before
    assert isinstance(refused, str) and "HACBlock" in refused, refused


@pytest.mark.slow  # one Python without tumorseg loads every full-size shipped model (~30 s)
def test_every_shipped_model_loads_and_predicts_without_tumorseg(tmp_path):
    from tumorseg.data.synthetic import phantom_for_index

    shipped = sorted((PROJECT_ROOT / "weights").glob("*.keras"))
    if not shipped:
        pytest.skip("no weights shipped")
    runs = []
    for path in shipped:
        assert not saved_with_legacy_layers(path), f"{path.name} holds legacy layers: re-ship it with scripts/ship_weights.py"
        model = keras.models.load_model(path, compile=False)
        _, size, _, channels = model.input_shape
        phantoms = np.stack([phantom_for_index(0, index, size)[0] for index in range(2)]).astype("float32")
        probe = np.repeat(phantoms[..., None], channels, axis=-1)  # real-looking slices, every sequence alike
        runs.append((path, probe, model.predict(probe, verbose=0)))
    results = predict_without_tumorseg([(path, probe) for path, probe, _ in runs], tmp_path / "elsewhere")
    for (path, _, expected), result in zip(runs, results):
        assert isinstance(result, np.ndarray), f"{path.name}: {result}"
        difference = float(np.abs(result - expected).max())
        assert difference < 1e-5, (path.name, difference)


@pytest.mark.parametrize(
    "params",
    [
        {**TINY, "dropout": 0.0},
        {"base_filters": 4, "depth": 2, "use_caspp": False, "dropout": 0.0},
        {"base_filters": 6, "depth": 2, "use_hac": False, "caspp_rates": [1, 3], "bn_momentum": 0.8, "dropout": 0.0},
    ],
)
def test_legacy_unet_converts_to_the_built_graph_with_the_same_predictions(params):
    keras.utils.set_random_seed(3)
    legacy = legacy_unet((32, 32, 1), **params)
    randomise_batchnorm(legacy, seed=4)  # moving statistics that differ per channel: a mis-sliced group would show
    assert is_legacy(legacy)
    portable = to_portable(legacy)
    assert not is_legacy(portable) and to_portable(portable) is portable
    fresh = build_model("unet", (32, 32, 1), **params)  # the one graph kind: conversion and build agree layer for layer
    assert [layer.name for layer in portable.layers] == [layer.name for layer in fresh.layers]
    assert [tuple(w.shape) for w in portable.weights] == [tuple(w.shape) for w in fresh.weights]
    assert portable.name == legacy.name and portable.inputs[0].name == legacy.inputs[0].name
    assert portable.count_params() == legacy.count_params()
    assert blocks_in(portable) == blocks_in(legacy)

    images = _images(4, 32, seed=5)
    inference = float(np.abs(_eager(portable, images) - _eager(legacy, images)).max())
    assert inference < 1e-5, inference
    training = float(np.abs(np.asarray(portable(images, training=True)) - np.asarray(legacy(images, training=True))).max())
    assert training < 1e-5, training  # batch statistics too (no dropout here)
    assert float(_eager(legacy, images).std()) > 1e-3


def test_legacy_conversion_keeps_deep_supervision_heads_and_the_input_name():
    legacy = with_deep_supervision(legacy_unet((32, 32, 2), sequences=("t1", "flair"), base_filters=4, depth=3), 2.0)
    randomise_batchnorm(legacy, seed=6)
    portable = to_portable(legacy)
    assert isinstance(portable, DeeplySupervised) and portable.aux_weights == legacy.aux_weights
    assert portable.inputs[0].name == "image__t1__flair"
    images = _images(2, 32, seed=7, channels=2)
    for got, want in zip(portable(images, training=False), legacy(images, training=False)):
        assert float(np.abs(np.asarray(got) - np.asarray(want)).max()) < 1e-5


def test_conversion_refuses_a_model_whose_weights_do_not_fit():
    from tumorseg.models.legacy import copy_legacy_state

    legacy = legacy_unet((32, 32, 1), **TINY)
    with pytest.raises(ValueError, match="shape|no layer|does not match"):
        copy_legacy_state(legacy, build_model("unet", (32, 32, 1), **{**TINY, "base_filters": 8}))


def test_legacy_files_come_back_portable_through_the_project_loading_paths(tmp_path):
    from tumorseg.inference import open_keras_model
    from tumorseg.resume import publish_without_optimizer
    from tumorseg.training import load_initial_weights

    legacy = legacy_unet((32, 32, 1), **TINY)
    randomise_batchnorm(legacy, seed=8)
    path = tmp_path / "unet.keras"
    legacy.save(path)
    images = _images(2, 32, seed=9)
    expected = _eager(legacy, images)

    opened = open_keras_model(path)  # predict, evaluate, explain, export, serve
    assert not is_legacy(opened) and float(np.abs(_eager(opened, images) - expected).max()) < 1e-5

    published = tmp_path / "published.keras"  # training publishes models/ (and ship_weights weights/) this way
    publish_without_optimizer(path, published)
    assert not saved_with_legacy_layers(published)
    assert float(np.abs(_eager(keras.models.load_model(published), images) - expected).max()) < 1e-5

    warm = build_model("unet", (64, 64, 1), **TINY)  # train.init_from: a file of another input size
    load_initial_weights(warm, path, key="train.init_from.unet")
    block = legacy.get_layer("dec1")
    np.testing.assert_array_equal(np.asarray(warm.get_layer("dec1_fuse").kernel), np.asarray(block.fuse.kernel))
    np.testing.assert_array_equal(np.asarray(warm.get_layer("dec1_project3_bn").moving_variance), np.asarray(block.project_bn.moving_variance)[2:3])
    same_size = build_model("unet", (32, 32, 1), **TINY)
    load_initial_weights(same_size, path, key="train.init_from.unet")
    assert float(np.abs(_eager(same_size, images) - expected).max()) < 1e-5


@pytest.mark.slow  # two optimizer steps per model, eagerly
def test_a_run_begun_with_legacy_layers_resumes_with_its_weights_and_optimizer_state(tmp_path):
    from tumorseg.config import LossConfig, TrainConfig
    from tumorseg.resume import ResumeState, restore_checkpoint
    from tumorseg.training import compile_for_training

    train = TrainConfig(ema_momentum=0.9)  # EMA: its averages are optimizer state too
    images = _images(4, 32, seed=10)
    masks = (images > 128).astype("float32")[..., :1]

    def compiled(model):
        compile_for_training(model, train=train, loss=LossConfig(), learning_rate=1e-2, steps_per_epoch=4)
        model.run_eagerly = True
        return model

    keras.utils.set_random_seed(11)
    legacy = compiled(legacy_unet((32, 32, 1), **{**TINY, "dropout": 0.0}))
    legacy.train_on_batch(images, masks)  # moments and averages that are not zero
    legacy.save(tmp_path / "epoch-0001.keras")
    (tmp_path / "state.json").write_text(json.dumps({"epochs_done": 1, "checkpoint": "epoch-0001.keras", "checkpoint_phase": "train"}))

    portable = compiled(build_model("unet", (32, 32, 1), **{**TINY, "dropout": 0.0}))
    restore_checkpoint(portable, ResumeState(tmp_path), "train")
    assert int(portable.optimizer.iterations) == 1
    assert float(np.abs(_eager(portable, images) - _eager(legacy, images)).max()) < 1e-5
    # the sliced projection's moments: group 2 of enc1's projection is columns 1 of the legacy kernel (width 1)
    opt_new, opt_old = portable.optimizer, legacy.optimizer
    new_kernel, old_kernel = portable.get_layer("enc1_project2").kernel, legacy.get_layer("enc1").project.kernel
    new_m = opt_new._momentums[opt_new._get_variable_index(new_kernel)]
    old_m = opt_old._momentums[opt_old._get_variable_index(old_kernel)]
    np.testing.assert_array_equal(np.asarray(new_m), np.asarray(old_m)[..., 1:2])
    assert float(np.abs(np.asarray(old_m)).max()) > 0
    # the next step moves both models alike: the optimizer state was carried over, not reset
    legacy.train_on_batch(images, masks)
    portable.train_on_batch(images, masks)
    assert float(np.abs(_eager(portable, images) - _eager(legacy, images)).max()) < 1e-4
