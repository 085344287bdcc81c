"""The pretrained weights shipped in ``weights/``: intact, loadable, and segmenting real slices.

The Dice checks use the shipped models' own test splits, never seen in training or model
selection: Figshare slices (``weights/test_split.txt``) from ``../shared/data/figshare-256``, and
LGG patients (``weights/lgg_test_cases.txt``) from ``../shared/data/lgg-256`` scored the way an
outside scorer does (``tumorseg predict ROOT --model M --out OUT``, no other flag); each skips
with the reason when its folder is absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import PROJECT_ROOT, shared_dataset
from tumorseg.inference.cards import card_path

WEIGHTS = PROJECT_ROOT / "weights"
MAX_BYTES = 25 * 1024 * 1024
SAMPLE = 48  # test slices scored per model, evenly spaced over the test split


def checksums() -> dict[str, str]:
    path = WEIGHTS / "SHA256SUMS"
    if not path.exists():
        return {}
    return {name.strip(): digest for digest, name in (line.split(None, 1) for line in path.read_text().splitlines() if line.strip())}


SHIPPED = sorted(checksums())


def trained_on(name: str) -> str:
    """The data set a shipped file was trained on: its machine-readable card's, else Figshare."""
    card = card_path(WEIGHTS / name)
    return json.loads(card.read_text())["data"]["origin"] if card.exists() else "figshare-256"


FIGSHARE = [name for name in SHIPPED if trained_on(name) == "figshare-256"]
LGG = [name for name in SHIPPED if trained_on(name) == "lgg-256"]


def test_every_shipped_file_is_listed_with_its_checksum_and_a_model_card():
    on_disk = sorted(path.name for path in WEIGHTS.glob("*.keras"))
    assert on_disk == SHIPPED, "weights/*.keras and weights/SHA256SUMS disagree: run scripts/ship_weights.py"
    assert sorted(FIGSHARE + LGG) == SHIPPED, "a shipped file trained on neither Figshare nor LGG"
    if SHIPPED:
        card = (WEIGHTS / "MODEL_CARD.md").read_text()
        assert all(name in card for name in SHIPPED) and "CC BY 4.0" in card and "not a medical device" in card
    for name in SHIPPED:  # a machine-readable card beside every file, naming its data, licence and checksum
        machine = json.loads(card_path(WEIGHTS / name).read_text())
        assert machine["file"] == name and machine["sha256"] == checksums()[name] and machine["data"]["licence"] in card
        assert machine["intended_use"].endswith("not a medical device") and machine["test"]["n_images"] > 0
    for name in LGG:  # non-commercial data: the licence travels with the file, in both cards
        machine = json.loads(card_path(WEIGHTS / name).read_text())
        assert machine["data"]["licence"] == "CC BY-NC-SA 4.0" and "CC BY-NC-SA 4.0" in card and "TCIA" in machine["data"]["attribution"]
        assert machine["sha256"] == checksums()[name] and machine["input"]["sequences"] == ["t1", "flair", "t1ce"]


@pytest.mark.slow  # full-size models on 48 real slices
@pytest.mark.shared
@pytest.mark.parametrize("name", FIGSHARE or [pytest.param("none", marks=pytest.mark.skip(reason="no weights shipped yet"))])
def test_shipped_model_matches_its_checksum_loads_and_segments_real_slices(name: str):
    path = WEIGHTS / name
    assert path.stat().st_size <= MAX_BYTES, f"{name} is over 25 MB"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == checksums()[name], f"{name} does not match weights/SHA256SUMS"

    from tumorseg.inference import Predictor

    mean_dice = _mean_dice_on_test_slices(Predictor.load(str(path)))  # what `tumorseg predict --model weights/...` does
    assert mean_dice >= 0.7, f"{name}: mean Dice {mean_dice:.3f} on {SAMPLE} test slices"


@pytest.mark.slow  # every shipped model with flip TTA on 48 real slices
@pytest.mark.shared
@pytest.mark.skipif(len(FIGSHARE) < 2, reason="fewer than two shipped Figshare models")
def test_shipped_models_as_an_ensemble_segment_real_slices():
    from tumorseg.inference import Predictor

    mean_dice = _mean_dice_on_test_slices(Predictor.load([str(WEIGHTS / name) for name in FIGSHARE], tta=True))
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


@pytest.mark.slow  # 13 patients, 263 slices through `tumorseg predict` (~40 s)
@pytest.mark.shared
@pytest.mark.parametrize("name", LGG or [pytest.param("none", marks=pytest.mark.skip(reason="no LGG weights shipped yet"))])
def test_shipped_lgg_model_segments_every_slice_of_its_test_patients(name: str, tmp_path: Path):
    """Every slice of every test patient gets a mask, also the patients without T1-CE (one) or with
    FLAIR only (one), through the plain predict command, and the per-patient Dice is the one the
    model card states (the scored path is the shipped path)."""
    path = WEIGHTS / name
    assert path.stat().st_size <= MAX_BYTES and hashlib.sha256(path.read_bytes()).hexdigest() == checksums()[name]
    data = shared_dataset("lgg-256", expect="flair")
    spec = importlib.util.spec_from_file_location("score_lgg_predict", PROJECT_ROOT / "scripts" / "score_lgg_predict.py")
    scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorer)
    out = tmp_path / "scored.json"
    argv = ["--data", str(data), "--cases", str(WEIGHTS / "lgg_test_cases.txt"), "--model", str(path), "--out", str(out)]
    assert scorer.main(argv) == 0
    scored = json.loads(out.read_text())
    stated = json.loads(card_path(path).read_text())["test"]
    assert scored["exit_code"] == 0 and scored["slices_without_a_mask_file"] == [] and scored["slices"] == stated["n_images"]
    assert scored["n_patients"] == stated["n_patients"] == 13
    assert abs(scored["patient_dice"] - stated["patient_dice"]) < 1e-3, (scored["patient_dice"], stated["patient_dice"])
    assert abs(scored["false_positive_rate"] - stated["false_positive_rate"]) < 1e-3
