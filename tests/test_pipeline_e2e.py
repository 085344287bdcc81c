"""The whole DVC pipeline at tiny scale in a temporary copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_PIPELINE, copy_pipeline
from tumorseg.io import is_metric, read_metrics


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    root = copy_pipeline(tmp_path_factory.mktemp("e2e") / "project", TINY_PIPELINE)

    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        DVC_NO_ANALYTICS="1",
        CI="true",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost",
    )
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "copy"], root, env)
    result = run([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env | {"_log": result.stdout + result.stderr}


@pytest.mark.slow
def test_every_stage_writes_its_documented_outputs(project):
    root, _ = project
    for path in [
        "data/raw/SOURCE.json",
        "data/prepared/report.json",
        "data/prepared/manifest.csv",
        "metrics/prepare.json",
        "data/augmented/report.json",
        "reports/augment_preview.png",
        "models/unet.keras",
        "models/umobilenetv2.keras",
        "metrics/history_unet.csv",
        "metrics/history_umobilenetv2.csv",
        "reports/evaluate_unet/per_image.csv",
        "reports/evaluate_unet/overlays.png",
        "reports/comparison.md",
        "reports/comparison.png",
        "dvc.lock",
    ]:
        assert (root / path).exists(), path
    metric_files = sorted((root / "metrics").glob("*.json"))
    for path in metric_files:  # metric files hold numbers only: `dvc metrics show` stays a table of numbers
        if not path.name.endswith(".info.json"):
            assert all(is_metric(value) for value in json.loads(path.read_text()).values()), path.name
    for model in ("unet", "umobilenetv2"):
        train = read_metrics(root / f"metrics/train_{model}.json")
        assert {"best_epoch", "best_val_dice", "seconds_per_epoch", "ms_per_step", "params_total", "data_source", "mlflow_run_id"} <= train.keys()
        assert train["data_source"] == "synthetic" and train["epochs_run"] == train["epochs_planned"] == 2
        assert train["init_from"] == "none" and train["params_changed_on_resume"] == []
        assert "data_source" not in json.loads((root / f"metrics/train_{model}.json").read_text())  # in train_<model>.info.json
        evaluation = read_metrics(root / f"metrics/evaluate_{model}.json")
        expected = {"dice", "iou", "precision", "recall", "specificity", "accuracy", "loss", "hd95", "ms_per_image", "data_source", "n_images", "global_dice"}
        assert expected <= evaluation.keys()
        assert evaluation["data_source"] == "synthetic"
        assert not (root / "models" / ".state" / model).exists(), "resume state left after a completed run"
    ensemble = read_metrics(root / "metrics/evaluate_ensemble.json")
    assert ensemble["members"] == ["unet", "umobilenetv2"] and ensemble["data_source"] == "synthetic"
    assert 0.0 <= ensemble["dice"] <= 1.0 and (root / "reports/evaluate_ensemble/per_image.csv").exists()
    comparison = json.loads((root / "reports/comparison.json").read_text())
    assert comparison["data_source"] == "SYNTHETIC phantoms" and "dice" in comparison["winners"]
    assert set(comparison["models"]) == {"unet", "umobilenetv2", "ensemble"}
    assert "SYNTHETIC" in (root / "reports/comparison.md").read_text()


@pytest.mark.slow
def test_mlflow_holds_one_tagged_run_per_model_with_test_metrics(project):
    import mlflow

    root, _ = project
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tumorseg")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model"] for r in runs) == ["ensemble", "umobilenetv2", "unet"]
    pipelines = {r.data.tags["pipeline"] for r in runs}
    assert len(pipelines) == 1, "runs of one dvc repro must share the pipeline tag"
    (ensemble,) = [r for r in runs if r.data.tags["model"] == "ensemble"]
    trained = {r.data.tags["model"]: r.info.run_id for r in runs if r.data.tags["model"] != "ensemble"}
    assert ensemble.data.tags["member_run_unet"] == trained["unet"] and ensemble.data.tags["member_run_umobilenetv2"] == trained["umobilenetv2"]
    assert ensemble.data.tags["data_source"] == "synthetic" and "test_dice" in ensemble.data.metrics
    for r in runs:
        if r.data.tags["model"] == "ensemble":
            continue
        tags = r.data.tags
        for key in ("data_source", "data_hash", "git_commit", "tensorflow_version", "keras_version", "seed"):
            assert tags.get(key), key
        assert tags["data_source"] == "synthetic"
        assert (tags["seed"], tags["train_seed"]) == ("42", "7"), "the split seed and the training seed are recorded apart"
        assert tags["sequences"] == "image", "a grayscale model says so"
        assert r.data.params["lr"] == "0.0001" and r.data.params["epochs"] == "2"
        assert {"val_dice", "best_val_dice", "test_dice", "test_hd95", "ms_per_step"} <= r.data.metrics.keys()
        assert len(client.get_metric_history(r.info.run_id, "val_dice")) == 2
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"history", "evaluation", "metrics"} <= artifacts
        # the model is a LoggedModel of the run (the Models tab), not a run artifact
        found = f"source_run_id = '{r.info.run_id}'"
        (logged,) = client.search_logged_models(experiment_ids=[experiment.experiment_id], filter_string=found)
        assert logged.name == "model" and str(logged.status).endswith("READY")


@pytest.mark.slow
def test_second_repro_is_a_no_op(project):
    root, env = project
    result = run([sys.executable, "-m", "dvc", "repro"], root, env)
    output = result.stdout + result.stderr
    assert "Running stage" not in output, output


@pytest.mark.slow
def test_outputs_round_trip_through_a_local_dvc_remote(project, tmp_path: Path):
    """`dvc push` to a directory remote, delete the outputs, `dvc pull` them back."""
    root, env = project
    remote = tmp_path / "remote"
    run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-f", "storage", str(remote)], root, env)
    run([sys.executable, "-m", "dvc", "push", "-r", "storage"], root, env)
    original = (root / "models" / "unet.keras").read_bytes()
    shutil.rmtree(root / "models")  # cached outputs; metric files (cache: false) stay in git
    shutil.rmtree(root / "data" / "prepared" / "train")
    (root / "data" / "prepared" / "manifest.csv").unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    run([sys.executable, "-m", "dvc", "pull", "-r", "storage"], root, env)
    assert (root / "models" / "unet.keras").read_bytes() == original
    assert (root / "data" / "prepared" / "manifest.csv").exists()
    status = run([sys.executable, "-m", "dvc", "status"], root, env)
    assert "changed" not in status.stdout, status.stdout


@pytest.mark.slow
def test_a_second_clone_pulls_and_reproduces_without_training(project, tmp_path: Path):
    """A teammate's clone: `git clone` + `dvc pull` from the shared remote gives the same data,
    models and metrics, and `dvc repro` there runs no stage (nothing is retrained)."""
    root, env = project
    remote = tmp_path / "shared-remote"
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "-f", "team", str(remote)], root, env)  # in .dvc/config: travels with git
    run([sys.executable, "-m", "dvc", "push"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "results of dvc repro"], root, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models").exists(), "models must come from the DVC remote, not from git"
    run([sys.executable, "-m", "dvc", "pull"], clone, env)
    for name in ("models/unet.keras", "models/umobilenetv2.keras", "data/prepared/manifest.csv", "metrics/evaluate_unet.json", "reports/comparison.json"):
        assert (clone / name).read_bytes() == (root / name).read_bytes(), name
    result = run([sys.executable, "-m", "dvc", "repro"], clone, env)
    assert "Running stage" not in result.stdout + result.stderr, result.stdout[-3000:]
    status = run([sys.executable, "-m", "dvc", "status"], clone, env)
    assert "changed" not in status.stdout, status.stdout
