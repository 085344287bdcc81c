"""Shared test helpers: paths, small generated images and models, the optional real data.

Plain functions and constants only; pytest fixtures and hooks live in ``conftest.py``. Test modules
import from here (``from helpers import blob_pair``): ``tests/`` is on ``sys.path`` through
``pythonpath`` in ``[tool.pytest.ini_options]``, so this works whatever the import mode.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_dataset(name: str, expect: str = "images") -> Path:
    """Path of a ../shared dataset, or skip the test saying why.

    ``expect`` is a folder the dataset must hold (``images`` for the single-channel sets; e.g.
    ``flair`` for lgg-256, ``kaggle_3m`` for lgg-kaggle-sample). Tests that call it carry the
    ``shared`` marker (``pytest -m "not shared"`` leaves them out).
    """
    path = SHARED_DATA / name
    if not (path / expect).is_dir():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/README.md)")
    return path


def train_stage_command(root: Path, model: str = "unet") -> list[str]:
    """The train stage as a subprocess in workspace ``root`` (its params.yaml and data/prepared; no augmented copies)."""
    import sys

    return [
        sys.executable,
        str(PROJECT_ROOT / "stages" / "train.py"),
        "--model", model,
        "--params", str(root / "params.yaml"),
        "--prepared", str(root / "data" / "prepared"),
        "--augmented", str(root / "none"),
    ]  # fmt: skip


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


def blob_at(size: int, centre: tuple[int, int], radius: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`blob_pair`, with the disc at a chosen ``centre`` (x, y)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 255, -1)
    image[mask > 0] = 200
    return image, mask


def brightness_model(size: int = 32):
    """A fixed-weight model that finds bright discs: p = sigmoid((x + x_left) / 16 - 16).

    Deterministic and non-trivial (the disc, not everything), and deliberately not
    mirror-symmetric (it looks at the left neighbour), so flip TTA has something to fix.
    """
    import keras

    inputs = keras.Input((size, size, 1), name="image")
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="mask")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 0] = kernel[1, 1] = 1.0 / 16.0
    conv.set_weights([kernel, np.array([-128.0 / 8.0], np.float32)])
    return model
