"""Shared fixtures: small generated datasets and the location of the optional real data."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Property tests: random locally (explore), fixed in CI (a red CI is reproducible, and a failure is
# reported at once with the blob to replay it instead of after minutes of shrinking).
from hypothesis import Phase, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
if os.environ.get("CI"):
    settings.load_profile("ci")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of a ../shared dataset, or skip the test saying why."""
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/README.md)")
    return path


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / name), image)
    assert cv2.imwrite(str(root / "masks" / name), mask)


def blob_pair(size: int = 64, seed: int = 0, radius: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with one bright disc and its mask (distinct per seed)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    r = radius or int(rng.integers(size // 16 + 1, size // 5))
    centre = tuple(int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    cv2.circle(mask, centre, r, 255, -1)
    image[mask > 0] = 200
    return image, mask


@pytest.fixture
def pair_folder(tmp_path: Path) -> Path:
    """40 numbered valid pairs, 1.png ... 40.png."""
    root = tmp_path / "pairs"
    for index in range(1, 41):
        write_pair(root, f"{index}.png", *blob_pair(64, index))
    return root


def blob_at(size: int, centre: tuple[int, int], radius: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`blob_pair`, with the disc at a chosen ``centre`` (x, y)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 255, -1)
    image[mask > 0] = 200
    return image, mask


@pytest.fixture(scope="session")
def blob_model(tmp_path_factory):
    """A tiny HAC U-Net (32x32, depth 2) trained for a few seconds to segment ``blob_pair`` discs,
    and its ``.keras`` file: a model that really segments, for Grad-CAM and the web app."""
    import keras

    from tumorseg.models import build_model

    keras.utils.set_random_seed(0)
    pairs = [blob_pair(32, seed) for seed in range(192)]
    x = np.stack([image for image, _ in pairs]).astype("float32")[..., None]
    y = (np.stack([mask for _, mask in pairs]) > 0).astype("float32")[..., None]
    model = build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_hac=True, use_caspp=False, dropout=0.0)
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
