"""Killing training with SIGKILL and re-running resumes; mirrored training runs on 2 CPU devices."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT_ROOT, TINY_UNET, train_stage_command
from tumorseg.config import load_config
from tumorseg.data.synthetic import write_synthetic_dataset
from tumorseg.pipeline.prepare import prepare_step


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("killed")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(epochs=5, image_size=32, lr=1e-3)
    params["models"]["unet"].update(TINY_UNET)
    params["train"].update(deterministic=False, early_stopping_patience=0, reduce_lr_patience=0)
    params["prepare"].update(group_by="none", workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_synthetic_dataset(root / "raw", count=48, size=32, seed=0, progress=False)
    prepare_step(
        load_config(root / "params.yaml"),
        root / "raw" / "images",
        root / "raw" / "masks",
        root / "data" / "prepared",
        progress=False,
        report_extra={"data_source": "synthetic", "data_origin": "test", "data_hash": "0" * 64},
    )
    return root


def _env(root: Path) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", CI="true", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _epochs_in_history(root: Path) -> list[int]:
    path = root / "metrics" / "history_unet.csv"
    if not path.exists():
        return []
    with open(path) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_resumes_without_repeating_epochs(project: Path):
    root = project
    process = subprocess.Popen(train_stage_command(root), cwd=root, env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(_epochs_in_history(root)) < 2 and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = _epochs_in_history(root)
    assert len(done_before) >= 2
    assert (root / "models" / ".state" / "unet").is_dir(), "resume state must survive the kill"

    result = subprocess.run(train_stage_command(root), cwd=root, env=_env(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _epochs_in_history(root) == [1, 2, 3, 4, 5], "every epoch exactly once"
    assert "resuming training" in result.stderr
    assert f"Epoch {len(done_before) + 1}/5" in result.stdout + result.stderr, "must restart after the last completed epoch"
    assert not (root / "models" / ".state" / "unet").exists()

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tumorseg").experiment_id])
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(project: Path, tmp_path: Path):
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pathlib import Path
        from tumorseg.config import load_config
        from tumorseg.runtime import distribution_strategy
        from tumorseg.training import train_model
        cfg = load_config({str(project / 'params.yaml')!r})
        assert distribution_strategy("mirrored").num_replicas_in_sync == 2
        out = Path({str(tmp_path)!r})
        result = train_model("unet", architecture=cfg.models.unet, loss=cfg.loss,
            train=cfg.train.model_copy(update={{"distribute": "mirrored"}}), augment=cfg.augment,
            lr=1e-3, epochs=1, batch_size=4, image_size=32, seed=0, prepared_dir=Path({str(project / 'data' / 'prepared')!r}),
            augmented_dir=None, model_path=out / "m.keras", history_path=out / "h.csv", state_dir=out / "state", progress=False)
        print("REPLICAS_OK", result.epochs_run, (out / "m.keras").exists())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=_env(project))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPLICAS_OK 1 True" in result.stdout


@pytest.mark.slow
def test_chaos_script_survives_random_sigkills(tmp_path: Path):
    """benchmarks/chaos_train.py at small scale: 2 SIGKILLs at seeded random points, every check passes,
    and the resumed run equals an uninterrupted one."""
    out = tmp_path / "chaos.json"
    command = [
        sys.executable,
        str(PROJECT_ROOT / "benchmarks" / "chaos_train.py"),
        "--kills", "2",
        "--seed", "3",
        "--epochs", "4",
        "--count", "32",
        "--workdir", str(tmp_path / "project"),
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["kills_done"] == 2 and summary["epochs_redone"] == 0 and summary["checks_passed"]
    assert all(kill["checks"]["passed"] and kill["checks"]["mlflow_runs"] <= 1 for kill in summary["kills"])
    final = summary["final"]
    assert final["passed"] and final["mlflow_runs"] == 1 and final["history_csv_epochs"] == 4
    assert set(final["mlflow_steps"].values()) == {4}, "one MLflow value per epoch and metric"
    equality = final["resume_equality"]  # determinism, dropout, augmentation, plateau and early stopping on
    assert equality["identical"] and equality["epochs"] == 4, equality
