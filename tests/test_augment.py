"""Augmentation: image and mask move together, masks stay binary, results are seeded."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import PROJECT_ROOT, blob_pair, write_pair
from tumorseg.config import AugmentConfig, load_config
from tumorseg.data.augment import apply, augment_dataset, build_augmentation, preview_grid

SETTINGS = load_config(PROJECT_ROOT / "params.yaml").augment


def only(kind: str, **limits) -> AugmentConfig:
    """Settings with every transform off except ``kind`` (always applied)."""
    values = {k: (dict(v, p=0.0) if isinstance(v, dict) else v) for k, v in SETTINGS.model_dump().items()}
    values[kind] = dict(values[kind], p=1.0, **limits)
    return AugmentConfig(**values)


GEOMETRIC = {
    "rotate": {"limit": 30},
    "translate": {"limit": 0.2},
    "scale": {"limit": 0.3},
    "hflip": {},
    "vflip": {},
    "elastic": {"alpha": 60.0, "sigma": 5.0},
    "crop_pad": {"limit": 0.2},
}


@pytest.mark.parametrize("kind", sorted(GEOMETRIC))
def test_geometric_transforms_move_image_and_mask_together(kind: str):
    """The bright disc in the image is the tumour: after the transform it must still be under the mask.
    A transform applied to one but not the other would move them apart and fail this."""
    image, mask = blob_pair(128, 5, radius=18)
    image[:, :10] = 120  # an asymmetric feature so flips are not no-ops
    pipeline = build_augmentation(only(kind, **GEOMETRIC[kind]), seed=3)
    moved = 0
    for _ in range(5):
        out_image, out_mask = apply(pipeline, image, mask)
        assert set(np.unique(out_mask).tolist()) <= {0, 255}
        bright = out_image > 160
        overlap = np.logical_and(bright, out_mask > 0).sum() / max(1, np.logical_or(bright, out_mask > 0).sum())
        assert overlap > 0.8, f"{kind}: image and mask disagree (IoU {overlap:.2f})"
        moved += not np.array_equal(out_mask, mask)
    assert moved >= 1, f"{kind} never changed the mask"


@pytest.mark.parametrize("kind", ["brightness_contrast", "noise"])
def test_intensity_transforms_change_the_image_but_never_the_mask(kind: str):
    image, mask = blob_pair(64, 2)
    pipeline = build_augmentation(only(kind), seed=1)
    out_image, out_mask = apply(pipeline, image, mask)
    assert np.array_equal(out_mask, mask)
    assert not np.array_equal(out_image, image)


def test_full_pipeline_is_seeded():
    image, mask = blob_pair(64, 4)
    first = [apply(build_augmentation(SETTINGS, seed=11), image, mask) for _ in range(2)]
    again = apply(build_augmentation(SETTINGS, seed=11), image, mask)
    assert np.array_equal(first[0][0], again[0]) and np.array_equal(first[0][1], again[1])


def test_augment_dataset_writes_copies_of_training_pairs_only(tmp_path: Path):
    train = tmp_path / "prepared" / "train"
    for index in range(1, 6):
        write_pair(train, f"{index}.png", *blob_pair(64, index))
    out = tmp_path / "augmented"
    report = augment_dataset(train, out, settings=SETTINGS, copies_per_image=3, seed=0, progress=False)
    assert report.augmented_pairs == 15
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(p.name for p in (out / "masks").iterdir())
    assert names[:3] == ["1__aug1.png", "1__aug2.png", "1__aug3.png"]
    again = tmp_path / "again"
    augment_dataset(train, again, settings=SETTINGS, copies_per_image=3, seed=0, progress=False)
    assert all((out / "masks" / n).read_bytes() == (again / "masks" / n).read_bytes() for n in names)


def test_preview_grid_shape(tmp_path: Path):
    train = tmp_path / "train"
    for index in range(1, 4):
        write_pair(train, f"{index}.png", *blob_pair(64, index))
    grid = preview_grid(train, SETTINGS, rows=2, copies=3, seed=0)
    assert grid.shape == (2 * 132, 4 * 132, 3)  # 64-px tiles enlarged x2 for readability, 2-px frame
    assert cv2.imencode(".png", grid)[0]


def test_parallel_and_serial_augment_write_identical_copies(tmp_path: Path):
    """Each pair is seeded by (seed, index): the worker count cannot change a single pixel."""
    train = tmp_path / "train"
    for index in range(1, 71):  # enough pairs for the process pool to be used
        write_pair(train, f"{index}.png", *blob_pair(32, index))
    serial = augment_dataset(train, tmp_path / "serial", settings=SETTINGS, copies_per_image=2, seed=5, progress=False, workers=1)
    augment_dataset(train, tmp_path / "parallel", settings=SETTINGS, copies_per_image=2, seed=5, progress=False, workers=2)
    names = sorted(p.name for p in (tmp_path / "serial" / "images").iterdir())
    assert len(names) == serial.augmented_pairs == 140
    for kind in ("images", "masks"):
        assert [(tmp_path / "serial" / kind / n).read_bytes() for n in names] == [(tmp_path / "parallel" / kind / n).read_bytes() for n in names]
    copies = [cv2.imread(str(tmp_path / "serial" / "images" / f"1__aug{k}.png"), cv2.IMREAD_GRAYSCALE) for k in (1, 2)]
    assert not np.array_equal(copies[0], copies[1]), "two copies of one pair must differ"
