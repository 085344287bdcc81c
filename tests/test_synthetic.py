"""Synthetic MRI-like phantoms: determinism, mask validity, anatomy, tumour statistics, writing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tumorseg.data.synthetic import make_phantom, phantom_for_index, write_synthetic_dataset

SAMPLE_SEED = 11
SAMPLE_SIZE = 128  # area fractions do not depend on size (above 32 px); 128 keeps the tests fast
SAMPLE_COUNT = 200


@pytest.fixture(scope="module")
def sample() -> list[tuple[np.ndarray, np.ndarray]]:
    return [phantom_for_index(SAMPLE_SEED, index, SAMPLE_SIZE) for index in range(1, SAMPLE_COUNT + 1)]


def head_region(image: np.ndarray) -> np.ndarray:
    """Convex hull of the clearly bright pixels (scalp, brain): the head as a reader would see it."""
    points = cv2.findNonZero((cv2.GaussianBlur(image, (3, 3), 0) > 60).astype(np.uint8))
    region = np.zeros(image.shape, np.uint8)
    cv2.fillConvexPoly(region, cv2.convexHull(points), 1)
    return region.astype(bool)


def background(image: np.ndarray) -> np.ndarray:
    """The four corners, always outside the head ellipse."""
    k = image.shape[0] // 10
    return np.concatenate([image[:k, :k], image[:k, -k:], image[-k:, :k], image[-k:, -k:]]).ravel()


def surrounding_ring(mask: np.ndarray) -> np.ndarray:
    """Pixels a few pixels outside the tumour (past its soft edge)."""
    kernel = np.ones((3, 3), np.uint8)
    near = cv2.dilate(mask, kernel, iterations=2)
    far = cv2.dilate(mask, kernel, iterations=5)
    return (far > 0) & (near == 0)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_and_index_give_identical_phantoms():
    image_a, mask_a = phantom_for_index(3, 7, 64)
    image_b, mask_b = phantom_for_index(3, 7, 64)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)


def test_different_index_or_seed_give_different_phantoms():
    image, mask = phantom_for_index(3, 7, 64)
    for other_image, other_mask in (phantom_for_index(3, 8, 64), phantom_for_index(4, 7, 64)):
        assert not np.array_equal(image, other_image)
        assert not np.array_equal(mask, other_mask)


def test_phantom_does_not_depend_on_generation_order():
    indices = list(range(1, 9))
    forward = {i: phantom_for_index(5, i, 48) for i in indices}
    backward = {}
    for i in reversed(indices):
        phantom_for_index(99, i, 48)  # unrelated work in between changes nothing
        backward[i] = phantom_for_index(5, i, 48)
    for i in indices:
        np.testing.assert_array_equal(forward[i][0], backward[i][0])
        np.testing.assert_array_equal(forward[i][1], backward[i][1])


def test_phantom_for_index_is_make_phantom_on_the_seed_sequence():
    rng = np.random.default_rng(np.random.SeedSequence([5, 3]))
    image, mask = make_phantom(rng, 64)
    expected_image, expected_mask = phantom_for_index(5, 3, 64)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, expected_mask)


# --------------------------------------------------------------------------------------------
# Shapes and mask validity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 256])
def test_shapes_dtypes_and_binary_non_empty_mask(size):
    for index in range(1, 6):
        image, mask = phantom_for_index(0, index, size)
        assert image.shape == mask.shape == (size, size)
        assert image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}


@pytest.mark.parametrize("size", [0, 16, 31])
def test_too_small_size_is_refused(size):
    with pytest.raises(ValueError, match="at least 32"):
        phantom_for_index(0, 1, size)


def test_every_sampled_mask_is_binary_and_non_empty(sample):
    for _, mask in sample:
        assert set(np.unique(mask).tolist()) == {0, 255}


def test_tumour_lies_inside_the_head(sample):
    for image, mask in sample:
        tumour = mask > 0
        assert not (tumour[0].any() or tumour[-1].any() or tumour[:, 0].any() or tumour[:, -1].any())
        assert not (tumour & ~head_region(image)).any()
        floor = float(background(image).mean())
        assert floor < 30  # a dark background...
        assert np.percentile(image[tumour], 5) > floor + 10  # ...and tumour pixels well above it
        assert np.median(image[tumour]) > floor + 25


def test_images_use_most_of_the_intensity_range(sample):
    tops = np.array([np.percentile(image, 99.5) for image, _ in sample])
    assert np.median(tops) > 180
    assert all(image.min() < 20 for image, _ in sample)


# --------------------------------------------------------------------------------------------
# Tumour statistics
# --------------------------------------------------------------------------------------------


def test_tumour_area_spans_small_to_large(sample):
    fractions = np.array([(mask > 0).mean() for _, mask in sample])
    assert fractions.min() < 0.005
    assert fractions.max() > 0.03
    assert 0.005 <= fractions.mean() <= 0.05
    assert (fractions < 0.005).mean() >= 0.1  # a good share of small lesions (about 17%)
    assert fractions.max() <= 0.1


def test_tumour_differs_from_surrounding_tissue_in_most_phantoms(sample):
    contrasts = []
    for image, mask in sample:
        inside = image[mask > 0].astype(float).mean()
        around = image[surrounding_ring(mask)].astype(float).mean()
        contrasts.append(abs(inside - around) / around)
    contrasts = np.array(contrasts)
    assert (contrasts > 0.05).mean() >= 0.8
    assert (contrasts < 0.1).any()  # yet some are subtle: the task is not trivial


def test_tumours_are_mostly_brighter_but_not_always(sample):
    brighter = [image[mask > 0].mean() > image[surrounding_ring(mask)].mean() for image, mask in sample]
    assert 0.6 <= np.mean(brighter) < 1.0


def test_tumour_shapes_are_not_all_the_same(sample):
    """Irregular outlines: solidity (area / convex hull area) varies and is sometimes well below 1."""
    solidity = []
    for _, mask in sample:
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        largest = max(contours, key=cv2.contourArea)
        hull = cv2.contourArea(cv2.convexHull(largest))
        if hull >= 50:  # tiny masks are all pixel staircases
            solidity.append(cv2.contourArea(largest) / hull)
    assert min(solidity) < 0.9
    assert max(solidity) > 0.95


# --------------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------------


def test_write_synthetic_dataset_writes_matching_pairs(tmp_path: Path):
    out = tmp_path / "raw"
    names = write_synthetic_dataset(out, count=6, size=48, seed=21, progress=False)
    expected = [f"{i:05d}.png" for i in range(1, 7)]
    assert names == expected
    assert sorted(p.name for p in (out / "images").iterdir()) == expected  # no temp files left
    assert sorted(p.name for p in (out / "masks").iterdir()) == expected
    for index, name in enumerate(names, start=1):
        image = cv2.imread(str(out / "images" / name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / "masks" / name), cv2.IMREAD_UNCHANGED)
        expected_image, expected_mask = phantom_for_index(21, index, 48)
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(mask, expected_mask)


def test_write_synthetic_dataset_overwrites_and_shows_progress(tmp_path: Path, capsys):
    write_synthetic_dataset(tmp_path, count=3, size=32, seed=1, progress=False)
    names = write_synthetic_dataset(tmp_path, count=2, size=32, seed=2, progress=True)
    assert names == ["00001.png", "00002.png"]
    assert "synthetic phantoms" in capsys.readouterr().err
    image = cv2.imread(str(tmp_path / "images" / "00002.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(image, phantom_for_index(2, 2, 32)[0])
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_write_synthetic_dataset_with_no_images(tmp_path: Path):
    assert write_synthetic_dataset(tmp_path / "empty", count=0, size=32, seed=0, progress=False) == []
    assert (tmp_path / "empty" / "images").is_dir()
    assert not any((tmp_path / "empty" / "images").iterdir())
