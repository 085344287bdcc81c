"""The pretrained weights shipped in ``weights/``: intact, loadable, and segmenting real slices.

The Dice check uses slices of the shipped models' own test split (``weights/test_split.txt``,
never seen in training or model selection) from ``../shared/data/figshare-256``; it skips with the
reason when that folder is absent.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from helpers import PROJECT_ROOT, shared_dataset

WEIGHTS = PROJECT_ROOT / "weights"
MAX_BYTES = 25 * 1024 * 1024
SAMPLE = 48  # test slices scored per model, evenly spaced over the test split


def checksums() -> dict[str, str]:
    path = WEIGHTS / "SHA256SUMS"
    if not path.exists():
        return {}
    return {name.strip(): digest for digest, name in (line.split(None, 1) for line in path.read_text().splitlines() if line.strip())}


SHIPPED = sorted(checksums())


def test_every_shipped_file_is_listed_with_its_checksum_and_a_model_card():
    on_disk = sorted(path.name for path in WEIGHTS.glob("*.keras"))
    assert on_disk == SHIPPED, "weights/*.keras and weights/SHA256SUMS disagree: run scripts/ship_weights.py"
    if SHIPPED:
        card = (WEIGHTS / "MODEL_CARD.md").read_text()
        assert all(name in card for name in SHIPPED) and "CC BY 4.0" in card and "not a medical device" in card


@pytest.mark.slow  # full-size models on 48 real slices
@pytest.mark.shared
@pytest.mark.parametrize("name", SHIPPED or [pytest.param("none", marks=pytest.mark.skip(reason="no weights shipped yet"))])
def test_shipped_model_matches_its_checksum_loads_and_segments_real_slices(name: str):
    path = WEIGHTS / name
    assert path.stat().st_size <= MAX_BYTES, f"{name} is over 25 MB"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == checksums()[name], f"{name} does not match weights/SHA256SUMS"

    from tumorseg.inference import Predictor

    mean_dice = _mean_dice_on_test_slices(Predictor.load(str(path)))  # what `tumorseg predict --model weights/...` does
    assert mean_dice >= 0.7, f"{name}: mean Dice {mean_dice:.3f} on {SAMPLE} test slices"


@pytest.mark.slow  # every shipped model with flip TTA on 48 real slices
@pytest.mark.shared
@pytest.mark.skipif(len(SHIPPED) < 2, reason="fewer than two shipped models")
def test_shipped_models_as_an_ensemble_segment_real_slices():
    from tumorseg.inference import Predictor

    mean_dice = _mean_dice_on_test_slices(Predictor.load([str(WEIGHTS / name) for name in SHIPPED], tta=True))
    assert mean_dice >= 0.7, f"ensemble: mean Dice {mean_dice:.3f} on {SAMPLE} test slices"


def _mean_dice_on_test_slices(predictor) -> float:
    root = shared_dataset("figshare-256")
    test_files = (WEIGHTS / "test_split.txt").read_text().split()
    picked = test_files[:: max(1, len(test_files) // SAMPLE)][:SAMPLE]
    images = [cv2.imread(str(root / "images" / f), cv2.IMREAD_UNCHANGED) for f in picked]
    truths = [cv2.imread(str(root / "masks" / f), cv2.IMREAD_GRAYSCALE) > 0 for f in picked]
    dices = []
    for result, truth in zip(predictor.predict(images), truths):
        predicted = result.mask > 0
        assert predicted.shape == truth.shape  # back at the slice's own size
        total = predicted.sum() + truth.sum()
        dices.append(1.0 if total == 0 else 2.0 * (predicted & truth).sum() / total)
    return float(np.mean(dices))
