"""The pipeline's steps on multi-sequence phantoms, end to end: download (synthetic, three
sequences) -> prepare (patient split, tumour-free slices kept, a missing sequence filled) ->
augment -> train (N-channel model, sequence dropout) -> evaluate (per-patient Dice, false-positive
rate, detection sensitivity) -> compare, with the model's sequences travelling in its file."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tumorseg.config import load_config
from tumorseg.inference import Predictor
from tumorseg.io import read_metrics
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
            "registry.register_best": True,
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
    (run,) = mlflow.search_runs(experiment_names=["tumorseg"], output_format="list")
    assert run.data.tags["sequences"] == "+".join(SEQUENCES) and run.data.tags["data_source"] == "synthetic"

    results = evaluate_step(
        cfg, ["umobilenetv2"], prepared_dir=Path("data/prepared"), models_dir=Path("models"), metrics_dir=Path("metrics"), reports_dir=Path("reports")
    )
    metrics = read_metrics(Path("metrics/evaluate_umobilenetv2.json"))
    assert metrics["dice"] == pytest.approx(results["umobilenetv2"]["dice"])

    # MLflow: the model is a LoggedModel of its run with the test metrics beside it, the splits are
    # dataset inputs, and register_best put the best-on-validation model behind the alias
    (run,) = mlflow.search_runs(experiment_names=["tumorseg"], output_format="list")
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.source_run_id == run.info.run_id and logged.tags["sequences"] == "+".join(SEQUENCES)
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test_dice"] == pytest.approx(metrics["dice"]) and "best_val_dice" in linked
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {name.split(":")[1]: tags["mlflow.data.context"] for name, tags in inputs.items()} == {"train": "training", "val": "validation", "test": "test"}
    assert all(tags["kind"] == "synthetic" for tags in inputs.values())
    registered = json.loads(Path("reports/registered.json").read_text())
    assert registered["model"] == "umobilenetv2" and registered["alias_uri"] == "models:/tumorseg@candidate"
    assert mlflow.MlflowClient().get_model_version_by_alias("tumorseg", "candidate").source == f"models:/{logged.model_id}"
    probe = np.zeros((1, 32, 32, len(SEQUENCES)), np.float32)
    from_registry = Predictor.load("models:/tumorseg@candidate").model.predict(probe, verbose=0)
    np.testing.assert_allclose(from_registry, Predictor.load(model_file).model.predict(probe, verbose=0), atol=1e-6)
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
