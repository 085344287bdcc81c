"""Fixtures and hooks only; the plain helpers they use (data builders, paths) live in ``helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Under pytest-xdist (`make test` runs one worker per core) each worker and the processes it starts
# get one TensorFlow intra-op thread: on these CPUs one thread does ~0.9 of two threads' work, so
# two single-thread workers side by side finish the suite in about half the time, where two workers
# of two threads each would only fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Property tests: random locally (explore), fixed in CI (a red CI is reproducible, and a failure is
# reported at once with the blob to replay it instead of after minutes of shrinking).
from hypothesis import Phase, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
if os.environ.get("CI"):
    settings.load_profile("ci")

from helpers import blob_pair, write_pair  # noqa: E402

# `make test-fast` (-m "not slow") trains no model, converts none and runs no pipeline stage but
# one: the evaluate-equals-predict check (test_scored_path.py, ~10 s), the guarantee behind every
# reported number. Most
# slow tests carry `@pytest.mark.slow` in their own file; this rule marks the rest:
#  - a test that needs a fixture which trains a model is slow wherever it is (``blob_model`` fits a
#    small U-Net for ~50 steps), also through other fixtures (test_serve's ``app``);
TRAINING_FIXTURES = frozenset({"blob_model"})


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def pair_folder(tmp_path: Path) -> Path:
    """40 numbered valid pairs, 1.png ... 40.png."""
    root = tmp_path / "pairs"
    for index in range(1, 41):
        write_pair(root, f"{index}.png", *blob_pair(64, index))
    return root


@pytest.fixture(scope="session")
def blob_model(tmp_path_factory):
    """A small HAC U-Net (32x32, depth 2, 8 base filters) trained for a few seconds to segment
    ``blob_pair`` discs, and its ``.keras`` file: a model that really segments, for Grad-CAM and the
    web app.

    The seed matters for a model this small and this briefly trained: with 4 base filters (one
    channel per HAC branch) seed 0 collapses to all-background, and at 8 filters seed 0's ``dec2``
    carries no positive evidence for some discs, so its Grad-CAM there is all zero (correct, but
    useless for checking that the heat map follows the disc). Seed 2 gives a model whose
    ``dec2`` and ``dec1`` both localise the disc; the Dice check below guards the first property.
    """
    import keras

    from tumorseg.models import build_model

    keras.utils.set_random_seed(2)
    pairs = [blob_pair(32, seed) for seed in range(192)]
    x = np.stack([image for image, _ in pairs]).astype("float32")[..., None]
    y = (np.stack([mask for _, mask in pairs]) > 0).astype("float32")[..., None]
    model = build_model("unet", (32, 32, 1), base_filters=8, depth=2, use_hac=True, use_caspp=False, dropout=0.0)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    model.fit(x, y, batch_size=16, epochs=4, verbose=0)
    held_out = [blob_pair(32, seed) for seed in range(1000, 1016)]
    predicted = model.predict(np.stack([i for i, _ in held_out]).astype("float32")[..., None], verbose=0)[..., 0] > 0.5
    truth = np.stack([m for _, m in held_out]) > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice > 0.9, f"the blob model did not learn (held-out Dice {dice:.3f}); the tests that use it need a working model"
    path = tmp_path_factory.mktemp("blob_model") / "blob_unet.keras"
    model.save(path)
    return model, path
