"""The pipeline's steps on multi-sequence phantoms, end to end: download (synthetic, three
sequences) -> prepare (patient split, tumour-free slices kept, a missing sequence filled) ->
augment -> train (N-channel model, sequence dropout) -> evaluate (per-patient Dice, false-positive
rate, detection sensitivity) -> compare, with the model's sequences travelling in its file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tumorseg.config import load_config
from tumorseg.inference import Predictor
from tumorseg.pipeline.augment import augment_step
from tumorseg.pipeline.compare import compare_step
from tumorseg.pipeline.download import download_step
from tumorseg.pipeline.evaluate import evaluate_step
from tumorseg.pipeline.prepare import prepare_from_raw
from tumorseg.pipeline.train import train_step

pytestmark = pytest.mark.slow  # trains a model
SEQUENCES = ["t1", "flair", "t1ce"]


def test_multi_sequence_pipeline(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    cfg = load_config(
        params,
        {
            "profile": "full",
            "data.source": "synthetic",
            "data.synthetic_count": 80,  # 10 cases of 8 slices; case005 and case010 lack t1ce
            "data.synthetic_size": 64,
            "data.sequences": SEQUENCES,
            "prepare.empty_masks": "keep",
            "prepare.missing_sequences": "fill",
            "prepare.group_by": r"regex:^(case\d+)_",
            "prepare.val_fraction": 0.2,
            "prepare.test_fraction": 0.2,
            "prepare.workers": 1,
            "augment.copies_per_image": 1,
            "image_size": 32,
            "epochs": 2,
            "lr": 1e-3,
            "models.umobilenetv2.encoder_weights": "none",
            "train.sequence_dropout": 0.3,
            "train.threads": 1,
            "evaluate.tune_on_val": True,
        },
    )
    download_step(cfg, Path("data/raw"), progress=False)
    report = prepare_from_raw(cfg, Path("data/raw"), Path("data/prepared"), progress=False).to_json()
    assert report["sequences"] == tuple(SEQUENCES) and report["valid_pairs"] == 80
    assert report["missing_by_case"] == {"case005": {"t1ce": 8}, "case010": {"t1ce": 8}}
    assert sorted(p.name for p in Path("data/prepared/test").iterdir()) == sorted([*SEQUENCES, "masks"])
    augment_step(cfg, Path("data/prepared"), Path("data/augmented"), Path("reports/augment_preview.png"), progress=False)
    assert all((Path("data/augmented") / s).is_dir() for s in SEQUENCES)

    kwargs = dict(prepared_dir=Path("data/prepared"), augmented_dir=Path("data/augmented"), models_dir=Path("models"), metrics_dir=Path("metrics"))
    train_step(cfg, "umobilenetv2", **kwargs, params_path=params, progress=False)
    model_file = Path("models/umobilenetv2.keras")
    assert Predictor.load(model_file).sequences == tuple(SEQUENCES)  # the file carries its sequences
    import mlflow

    (run,) = mlflow.search_runs(experiment_names=["tumorseg"], output_format="list")
    assert run.data.tags["sequences"] == "+".join(SEQUENCES) and run.data.tags["data_source"] == "synthetic"

    results = evaluate_step(
        cfg, ["umobilenetv2"], prepared_dir=Path("data/prepared"), models_dir=Path("models"), metrics_dir=Path("metrics"), reports_dir=Path("reports")
    )
    metrics = json.loads(Path("metrics/evaluate_umobilenetv2.json").read_text())
    assert metrics["dice"] == pytest.approx(results["umobilenetv2"]["dice"])
    test_slices = len(list(Path("data/prepared/test/masks").iterdir()))
    assert metrics["n_images"] == test_slices == metrics["n_tumour_slices"] + metrics["n_tumour_free_slices"]
    assert metrics["n_tumour_free_slices"] == 2 * metrics["n_patients"]  # the first and last slice of every case
    for key in ("dice", "patient_dice", "detection_sensitivity", "false_positive_rate"):
        assert 0.0 <= metrics[key] <= 1.0, key
    rows = Path("reports/evaluate_umobilenetv2/per_image.csv").read_text().splitlines()[1:]
    assert set(metrics["patient_dice_by_patient"]) == {row.split(",")[1] for row in rows}  # column 2: the slice's patient
    assert metrics["data_source"] == "synthetic"

    compare_step(["umobilenetv2"], metrics_dir=Path("metrics"), reports_dir=Path("reports"))
    report = next(Path("reports").glob("comparison*.md")).read_text()
    for row in ("Dice per patient (slices stacked)", "Detection sensitivity", "False-positive rate (tumour-free slices)"):
        assert row in report, row
