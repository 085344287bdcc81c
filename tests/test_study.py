"""The study report reads every tracked run back: curves per run and only the levers that vary."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from tumorseg import tracking
from tumorseg.cli import main
from tumorseg.study import ablation_markdown, mean_std, run_seed, seed_groups, seeds_markdown, select_runs, varying_params


def _fake_run(uri: str, name: str, model: str, lr_schedule: str, dices: list[float], source: str = "real") -> None:
    with tracking.run(uri, run_id=None, run_name=name, tags={"model": model, "data_source": source, "dvc_experiment": name}):
        tracking.log_params({"lr": 1e-4, "train.lr_schedule": lr_schedule, f"models.{model}.alpha": 1.0, "profile": name, "model": model, "epochs": len(dices)})
        for epoch, value in enumerate(dices, start=1):
            tracking.log_metrics({"val_dice": value}, step=epoch)
        tracking.log_metrics(
            {
                "best_val_dice": max(dices),
                "test_dice": max(dices) - 0.01,
                "test_dice_by_class_glioma": 0.5,
                "ms_per_step": 305.44,
                "test_threshold": 0.45,
                "test_min_component_px": 50,
            }
        )


def test_study_lists_runs_with_their_levers_and_draws_curves(tmp_path: Path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _fake_run(uri, "plateau", "umobilenetv2", "plateau", [0.3, 0.5, 0.6])
    _fake_run(uri, "cosine", "umobilenetv2", "cosine", [0.35, 0.55, 0.7, 0.72])
    _fake_run(uri, "phantoms", "unet", "plateau", [0.8], source="synthetic")

    runs = select_runs(tracking.study_runs(uri), data_source="real")
    assert [r["tags"]["dvc_experiment"] for r in runs] == ["plateau", "cosine"]
    assert runs[1]["history"] == [(1, 0.35), (2, 0.55), (3, 0.7), (4, 0.72)]
    # lr and alpha are equal; profile is bookkeeping; epochs and model have their own columns
    assert varying_params(runs) == ["train.lr_schedule"]
    table = ablation_markdown(runs)
    # scores to 4 decimals, timings to 1, the blob size (a float in MLflow) as the count it is
    assert "| umobilenetv2 · cosine | cosine | 4 | 0.7200 | 0.7100 | 0.5000 | — | 305.4 | 0.4500 | 50 |" in table

    assert main(["study", "--out", str(tmp_path / "study"), "--data-source", "real"]) == 0
    chart = cv2.imread(str(tmp_path / "study" / "val_dice_curves.png"))
    assert chart is not None and chart.shape[1] > 400
    assert "train.lr_schedule" in (tmp_path / "study" / "ablation.md").read_text()
    assert main(["study", "--out", str(tmp_path / "none"), "--model", "unet", "--data-source", "real"]) == 1


def test_a_models_own_settings_show_only_in_its_rows_and_scoring_settings_are_no_levers():
    def run(model: str, init_unet: str, init_umnv2: str, tta: str) -> dict:
        params = {"train.init_from.unet": init_unet, "train.init_from.umobilenetv2": init_umnv2, "evaluate.tta": tta, "image_size": "256"}
        return {
            "tags": {"model": model, "dvc_experiment": f"{model}-{init_unet}-{init_umnv2}"},
            "params": params,
            "metrics": {"best_val_dice": 0.8},
            "history": [(1, 0.8)],
            "run_name": model,
        }

    runs = [run("unet", "none", "none", "False"), run("unet", "u.keras", "none", "True"), run("umobilenetv2", "u.keras", "m.keras", "True")]
    # unet's init differs between unet runs; umobilenetv2's init is the same within its one run
    assert varying_params(runs) == ["train.init_from.unet"]
    rows = ablation_markdown(runs).splitlines()[2:]
    assert rows[1].startswith("| unet · unet-u.keras-none | u.keras |")
    assert rows[2].startswith("| umobilenetv2 · umobilenetv2-u.keras-m.keras | — |")  # not umobilenetv2's setting


def test_settings_added_later_are_columns_only_when_their_logged_values_differ():
    def run(name: str, **params) -> dict:
        return {
            "tags": {"model": "umobilenetv2", "dvc_experiment": name},
            "params": {"lr": "0.001", **params},
            "metrics": {"best_val_dice": 0.8},
            "history": [],
            "run_name": name,
        }

    old = run("old")  # trained before loss.focal_* and pretrain.* existed
    runs = [
        old,
        run("focal", **{"loss.focal_weight": "1.0", "loss.focal_gamma": "2.0", "pretrain.epochs": "10"}),
        run("plain", **{"loss.focal_weight": "0.0", "loss.focal_gamma": "2.0", "pretrain.epochs": "10"}),
    ]
    # focal_weight differs between the runs that logged it; gamma and pretrain.epochs were the same wherever logged
    assert varying_params(runs) == ["loss.focal_weight"]
    assert "| umobilenetv2 · old | — |" in ablation_markdown(runs)
    # a key only one run logged cannot be compared: it stays visible
    assert varying_params([old, run("new", **{"train.ema_momentum": "0.999"})]) == ["train.ema_momentum"]


def test_runs_that_differ_only_in_their_seed_are_summarised_as_mean_and_std():
    def run(seed: str | None, lr: str = "0.0001", threads: str = "0", test: float = 0.7, **tags) -> dict:
        params = {"lr": lr, "train.threads": threads, "epochs": "40", "evaluate.tta": "True"}
        if seed is not None:  # runs logged before train.seed existed lack the key
            params["train.seed"] = seed
        run_tags = {"model": "umobilenetv2", "data_source": "real", "data_hash": "h", "seed": "42", "dvc_experiment": f"s{seed}-{lr}"} | tags
        if seed not in (None, "None"):
            run_tags["train_seed"] = seed
        return {"tags": run_tags, "params": params, "metrics": {"best_val_dice": 0.8, "test_dice": test}, "history": [], "run_name": "r"}

    shipped = run(None, test=0.70)
    runs = [
        shipped,
        run("1", threads="1", test=0.72),
        run("2", threads="1", test=0.74),
        run("1", lr="0.001"),
        run("1", threads="1", test=0.9),
        run("3", model="unet"),
    ]
    groups = seed_groups(runs)
    # the repeat of seed 1, the other lr and the other model are not seeds of the shipped configuration
    assert [[run_seed(r) for r in group] for group in groups] == [["42", "1", "2"]]
    assert mean_std([0.70, 0.72, 0.74]) == pytest.approx((0.72, 0.02))
    row = seeds_markdown(groups).splitlines()[2]
    assert row.startswith("| umobilenetv2 · sNone-0.0001 | 42, 1, 2 | 0.8000 ± 0.0000 | 0.7200 ± 0.0200 | — |")
