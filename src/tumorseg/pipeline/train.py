"""The train stage: one model, tracked in MLflow, resumable after a kill."""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg import tracking
from tumorseg.config import Config
from tumorseg.data.pairs import check_oversample_types, read_tumour_types
from tumorseg.io import info_path, sha256_file, write_metrics
from tumorseg.pipeline.runs import data_record, log_split_inputs, run_tags
from tumorseg.resume import ResumeState, clear_state, read_state, remember_run_id, sweep_temporaries, update_state
from tumorseg.runtime import worker_role
from tumorseg.training import initial_weights_file, train_model

log = logging.getLogger(__name__)


def _note_param_changes(name: str, state_dir: Path, changed: dict[str, tuple[str, str]]) -> list[str]:
    """A resumed training run whose params changed since it started (e.g. early stopping turned off
    to train on): say so, and keep every change with the epoch it took effect after, in the resume
    state, the MLflow run (a tag: its params keep the first values) and the train JSON."""
    state = ResumeState(state_dir)
    changes: list[dict] = list(state.data.get("param_changes", []))
    in_effect = {change["key"]: change["new"] for change in changes}  # the latest value of each changed key
    after = state.epochs_done
    fresh = [
        {"after_epoch": after, "key": key, "old": in_effect.get(key, old), "new": new}
        for key, (old, new) in sorted(changed.items())
        if in_effect.get(key, old) != new
    ]
    fresh += [
        {"after_epoch": after, "key": key, "old": value, "new": logged}
        for key, value in in_effect.items()
        if key not in changed and value != (logged := _first_value(changes, key))
    ]
    if fresh:
        changes += fresh
        update_state(state_dir, param_changes=changes)
        log.warning(
            "%s: resumed with params changed since the run started (MLflow keeps the first values; see its tag %s): %s",
            name,
            tracking.PARAMS_CHANGED_TAG,
            "; ".join(map(tracking.describe_param_change, fresh)),
        )
    if changes:
        tracking.record_param_changes(changes)
    return [tracking.describe_param_change(change) for change in changes]


def _first_value(changes: list[dict], key: str) -> str:
    return next(change["old"] for change in changes if change["key"] == key)


def train_step(
    cfg: Config,
    name: str,
    *,
    prepared_dir: Path,
    augmented_dir: Path,
    models_dir: Path,
    metrics_dir: Path,
    params_path: Path,
    progress: bool = True,
):
    """Train one model with MLflow tracking; resumable (state in ``models_dir/.state/<name>``).

    Under ``train.distribute: multi_worker`` only the chief (see :func:`worker_role`) does what is
    described here; every other worker trains in step with it and writes nothing of the project's
    (:func:`_train_as_worker`).
    """
    training = {
        "architecture": getattr(cfg.models, name),
        "loss": cfg.loss,
        "train": cfg.train,
        "augment": cfg.augment,
        "sequences": cfg.data.sequences,
        "lr": cfg.lr * cfg.train.lr_scale,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "seed": cfg.train.effective_seed(cfg.seed),
        "prepared_dir": prepared_dir,
        "augmented_dir": augmented_dir,
        "progress": progress,
    }
    training["tumour_types"] = read_tumour_types(prepared_dir) if cfg.train.oversample.active else {}
    check_oversample_types(cfg.train.oversample, training["tumour_types"])  # before any run opens
    teachers = distillation_teachers(cfg, name)  # checked before any run opens
    training["teacher"] = distillation_teacher(cfg, teachers, progress=progress) if teachers else None
    if cfg.train.distribute == "multi_worker":
        kind, index, chief = worker_role()
        if not chief:
            return _train_as_worker(name, f"{kind}{index}", training, models_dir=models_dir, init_from=getattr(cfg.train.init_from, name))

    record = data_record(prepared_dir)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)  # before any training: never fail after an hour
    state_dir = models_dir / ".state" / name
    model_path = models_dir / f"{name}.keras"
    history_path = metrics_dir / f"history_{name}.csv"
    tags = run_tags(cfg, name, record, params_path)
    init_from = initial_weights_file(getattr(cfg.train.init_from, name), key=f"train.init_from.{name}")  # fails before a run opens
    if init_from is not None:
        tags["init_from_sha256"] = sha256_file(init_from)
    if teachers:
        tags["distill_teachers_sha256"] = ",".join(sha256_file(path) for path in teachers)
    state = read_state(state_dir)
    previous_run = state.get("run_id")
    if previous_run:
        log.info("%s: resuming training (MLflow run %s)", name, previous_run)
    token = state.get("resume_token") or update_state(state_dir, resume_token=uuid.uuid4().hex)["resume_token"]
    sweep_temporaries(metrics_dir / f"train_{name}.json")

    try:
        with tracking.run(uri, run_id=previous_run, run_name=f"{name}-{tags['pipeline']}", tags=tags, resume_token=token) as active:
            if active.info.run_id != previous_run:
                remember_run_id(state_dir, active.info.run_id)
            param_changes = _note_param_changes(name, state_dir, tracking.log_params(cfg.flat() | {"model": name}))
            log_split_inputs(prepared_dir, record, ("train", "val"))
            repaired = tracking.log_missing_epochs(state.get("history", {}))
            if repaired:
                log.info("%s: logged %d completed epoch(s) that MLflow had missed", name, repaired)
            result = train_model(
                name,
                **training,
                init_from=init_from,
                model_path=model_path,
                history_path=history_path,
                state_dir=state_dir,
                on_epoch=lambda epoch, row: tracking.log_metrics(row, step=epoch),
            )
            import keras

            import tumorseg.models  # noqa: F401 - registers custom objects for loading

            best = keras.models.load_model(model_path)
            model_id = tracking.log_keras_model(
                best,
                np.zeros((1, cfg.image_size, cfg.image_size, len(cfg.data.channels)), np.float32),
                params={f"models.{name}.{k}": v for k, v in getattr(cfg.models, name).model_dump().items()} | {"image_size": cfg.image_size},
                tags={"model": name, "sha256": sha256_file(model_path), "sequences": tags["sequences"], "data_source": record["data_source"]},
            )
            summary = {
                "model": name,
                "best_epoch": result.best_epoch,
                "best_val_dice": result.best_val_dice,
                "epochs_run": result.epochs_run,
                "epochs_planned": cfg.epochs,
                "init_from": str(init_from) if init_from is not None else "none",
                "distill_teachers": [str(path) for path in teachers],
                "distill_weight": cfg.train.distill.weight if teachers else 0.0,
                "params_changed_on_resume": param_changes,
                "seconds_per_epoch": result.seconds_per_epoch,
                "ms_per_step": result.ms_per_step,
                "params_total": result.params_total,
                "image_size": cfg.image_size,
                "batch_size": cfg.batch_size,
                "effective_lr": cfg.lr * cfg.train.lr_scale,
                "mlflow_run_id": active.info.run_id,
                "mlflow_model_id": model_id,  # models:/<id> loads it; evaluate links the test metrics to it
                **record,
            }
            metrics_path = metrics_dir / f"train_{name}.json"
            write_metrics(metrics_path, summary)  # numbers; the rest (run ids, data) in train_<name>.info.json
            tracking.log_metrics_once(
                {
                    "best_val_dice": result.best_val_dice,
                    "best_epoch": result.best_epoch,
                    "ms_per_step": result.ms_per_step,
                    "seconds_per_epoch": result.seconds_per_epoch,
                    "params_total": result.params_total,
                },
                model_id=model_id,
            )
            tracking.log_artifact(history_path, "history")
            from tumorseg.reporting import learning_curves_chart

            with tempfile.TemporaryDirectory() as scratch:
                chart = Path(scratch) / f"learning_curves_{name}.png"
                learning_curves_chart({name: pd.read_csv(history_path)}, chart, f"{name} on {record['data_source']} data")
                tracking.log_artifact(chart, "history")
            tracking.log_artifact(metrics_path, "metrics")
            tracking.log_artifact(info_path(metrics_path), "metrics")
    except tracking.store_failures() as exc:
        done = ResumeState(state_dir).epochs_done
        consequence = (
            f"training stopped with {done} of {cfg.epochs} epochs saved; bring the store back (`tumorseg server start`) and run this stage again "
            "to continue in the same MLflow run"
        )
        raise tracking.lost_store(uri, exc, consequence) from None
    clear_state(state_dir)
    log.info("%s: best val Dice %.4f at epoch %d (%.0f ms/step) -> %s", name, result.best_val_dice, result.best_epoch, result.ms_per_step, model_path)
    return summary


def distillation_teachers(cfg: Config, name: str) -> list[Path]:
    """The ``train.distill.<name>`` teacher files, each checked to be a readable model file."""
    from tumorseg.inference import model_file_problem

    paths = []
    for value in cfg.train.distill.teachers(name):
        path = Path(value)
        problem = "does not exist" if not path.is_file() else model_file_problem(path)
        if problem:
            raise FileNotFoundError(f"train.distill.{name}: {path}: {problem}; list trained .keras models of the same input ([] = no distillation)")
        paths.append(path)
    return paths


def distillation_teacher(cfg: Config, teachers: list[Path], *, progress: bool = False, chunk: int = 64):
    """The teachers as a function of the training images: their mean probability map (flip TTA
    when ``train.distill.tta``), through the Predictor that scores and ships models, each teacher
    at its own input size, ``chunk`` images at a time behind a progress bar (minutes for a real
    training split). The models load when training calls it, after its TensorFlow set-up."""

    def teacher(images: np.ndarray) -> np.ndarray:
        from tqdm import tqdm

        from tumorseg.inference import Predictor
        from tumorseg.inference.scans import check_model_sequences

        predictor = Predictor.load(teachers, tta=cfg.train.distill.tta)
        check_model_sequences(predictor.sequences, cfg.data.sequences, "train.distill")
        maps = []
        with tqdm(total=len(images), desc="distillation teachers", unit="image", disable=not progress) as bar:
            for start in range(0, len(images), chunk):
                planes = [image if predictor.sequences else image[..., 0] for image in images[start : start + chunk]]
                maps.extend(predictor.probability_maps(planes))
                bar.update(len(planes))
        return np.stack(maps)

    return teacher


def _train_as_worker(name: str, worker: str, training: dict, *, models_dir: Path, init_from: str) -> dict:
    """A non-chief worker of multi-worker training: the chief's training, step for step (the
    collectives need every worker in every step), but what it writes - checkpoints, its copy of the
    model - stays in its own folder ``models_dir/.state/<name>-<worker>/``, kept until training
    completes so that it resumes with the chief after a kill. No model file, metric file or MLflow
    run: those are the chief's."""
    own = models_dir / ".state" / f"{name}-{worker}"
    log.info("%s: multi-worker training as %s (not the chief): outputs and MLflow are the chief's; scratch in %s", name, worker, own)
    result = train_model(
        name,
        **training,
        init_from=initial_weights_file(init_from, key=f"train.init_from.{name}"),
        model_path=own / f"{name}.keras",
        history_path=own / f"history_{name}.csv",
        state_dir=own / "resume",
    )
    shutil.rmtree(own, ignore_errors=True)
    log.info("%s: %s finished %d epochs with the chief", name, worker, result.epochs_run)
    return {"model": name, "worker": worker, "epochs_run": result.epochs_run, "best_val_dice": result.best_val_dice}
