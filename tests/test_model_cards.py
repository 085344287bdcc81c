"""Machine-readable model cards (``<model>.card.json``): predict / explain take a shipped model's
validated inference settings by default, a flag always wins, a bad card is one line naming it, and
``scripts/ship_weights.py --workspace`` writes the card from the workspace that scored the model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import PROJECT_ROOT
from test_sequences_inference import SEQS, channel_model
from tumorseg.cli import main
from tumorseg.errors import ModelCardError
from tumorseg.inference.cards import CARD_SCHEMA, InferenceSettings, card_path, settings_for


@pytest.fixture(scope="module")
def sequence_root(tmp_path_factory) -> Path:
    """40 slices (5 cases of 8) of 32 px phantoms; case005 lacks t1ce."""
    from tumorseg.data.synthetic import write_sequence_dataset

    root = tmp_path_factory.mktemp("card-sequences") / "slices"
    write_sequence_dataset(root, 40, 32, 0, SEQS, progress=False)
    return root


def save_with_card(path: Path, inference: dict | None, model=None) -> Path:
    (model or channel_model(channel=1, level=96.0)).save(path)  # tumour where FLAIR is bright: case005 has FLAIR
    if inference is not None:
        card_path(path).write_text(json.dumps({"schema": CARD_SCHEMA, "file": path.name, "inference": inference}))
    return path


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(folder.glob("*_mask.png"))}


def test_card_path_and_settings_without_a_card(tmp_path: Path):
    assert card_path("weights/umobilenetv2-lgg.keras") == Path("weights/umobilenetv2-lgg.card.json")
    assert card_path("x/model.onnx") == Path("x/model.card.json")
    assert settings_for([tmp_path / "none.keras", "runs:/abc/model"]) == (InferenceSettings(), "")


def test_predict_uses_the_card_and_a_flag_overrides_it(sequence_root: Path, tmp_path: Path, capsys):
    carded = save_with_card(tmp_path / "carded.keras", {"threshold": 0.9, "min_component_px": 4, "tta": True, "missing_sequences": "fill"})
    plain = save_with_card(tmp_path / "plain.keras", None)
    run = ["predict", str(sequence_root), "--batch-size", "16"]

    # the card's fill: every slice of case005 (no t1ce) segmented without a flag
    assert main([*run, "--model", str(carded), "--out", str(tmp_path / "card")]) == 0
    err = capsys.readouterr().err
    assert f"settings from {card_path(carded)}: threshold 0.9, flip TTA, blobs < 4 px dropped, a missing sequence filled with zeros" in err
    by_card = masks(tmp_path / "card")
    assert len(by_card) == 40 and "case005_03_mask.png" in by_card
    # ... identical to the card-less model given the same settings as flags
    flags = ["--threshold", "0.9", "--min-component-px", "4", "--tta", "--missing-sequences", "fill"]
    assert main([*run, "--model", str(plain), *flags, "--out", str(tmp_path / "flags")]) == 0
    assert "settings from" not in capsys.readouterr().err
    by_flags = masks(tmp_path / "flags")
    assert by_flags.keys() == by_card.keys() and all(np.array_equal(by_flags[k], by_card[k]) for k in by_card)
    # ... and not what the defaults give (the card's threshold matters on these slices)
    assert main([*run, "--model", str(plain), "--missing-sequences", "fill", "--out", str(tmp_path / "defaults")]) == 0
    by_default = masks(tmp_path / "defaults")
    assert sum(int(by_default[k].astype(bool).sum()) for k in by_default) > sum(int(by_card[k].astype(bool).sum()) for k in by_card)

    # a flag wins over the card, and the note says which
    assert main([*run, "--model", str(carded), "--missing-sequences", "skip", "--no-tta", "--out", str(tmp_path / "skip")]) == 1
    err = capsys.readouterr().err
    assert "(--tta, --missing-sequences from the command line)" in err and "no t1ce file" in err
    assert len(masks(tmp_path / "skip")) == 32


def test_an_ensemble_takes_the_cards_only_when_they_agree(tmp_path: Path):
    settings = {"threshold": 0.7, "tta": True}
    first = save_with_card(tmp_path / "a.keras", settings)
    second = save_with_card(tmp_path / "b.keras", settings)
    bare = save_with_card(tmp_path / "c.keras", None)
    assert settings_for([first, second])[0] == InferenceSettings(threshold=0.7, tta=True)
    chosen, note = settings_for([first, bare])
    assert chosen == InferenceSettings() and "defaults used" in note
    card_path(second).write_text(json.dumps({"schema": CARD_SCHEMA, "inference": {"threshold": 0.6}}))
    assert settings_for([first, second])[0] == InferenceSettings()


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("{not json", "not a readable model card"),
        (json.dumps({"inference": {}}), "not a tumorseg model card"),
        (json.dumps({"schema": CARD_SCHEMA, "inference": {"threshhold": 0.4}}), "unknown inference setting(s) threshhold"),
        (json.dumps({"schema": CARD_SCHEMA, "inference": {"threshold": 1.5}}), "threshold must be in [0, 1)"),
        (json.dumps({"schema": CARD_SCHEMA, "inference": {"missing_sequences": "guess"}}), "missing_sequences must be skip or fill"),
    ],
)
def test_a_bad_card_is_one_line_naming_it(tmp_path: Path, text: str, complaint: str, capsys):
    model = save_with_card(tmp_path / "m.keras", None)
    card_path(model).write_text(text)
    with pytest.raises(ModelCardError, match="m.card.json"):
        settings_for([model])
    code = main(["predict", str(tmp_path / "nothing"), "--model", str(model), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "m.card.json" in err and complaint in err
    assert not (tmp_path / "out").exists()


def test_a_bad_flag_value_names_the_flag(tmp_path: Path, capsys):
    model = save_with_card(tmp_path / "m.keras", {"threshold": 0.4})
    assert main(["predict", str(tmp_path), "--model", str(model), "--threshold", "1.5", "--out", str(tmp_path / "out")]) == 2
    assert "--threshold must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_ship_weights_writes_the_card_from_the_scoring_workspace(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("ship_weights", PROJECT_ROOT / "scripts" / "ship_weights.py")
    ship_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship_weights)

    workspace = tmp_path / "ws"
    (workspace / "metrics").mkdir(parents=True)
    (workspace / "data" / "raw").mkdir(parents=True)
    params = (PROJECT_ROOT / "params.yaml").read_text()
    params = params.replace("  missing_sequences: skip", "  missing_sequences: fill", 1)
    assert "missing_sequences: fill" in params
    (workspace / "params.yaml").write_text(params.replace("  sequences: []", "  sequences: [t1, flair, t1ce]", 1))
    source = {"kind": "real", "origin": "/somewhere/lgg-256", "data_hash": "abc", "n_images": 40}
    (workspace / "data" / "raw" / "SOURCE.json").write_text(json.dumps(source))
    scores = {"threshold": 0.4, "min_component_px": 25, "tta": True, "tuned_on": "val", "patient_dice": 0.76, "dice": 0.68, "data_hash": "abc"}
    (workspace / "metrics" / "evaluate_umobilenetv2.json").write_text(json.dumps(scores))
    target = tmp_path / "weights" / "umobilenetv2-test.keras"
    target.parent.mkdir()
    channel_model().save(target)

    card = ship_weights.build_card(target, workspace, "CC BY-NC-SA 4.0", "Buda et al. 2019")
    assert card["inference"] == {"threshold": 0.4, "min_component_px": 25, "tta": True, "missing_sequences": "fill"}
    assert card["selection"]["inference_settings_chosen_on"] == "val"
    assert card["input"] == {"size": 32, "sequences": list(SEQS), "channels": 3}
    assert card["data"]["licence"] == "CC BY-NC-SA 4.0" and card["data"]["origin"] == "lgg-256" and card["test"]["patient_dice"] == 0.76
    card_path(target).write_text(json.dumps(card))
    chosen, _ = settings_for([target])  # the card written is one predict reads
    assert chosen == InferenceSettings(threshold=0.4, min_component_px=25, tta=True, missing_sequences="fill")

    scores["data_hash"] = "other"
    (workspace / "metrics" / "evaluate_umobilenetv2.json").write_text(json.dumps(scores))
    with pytest.raises(SystemExit, match="scored on other data"):
        ship_weights.build_card(target, workspace, "", "")
