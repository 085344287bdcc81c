"""One function per pipeline step, shared by the DVC stage scripts and the ``tumorseg`` CLI.

Each takes the validated :class:`~tumorseg.config.Config` plus explicit paths (the paths live in
``dvc.yaml``), does the work through the library, and returns what it wrote.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg import tracking
from tumorseg.config import Config, check_image_size
from tumorseg.data.prepare import PrepareReport, prepare_dataset
from tumorseg.data.sources import SourceInfo, data_label, download, read_source_info, report_fields
from tumorseg.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from tumorseg.training import ResumeState, clear_state, initial_weights_file, read_state, remember_run_id, sweep_temporaries, train_model, update_state

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"  # the evaluated mean of all models: metrics/evaluate_ensemble.json


def download_step(cfg: Config, out_dir: Path, progress: bool = True) -> SourceInfo:
    d = cfg.data
    info = download(
        out_dir,
        source=d.source,
        kaggle_dataset=d.kaggle_dataset,
        network_timeout_s=d.network_timeout_s,
        local_path=d.local_path,
        image_dir=d.image_dir,
        mask_dir=d.mask_dir,
        mask_suffix=d.mask_suffix,
        synthetic_count=d.synthetic_count,
        synthetic_size=d.synthetic_size,
        seed=cfg.seed,
        progress=progress,
    )
    log.info("download: %d images, %d masks -> %s [%s]", info.n_images, info.n_masks, out_dir, data_label(info))
    return info


def prepare_step(
    cfg: Config,
    images_dir: Path,
    masks_dir: Path,
    out_dir: Path,
    progress: bool = True,
    *,
    size: int | None = None,
    on_error: str | None = None,
    mask_suffix: str | None = None,
    report_extra: dict | None = None,
) -> PrepareReport:
    """Prepare with the config's settings; explicit arguments (from the CLI) win over it."""
    p = cfg.prepare
    report = prepare_dataset(
        images_dir,
        masks_dir,
        out_dir,
        size=cfg.image_size if size is None else check_image_size(size),  # 0 is an error, not the default
        on_error=on_error or p.on_error,
        mask_threshold=p.mask_threshold,
        empty_masks=p.empty_masks,
        mask_suffix=cfg.data.mask_suffix if mask_suffix is None else mask_suffix,
        val_fraction=p.val_fraction,
        test_fraction=p.test_fraction,
        group_by=p.group_by,
        n_strata=p.size_strata,
        seed=cfg.seed,
        workers=p.workers,
        progress=progress,
        report_extra=report_extra,
    )
    rate = report.valid_pairs / report.seconds if report.seconds else 0.0
    log.info(
        "prepare: %d valid pairs (train %d / val %d / test %d), %d skipped %s, %.0f pairs/s -> %s",
        report.valid_pairs,
        report.splits["train"],
        report.splits["val"],
        report.splits["test"],
        len(report.skipped),
        report.skipped_by_reason or "",
        rate,
        out_dir,
    )
    return report


def prepare_from_raw(cfg: Config, raw_dir: Path, out_dir: Path, progress: bool = True) -> PrepareReport:
    """The DVC stage: raw folder from the download stage -> prepared splits (+ data source record)."""
    extra = report_fields(read_source_info(raw_dir))
    return prepare_step(cfg, raw_dir / "images", raw_dir / "masks", out_dir, progress, report_extra=extra)


def augment_step(cfg: Config, prepared_dir: Path, out_dir: Path, preview_path: Path, progress: bool = True):
    from tumorseg.data.augment import augment_dataset, preview_grid, write_preview

    settings = cfg.augment.model_dump()
    report = augment_dataset(
        prepared_dir / "train",
        out_dir,
        settings=settings,
        copies_per_image=cfg.augment.copies_per_image,
        seed=cfg.seed,
        progress=progress,
    )
    grid = preview_grid(prepared_dir / "train", settings, rows=cfg.augment.preview_pairs, copies=4, seed=cfg.seed)
    write_preview(preview_path, grid)
    log.info("augment: %d training pairs -> %d augmented copies in %s; preview %s", report.source_pairs, report.augmented_pairs, out_dir, preview_path)
    return report


# --------------------------------------------------------------------------------------------
# Train, evaluate, compare
# --------------------------------------------------------------------------------------------


def _data_record(prepared_dir: Path) -> dict:
    """The data source record that prepare copied into its report (kind, origin, hash)."""
    report = read_json(prepared_dir / "report.json")
    return {key: report.get(key, "unknown") for key in ("data_source", "data_origin", "data_hash")}


def _run_tags(cfg: Config, name: str, record: dict, params_path: Path) -> dict[str, str]:
    root = tracking.workspace_root()
    params_text = params_path.read_text(encoding="utf-8") if params_path.exists() else ""
    return {
        "model": name,
        "data_source": record["data_source"],
        "data_origin": record["data_origin"],
        "data_hash": record["data_hash"],
        "git_commit": tracking.git_commit(root),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "pipeline": tracking.pipeline_id(root, params_text, record["data_hash"]),
        "profile": cfg.profile,
        "seed": str(cfg.seed),
        "train_seed": str(cfg.train.effective_seed(cfg.seed)),
        **tracking.environment_tags(),
    }


def pretrain_step(cfg: Config, name: str, *, prepared_dir: Path, out_path: Path, params_path: Path, progress: bool = True) -> dict:
    """Self-supervised pretraining of ``name`` (an MLflow run of its own, tag ``task=pretrain``);
    the file it writes is meant for ``train.init_from.<name>``."""
    from tumorseg.pretrain import pretrain_model

    record = _data_record(prepared_dir)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    tags = _run_tags(cfg, name, record, params_path) | {"task": "pretrain"}
    p = cfg.pretrain
    with tracking.run(uri, run_id=None, run_name=f"{name}-pretrain-{tags['pipeline']}", tags=tags) as active:
        tracking.log_params(cfg.flat() | {"model": name})
        result = pretrain_model(
            name,
            model_params=getattr(cfg.models, name).model_dump(),
            train_params=cfg.train.model_dump(),
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            lr=cfg.lr * cfg.train.lr_scale,
            epochs=p.epochs,
            seed=cfg.train.effective_seed(cfg.seed),
            holes=p.holes,
            hole_fraction=p.hole_fraction,
            noise_std=p.noise_std,
            prepared_dir=prepared_dir,
            model_path=out_path,
            on_epoch=lambda epoch, row: tracking.log_metrics(row, step=epoch),
            progress=progress,
        )
        summary = {"model": name, "file": str(out_path), "sha256": sha256_file(out_path), "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss, "first_val_loss": result.first_val_loss, "epochs_run": result.epochs_run, "seconds_per_epoch": result.seconds_per_epoch, "mlflow_run_id": active.info.run_id, **record}
        tracking.log_metrics({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch, "seconds_per_epoch": result.seconds_per_epoch})
        tracking.set_tags({"pretrained_sha256": summary["sha256"]})
    return summary


def _note_param_changes(name: str, state_dir: Path, changed: dict[str, tuple[str, str]]) -> list[str]:
    """A resumed training run whose params changed since it started (e.g. early stopping turned off
    to train on): say so, and keep every change with the epoch it took effect after, in the resume
    state, the MLflow run (a tag: its params keep the first values) and the train JSON."""
    state = ResumeState(state_dir)
    changes: list[dict] = list(state.data.get("param_changes", []))
    in_effect = {change["key"]: change["new"] for change in changes}  # the latest value of each changed key
    after = state.epochs_done
    fresh = [{"after_epoch": after, "key": key, "old": in_effect.get(key, old), "new": new} for key, (old, new) in sorted(changed.items()) if in_effect.get(key, old) != new]
    fresh += [{"after_epoch": after, "key": key, "old": value, "new": logged} for key, value in in_effect.items() if key not in changed and value != (logged := _first_value(changes, key))]
    if fresh:
        changes += fresh
        update_state(state_dir, param_changes=changes)
        log.warning("%s: resumed with params changed since the run started (MLflow keeps the first values; see its tag %s): %s", name, tracking.PARAMS_CHANGED_TAG, "; ".join(map(tracking.describe_param_change, fresh)))
    if changes:
        tracking.record_param_changes(changes)
    return [tracking.describe_param_change(change) for change in changes]


def _first_value(changes: list[dict], key: str) -> str:
    return next(change["old"] for change in changes if change["key"] == key)


def train_step(cfg: Config, name: str, *, prepared_dir: Path, augmented_dir: Path, models_dir: Path, metrics_dir: Path, params_path: Path, progress: bool = True):
    """Train one model with MLflow tracking; resumable (state in ``models_dir/.state/<name>``)."""

    record = _data_record(prepared_dir)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)  # before any training: never fail after an hour
    state_dir = models_dir / ".state" / name
    model_path = models_dir / f"{name}.keras"
    history_path = metrics_dir / f"history_{name}.csv"
    model_params = getattr(cfg.models, name).model_dump()
    tags = _run_tags(cfg, name, record, params_path)
    init_from = initial_weights_file(getattr(cfg.train.init_from, name), key=f"train.init_from.{name}")  # fails before a run opens
    if init_from is not None:
        tags["init_from_sha256"] = sha256_file(init_from)
    state = read_state(state_dir)
    previous_run = state.get("run_id")
    if previous_run:
        log.info("%s: resuming training (MLflow run %s)", name, previous_run)
    token = state.get("resume_token") or update_state(state_dir, resume_token=uuid.uuid4().hex)["resume_token"]
    sweep_temporaries(metrics_dir / f"train_{name}.json")

    with tracking.run(uri, run_id=previous_run, run_name=f"{name}-{tags['pipeline']}", tags=tags, resume_token=token) as active:
        if active.info.run_id != previous_run:
            remember_run_id(state_dir, active.info.run_id)
        param_changes = _note_param_changes(name, state_dir, tracking.log_params(cfg.flat() | {"model": name}))
        repaired = tracking.log_missing_epochs(state.get("history", {}))
        if repaired:
            log.info("%s: logged %d completed epoch(s) that MLflow had missed", name, repaired)
        result = train_model(
            name,
            model_params=model_params,
            loss_params=cfg.loss.model_dump(),
            train_params=cfg.train.model_dump(),
            augment_params=cfg.augment.model_dump(),
            lr=cfg.lr * cfg.train.lr_scale,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            seed=cfg.train.effective_seed(cfg.seed),
            prepared_dir=prepared_dir,
            augmented_dir=augmented_dir,
            model_path=model_path,
            history_path=history_path,
            state_dir=state_dir,
            on_epoch=lambda epoch, row: tracking.log_metrics(row, step=epoch),
            progress=progress,
        )
        summary = {
            "model": name,
            "best_epoch": result.best_epoch,
            "best_val_dice": result.best_val_dice,
            "epochs_run": result.epochs_run,
            "epochs_planned": cfg.epochs,
            "init_from": str(init_from) if init_from is not None else "none",
            "params_changed_on_resume": param_changes,
            "seconds_per_epoch": result.seconds_per_epoch,
            "ms_per_step": result.ms_per_step,
            "params_total": result.params_total,
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "effective_lr": cfg.lr * cfg.train.lr_scale,
            "mlflow_run_id": active.info.run_id,
            **record,
        }
        metrics_path = metrics_dir / f"train_{name}.json"
        atomic_write_json(metrics_path, summary)
        tracking.log_metrics_once({"best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch, "ms_per_step": result.ms_per_step, "seconds_per_epoch": result.seconds_per_epoch, "params_total": result.params_total})
        tracking.log_artifact(history_path, "history")
        from tumorseg.evaluation import learning_curves_chart

        with tempfile.TemporaryDirectory() as scratch:
            chart = Path(scratch) / f"learning_curves_{name}.png"
            learning_curves_chart({name: pd.read_csv(history_path)}, chart, f"{name} on {record['data_source']} data")
            tracking.log_artifact(chart, "history")
        tracking.log_artifact(metrics_path, "metrics")
        import keras

        import tumorseg.models  # noqa: F401 - registers custom objects for loading

        best = keras.models.load_model(model_path)
        tracking.log_keras_model(best, np.zeros((1, cfg.image_size, cfg.image_size, 1), np.float32))
    clear_state(state_dir)
    log.info("%s: best val Dice %.4f at epoch %d (%.0f ms/step) -> %s", name, result.best_val_dice, result.best_epoch, result.ms_per_step, model_path)
    return summary


def evaluate_step(cfg: Config, names: list[str], *, prepared_dir: Path, models_dir: Path, metrics_dir: Path, reports_dir: Path, raw_dir: Path = Path("data/raw"), params_path: Path = Path("params.yaml")) -> dict[str, dict]:
    """Score each trained model on the test split (logged into its training run in MLflow) and,
    with two or more models, their ensemble (mean probability; a run of its own)."""
    import keras

    import tumorseg.models  # noqa: F401 - registers custom objects for loading
    from tumorseg.evaluation import Predictions, evaluate_model, mean_predictions, predict_split, read_labels, write_evaluation
    from tumorseg.losses import combined_loss

    record = _data_record(prepared_dir)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    settings = cfg.evaluate
    labels = read_labels(settings.labels, raw_dir)
    results: dict[str, dict] = {}
    loaded = {name: keras.models.load_model(models_dir / f"{name}.keras") for name in names}
    members = list(names)
    run_ids: dict[str, str] = {}  # the MLflow run each model's evaluation went to
    settings_key = repr(sorted(settings.model_dump().items()))
    predicted: dict[tuple[str, Path], Predictions] = {}  # each member predicts each split once

    def predictor(name: str):
        def predict(split_dir: Path) -> Predictions:
            if name == ENSEMBLE:  # the mean of the members' predictions: no model runs again
                return mean_predictions([predictor(member)(split_dir) for member in members])
            if (name, split_dir) not in predicted:
                predicted[name, split_dir] = predict_split(loaded[name], split_dir, cfg.image_size, cfg.batch_size, tta=settings.tta)
            return predicted[name, split_dir]

        return predict

    # with two or more models, the ensemble is scored like a model, with its own MLflow run
    for name in [*names, ENSEMBLE] if len(names) >= 2 else names:
        metrics, per_image, predictions = evaluate_model(
            loaded.get(name),
            combined_loss(**cfg.loss.model_dump()),
            prepared_dir / "test",
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            threshold=settings.threshold,
            tta=settings.tta,
            min_component_px=settings.min_component_px,
            resolution=settings.resolution,
            manifest_path=prepared_dir / "manifest.csv",
            mask_threshold=cfg.prepare.mask_threshold,
            raw_masks_dir=raw_dir / "masks",
            labels=labels,
            val_dir=prepared_dir / "val" if settings.tune_on_val else None,
            predict=predictor(name),
        )
        metrics = {**metrics, "data_source": record["data_source"], "data_hash": record["data_hash"], "model": name, "image_size": cfg.image_size}
        if name == ENSEMBLE:
            metrics["members"] = members
        out_dir = reports_dir / f"evaluate_{name}"
        metrics_path = metrics_dir / f"evaluate_{name}.json"
        write_evaluation(metrics_path, out_dir, metrics, per_image, predictions)
        member_runs = {m: run_ids[m] for m in members} if name == ENSEMBLE else None
        context, own_run = _evaluation_run(cfg, name, uri=uri, record=record, params_path=params_path, metrics_dir=metrics_dir, models_dir=models_dir, member_runs=member_runs, settings_key=settings_key)
        with context as active:
            run_ids[name] = active.info.run_id
            if own_run:
                tracking.log_params(cfg.flat() | {"model": name})
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for group in ("dice_by_class", "dice_by_size"):  # nested: one MLflow metric per class / size band
                numbers.update({f"{group}_{key}": value for key, value in (metrics.get(group) or {}).items()})
            tracking.log_metrics({f"test_{k}": v for k, v in numbers.items()})
            for path in (metrics_path, out_dir / "per_image.csv", out_dir / "overlays.png"):
                tracking.log_artifact(path, "evaluation")
        results[name] = metrics
        log.info("%s: test Dice %.4f (global %.4f), IoU %.4f, HD95 %s on %d %s images", name, metrics["dice"], metrics["global_dice"], metrics["iou"], metrics["hd95"], metrics["n_images"], record["data_source"])
    return results


def _evaluation_run(cfg: Config, name: str, *, uri: str, record: dict, params_path: Path, metrics_dir: Path, models_dir: Path, member_runs: dict[str, str] | None, settings_key: str):
    """The MLflow run an evaluation is logged to, and whether it is a run of its own.

    A model trained by this pipeline: its training run. A model trained elsewhere (the shipped
    weights) or the ensemble (``member_runs``): a run of its own, found again by a token when the
    same model file or the same members are re-scored with the same settings.
    """
    if member_runs is None:
        run_id = _training_summary(metrics_dir, name).get("mlflow_run_id")
        if run_id:
            return tracking.run(uri, run_id=run_id, run_name=name, tags={"evaluated": "true"}), False
        model_file = models_dir / f"{name}.keras"
        identity, extra = sha256_file(model_file), {"model_file": str(model_file)}
    else:
        identity = "+".join(f"{m}={r}" for m, r in member_runs.items())
        extra = {"members": "+".join(member_runs)} | {f"member_run_{m}": r for m, r in member_runs.items()}
    token = f"evaluate-{name}-" + hashlib.sha256((identity + settings_key).encode()).hexdigest()[:16]
    tags = _run_tags(cfg, name, record, params_path) | extra | {"evaluated": "true"}
    return tracking.run(uri, run_id=None, run_name=f"{name}-{tags['pipeline']}", tags=tags, resume_token=token), True


def _training_summary(metrics_dir: Path, name: str) -> dict:
    """``metrics/train_<name>.json``, or {} for a model that was not trained by this pipeline."""
    path = metrics_dir / f"train_{name}.json"
    return read_json(path) if path.is_file() else {}


def compare_step(names: list[str], *, metrics_dir: Path, reports_dir: Path) -> dict:
    from tumorseg.evaluation import compare_models, comparison_chart, learning_curves_chart

    results, training = {}, {}
    for name in names:
        training[name] = train = read_json(metrics_dir / f"train_{name}.json")
        results[name] = read_json(metrics_dir / f"evaluate_{name}.json") | {k: train[k] for k in ("params_total", "ms_per_step", "best_val_dice", "best_epoch")}
    ensemble_path = metrics_dir / f"evaluate_{ENSEMBLE}.json"
    if len(names) >= 2 and ensemble_path.is_file():
        ensemble = read_json(ensemble_path)
        if ensemble.get("members") == list(names):  # not a stale file from another set of models
            results[ENSEMBLE] = ensemble | {"params_total": sum(results[n]["params_total"] for n in names)}
    sources = {r["data_source"] for r in results.values()}
    label = "SYNTHETIC phantoms" if sources == {"synthetic"} else ("real MRI" if sources == {"real"} else f"mixed ({', '.join(sorted(sources))})")
    first = next(iter(results.values()))
    # The models compared may come from different runs (another size, length or learning rate than
    # the workspace's params.yaml now): the report states each one's own, from its train JSON.
    facts = f"Test split: {first['n_images']} images, scored at {first.get('resolution', 'original')} resolution (how each model was trained: the table below)."
    markdown, summary = compare_models(results, label, facts, training)
    atomic_write_text(reports_dir / "comparison.md", markdown)
    atomic_write_json(reports_dir / "comparison.json", summary)
    comparison_chart(results, reports_dir / "comparison.png", f"Test metrics on {label}")
    histories = {n: pd.read_csv(metrics_dir / f"history_{n}.csv") for n in names if (metrics_dir / f"history_{n}.csv").exists()}
    learning_curves_chart(histories, reports_dir / "learning_curves.png", f"Learning curves on {label}")
    return summary
