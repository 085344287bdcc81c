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
