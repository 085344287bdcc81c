"""The CI metric gate, the comparison report, and tracking-store resolution."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tumorseg import tracking
from tumorseg.cli import main as cli_main
from tumorseg.gates import check_metrics
from tumorseg.reporting import compare_models


def write_metrics(folder: Path, model: str, **values) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"evaluate_{model}.json").write_text(json.dumps({"data_source": "synthetic", **values}))


def test_gate_passes_and_fails_on_thresholds(tmp_path: Path):
    write_metrics(tmp_path, "unet", dice=0.71, iou=0.6)
    write_metrics(tmp_path, "umobilenetv2", dice=0.65, iou=0.5)
    checks = check_metrics(
        tmp_path,
        models=["unet", "umobilenetv2"],
        profile="quick",
        min_dice={"quick": {"unet": 0.7, "umobilenetv2": 0.7}},
        baseline_dir=None,
        max_regression=0.02,
    )
    assert [(c.model, c.passed) for c in checks] == [("unet", True), ("umobilenetv2", False)]


def test_gate_catches_a_regression_against_the_baseline(tmp_path: Path):
    write_metrics(tmp_path / "now", "unet", dice=0.80, iou=0.70)
    write_metrics(tmp_path / "base", "unet", dice=0.85, iou=0.71)
    checks = check_metrics(tmp_path / "now", models=["unet"], profile="full", min_dice={}, baseline_dir=tmp_path / "base", max_regression=0.02)
    failed = {c.check for c in checks if not c.passed}
    assert failed == {"dice >= baseline - 0.02"}


def test_check_metrics_command_exits_non_zero_with_a_table(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_metrics(tmp_path / "metrics", "unet", dice=0.2)
    write_metrics(tmp_path / "metrics", "umobilenetv2", dice=0.9)
    code = cli_main(["check-metrics", "--metrics-dir", "metrics"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "PASS" in out and "metric gate: FAILED" in out
    # missing file: a failing check naming it, not a traceback
    (tmp_path / "metrics" / "evaluate_unet.json").unlink()
    assert cli_main(["check-metrics", "--metrics-dir", "metrics"]) == 1
    assert "missing" in capsys.readouterr().out


def test_comparison_names_the_winner_honestly():
    results = {
        "unet": {"dice": 0.81, "global_dice": 0.8, "iou": 0.7, "loss": 0.3, "hd95": 4.0, "params_total": 100, "ms_per_step": 10.0, "ms_per_image": 2.0},
        "umobilenetv2": {
            "dice": 0.78,
            "global_dice": 0.82,
            "iou": 0.68,
            "loss": 0.2,
            "hd95": 5.0,
            "params_total": 200,
            "ms_per_step": 5.0,
            "ms_per_image": 1.0,
        },
    }
    markdown, summary = compare_models(results, "SYNTHETIC phantoms", "facts")
    assert summary["winners"]["dice"] == "unet"
    assert summary["winners"]["loss"] == "umobilenetv2" and summary["winners"]["hd95"] == "unet"
    assert "Winner on per-image Dice: unet" in markdown and "SYNTHETIC" in markdown
    assert "0.8249" in markdown  # the paper's number, for context


def test_tracking_store_resolves_to_the_workspace_from_a_dvc_temp_copy(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_copy.mkdir(parents=True)
    assert tracking.workspace_root(temp_copy) == tmp_path / "project"
    assert tracking.tracking_uri(temp_copy) == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(temp_copy) == "http://127.0.0.1:1"


def test_unreachable_tracking_server_fails_fast_before_training(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="127.0.0.1:9"):
        tracking.check_tracking("http://127.0.0.1:9")  # discard port: nothing listens
    assert time.monotonic() - started < 30


def test_comparison_adds_the_ensemble_of_exactly_these_models(tmp_path: Path):
    from tumorseg.pipeline.compare import compare_step

    metrics = tmp_path / "metrics"
    for model, dice, size, epochs in (("unet", 0.70, 256, 6), ("umobilenetv2", 0.72, 128, 64)):
        write_metrics(metrics, model, dice=dice, n_images=10)
        facts = {
            "params_total": 100,
            "ms_per_step": 5.0,
            "best_val_dice": dice,
            "best_epoch": 3,
            "image_size": size,
            "epochs_run": epochs,
            "batch_size": 8,
            "effective_lr": 3e-4 if model == "unet" else 1e-3,
        }
        facts |= {"init_from": "unet-128.keras"} if model == "unet" else {"init_from": "none", "epochs_planned": 80}  # the U-Net's JSON predates epochs_planned
        facts |= {"distill_teachers": ["weights/unet-figshare.keras", "weights/umobilenetv2-figshare.keras"]} if model == "umobilenetv2" else {}
        (metrics / f"train_{model}.json").write_text(json.dumps(facts))
    write_metrics(metrics, "ensemble", dice=0.75, n_images=10, members=["unet", "umobilenetv2"])
    summary = compare_step(["unet", "umobilenetv2"], metrics_dir=metrics, reports_dir=tmp_path / "reports")
    assert list(summary["models"]) == ["unet", "umobilenetv2", "ensemble"] and summary["winners"]["dice"] == "ensemble"
    assert summary["models"]["ensemble"]["params_total"] == 200
    report = (tmp_path / "reports" / "comparison.md").read_text()
    assert "| metric | unet | umobilenetv2 | ensemble | better |" in report
    # each model's own training, whatever params.yaml says now (models from different runs)
    assert "| | unet | umobilenetv2 |" in report and "| input size (px) | 256 | 128 |" in report
    assert "| epochs trained | 6 | 64 |" in report and "| learning rate (peak) | 0.0003 | 0.001 |" in report
    assert "| distilled from | — | `weights/unet-figshare.keras, weights/umobilenetv2-figshare.keras` |" in report
    assert "| started from | `unet-128.keras` | `none` |" in report and "| epochs planned (early stopping may end sooner) | — | 80 |" in report
    write_metrics(metrics, "ensemble", dice=0.75, n_images=10, members=["unet", "other"])  # stale: not shown
    assert list(compare_step(["unet", "umobilenetv2"], metrics_dir=metrics, reports_dir=tmp_path / "reports")["models"]) == ["unet", "umobilenetv2"]


def test_report_numbers_keep_the_digits_that_mean_something():
    from tumorseg.reporting import format_number

    assert format_number(0.75241) == "0.7524"  # a score
    assert format_number(55.4905) == "55.5"  # ms per image
    assert format_number(12.86473) == "12.9"  # HD95 in pixels
    assert format_number(5_400_321) == "5,400,321"  # parameter count
    assert format_number(12345.6) == "12,346"
    assert format_number(None) == "—" and format_number(float("nan")) == "—"


def test_metric_files_hold_numbers_and_their_info_sibling_the_rest(tmp_path: Path):
    from tumorseg.io import info_path, read_metrics
    from tumorseg.io import write_metrics as write_metric_file

    values = {
        "dice": 0.8, "hd95": None, "n_images": 10, "tta": True, "model": "unet", "members": ["a", "b"],
        "dice_by_class": {"glioma": 0.6, "meningioma": 0.9}, "patient_dice_by_patient": {"p1": 0.7, "p2": 0.9},
    }
    path = tmp_path / "evaluate_unet.json"
    assert write_metric_file(path, values, detail=("patient_dice_by_patient",)) is values
    assert info_path(path) == tmp_path / "evaluate_unet.info.json"
    assert json.loads(path.read_text()) == {"dice": 0.8, "hd95": None, "n_images": 10, "dice_by_class": {"glioma": 0.6, "meningioma": 0.9}}
    assert json.loads(info_path(path).read_text()) == {"tta": True, "model": "unet", "members": ["a", "b"], "patient_dice_by_patient": {"p1": 0.7, "p2": 0.9}}
    assert read_metrics(path) == values
    info_path(path).unlink()  # a file written before the split reads as it is
    assert read_metrics(path) == json.loads(path.read_text())
