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


def test_lgg_study_table_compares_runs_per_institution_and_on_common_patients(tmp_path):
    import json

    lgg_study = _script("lgg_study")
    cases = tmp_path / "cases.csv"
    cases.write_text("case,institution,slices,tumour_slices,sequences\nA_1,DU,3,1,t1;flair\nB_2,HT,3,1,flair\nC_3,DU,3,1,t1;flair\n")
    runs = {"all": ({"A_1": 0.8, "B_2": 0.2, "C_3": 0.9}, ["t1", "flair"]), "t1": ({"A_1": 0.7, "C_3": 0.5}, ["t1"])}
    for name, (by_patient, sequences) in runs.items():
        folder = tmp_path / name
        folder.mkdir()
        mean = float(np.mean(list(by_patient.values())))
        (folder / "evaluate_umobilenetv2.json").write_text(json.dumps({"patient_dice": mean, "n_patients": len(by_patient), "dice": 0.6, "hd95": 12.0}))
        (folder / "evaluate_umobilenetv2.info.json").write_text(json.dumps({"patient_dice_by_patient": by_patient, "data_source": "real"}))
        (folder / "train_umobilenetv2.json").write_text(json.dumps({"best_epoch": 5, "epochs_run": 8, "best_val_dice": 0.81}))
        (folder / "params.yaml").write_text(f"image_size: 128\ndata:\n  sequences: [{', '.join(sequences)}]\n")
    out = tmp_path / "study.json"
    text = lgg_study.table([tmp_path / "all", tmp_path / "t1"], cases, out)
    lines = text.splitlines()
    assert "the 2 patients all runs saw" in lines[0] and len(lines) == 4
    assert "| T1, FLAIR | 128², 8 (best 5) | 0.810 | 3 | **0.633** | 0.850 |" in lines[2]  # common patients A_1, C_3
    assert "DU 0.85 (2), HT 0.20 (1)" in lines[2] and "| **0.600** | 0.600 |" in lines[3]
    saved = json.loads(out.read_text())
    assert saved["common_patients"] == ["A_1", "C_3"] and saved["runs"][1]["patient_dice_by_institution"] == {"DU": {"patients": 2, "patient_dice": 0.6}}


def test_lgg_study_table_shows_an_ensemble_with_its_members_and_tuned_validation_dice(tmp_path):
    import json

    lgg_study = _script("lgg_study")
    folder = tmp_path / "ensemble"
    folder.mkdir()
    (folder / "evaluate_ensemble.json").write_text(json.dumps({"patient_dice": 0.7, "n_patients": 1, "val_dice_tuned": 0.79}))
    (folder / "evaluate_ensemble.info.json").write_text(json.dumps({"patient_dice_by_patient": {"A_1": 0.7}, "members": ["unet", "umobilenetv2"]}))
    (folder / "params.yaml").write_text("image_size: 128\n")
    row = lgg_study.table([folder], None, None).splitlines()[2]
    assert row.startswith("| ensemble of unet + umobilenetv2 | image | 128², the members' runs above | 0.790 | 1 | **0.700** |"), row


def test_lgg_study_patients_finds_the_patient_behind_a_gap(tmp_path):
    import json

    lgg_study = _script("lgg_study")
    cases = tmp_path / "cases.csv"
    cases.write_text("case,institution,slices,tumour_slices,sequences\nA,DU,2,1,t1;flair\nB,FG,2,1,flair\n")
    header = "file,patient,tp,fp,fn,truth_pixels,pred_pixels\n"
    rows = [  # A: Dice 2*8/(16+2+2) = 0.8, its tumour-free slice clean; B: 2*1/(2+30) = 0.0625, its tumour-free slice flagged
        "A_1.png,A,8,2,2,10,10", "A_2.png,A,0,0,0,0,0", "B_1.png,B,1,20,0,1,21", "B_2.png,B,0,10,0,0,10",
    ]
    (tmp_path / "per_image.csv").write_text(header + "\n".join(rows) + "\n")
    (tmp_path / "evaluate_unet.json").write_text(json.dumps({"patient_dice_by_patient": {"A": 0.8, "B": 0.0625}}))  # as evaluate scored them
    out = tmp_path / "patients.json"
    text = lgg_study.patients(tmp_path, cases, out)
    assert "| B | FG | flair | 0.062 | 30 | 0 | 1 / 1 |" in text
    saved = json.loads(out.read_text())
    assert list(saved["patients"]) == ["B", "A"]  # worst first
    assert saved["all"] == {"patients": 2, "patient_dice": pytest.approx((0.8 + 0.0625) / 2), "false_positive_rate": 0.5}
    assert saved["without_worst"] == {"patient": "B", "patients": 1, "patient_dice": pytest.approx(0.8), "false_positive_rate": 0.0}


def test_volume_filter_keeps_each_patients_3d_components_in_slice_order():
    """Components are found per patient across neighbouring slices, ordered by the slice number
    (not the listing order); another patient's blobs never join them."""
    volume_filter = _script("lgg_volume_filter").volume_filter
    blank = np.zeros((8, 8), bool)
    big, small = blank.copy(), blank.copy()
    big[1:5, 1:5] = True  # 16 px per slice
    small[6:8, 6:8] = True  # 4 px, not touching the big blob
    names = ["a_3.png", "a_1.png", "a_2.png", "a_4.png", "b_1.png"]
    masks = [big, big, blank, big | small, big]
    patients = ["a", "a", "a", "a", "b"]
    # in slice order a_1 (big), a_2 (blank), a_3 (big), a_4 (big + small): components of 16, 32 and 4 px
    largest = volume_filter(masks, names, patients, "largest", None)
    assert [m.sum() for m in largest] == [16, 0, 0, 16, 16]  # a_3 + a_4's big blob (32) stays; b keeps its own
    assert [m.sum() for m in volume_filter(masks, names, patients, "min_voxels", 10)] == [16, 16, 0, 16, 16]  # only the 4-px blob goes
    assert [m.sum() for m in volume_filter(masks, names, patients, "fraction", 0.6)] == [16, 0, 0, 16, 16]  # 16 < 0.6 * 32
    assert volume_filter(masks, names, patients, "none", None) is masks
