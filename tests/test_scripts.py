"""Helpers of the research scripts in ``scripts/`` whose numbers the README reports."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from helpers import PROJECT_ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ensemble_member_runs_the_same_weights_at_another_input_size():
    import keras

    from tumorseg.models import build_model

    ensemble_weights = _script("ensemble_weights")
    assert ensemble_weights.parse_member("s160=models/u.keras@160") == ("s160", "models/u.keras", 160)
    assert ensemble_weights.parse_member("u=models/u.keras") == ("u", "models/u.keras", None)
    with pytest.raises(SystemExit, match="multiple of 32"):
        ensemble_weights.parse_member("u=models/u.keras@100")

    keras.utils.set_random_seed(0)
    params = {"alpha": 0.35, "encoder_weights": "none", "decoder_filters": (16, 8, 8, 8, 8)}
    model = build_model("umobilenetv2", (64, 64, 1), **params)  # a nested encoder model: both inputs change
    larger = ensemble_weights.at_input_size(model, 96)
    assert larger.input_shape == (None, 96, 96, 1)
    reference = build_model("umobilenetv2", (96, 96, 1), **params)
    reference.set_weights(model.get_weights())
    images = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(larger(images, training=False)), np.asarray(reference(images, training=False)), atol=1e-6)
