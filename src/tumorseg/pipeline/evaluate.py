"""The evaluate stage: every model and their ensemble scored on the untouched test split."""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path

from tumorseg import tracking
from tumorseg.config import Config
from tumorseg.io import read_metrics, sha256_file
from tumorseg.pipeline.runs import data_record, log_split_inputs, run_tags
from tumorseg.reporting import ENSEMBLE

log = logging.getLogger(__name__)


def evaluate_step(
    cfg: Config,
    names: list[str],
    *,
    prepared_dir: Path,
    models_dir: Path,
    metrics_dir: Path,
    reports_dir: Path,
    raw_dir: Path = Path("data/raw"),
    params_path: Path = Path("params.yaml"),
) -> dict[str, dict]:
    """Score each trained model on the test split (logged into its training run in MLflow) and,
    with two or more models, their ensemble (mean probability; a run of its own).

    Every model predicts through :class:`~tumorseg.inference.Predictor`, the path ``tumorseg
    predict`` takes; each model predicts each split once (:class:`~tumorseg.inference.PredictionCache`)
    and the ensemble is scored from its members' maps."""
    from tumorseg.data.sources import read_labels
    from tumorseg.evaluation import evaluate_split, load_scoring_split, write_evaluation
    from tumorseg.inference import PostProcessing, PredictionCache, Predictor
    from tumorseg.inference.cache import mean_of
    from tumorseg.losses import combined_loss

    record = data_record(prepared_dir)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    settings = cfg.evaluate
    labels = read_labels(settings.labels, raw_dir)
    model_files = {name: models_dir / f"{name}.keras" for name in names}
    predictors = {name: Predictor.load(path, tta=settings.tta, batch_size=cfg.batch_size) for name, path in model_files.items()}
    identities = {name: sha256_file(path) for name, path in model_files.items()}
    load = partial(
        load_scoring_split,
        resolution=settings.resolution,
        manifest_path=prepared_dir / "manifest.csv",
        mask_threshold=cfg.prepare.mask_threshold,
        raw_dir=raw_dir,
        channels=cfg.data.channels,
    )
    test = load(prepared_dir / "test")
    val = load(prepared_dir / "val") if settings.tune_on_val else None
    members = list(names)
    results: dict[str, dict] = {}
    run_ids: dict[str, str] = {}  # the MLflow run each model's evaluation went to
    settings_key = repr(sorted(settings.model_dump().items()))
    cache = PredictionCache()
    loss_fn = combined_loss(cfg.loss)

    def predict_with(name: str):
        def predict(split):
            if name == ENSEMBLE:  # the mean of the members' maps: no model runs again
                return mean_of([predict_with(member)(split) for member in members])
            return cache.get(identities[name], predictors[name], split.names, split.images, label=f"{name}-{split.split}")

        return predict

    # with two or more models, the ensemble is scored like a model, with its own MLflow run
    for name in [*names, ENSEMBLE] if len(names) >= 2 else names:
        evaluation = evaluate_split(
            predict_with(name),
            test,
            post=PostProcessing(settings.threshold, settings.min_component_px),
            val=val,
            loss_fn=loss_fn,
            labels=labels,
            tta=settings.tta,
        )
        extra = {"data_source": record["data_source"], "data_hash": record["data_hash"], "model": name, "image_size": cfg.image_size}
        if name == ENSEMBLE:
            extra["members"] = members
        out_dir = reports_dir / f"evaluate_{name}"
        metrics_path = metrics_dir / f"evaluate_{name}.json"
        metrics = write_evaluation(metrics_path, out_dir, evaluation, extra)
        member_runs = {m: run_ids[m] for m in members} if name == ENSEMBLE else None
        context, own_run = _evaluation_run(
            cfg,
            name,
            uri=uri,
            record=record,
            params_path=params_path,
            metrics_dir=metrics_dir,
            models_dir=models_dir,
            member_runs=member_runs,
            settings_key=settings_key,
        )
        with context as active:
            run_ids[name] = active.info.run_id
            if own_run:
                tracking.log_params(cfg.flat() | {"model": name})
            log_split_inputs(prepared_dir, record, ("test",) if val is None else ("val", "test"))  # val: where the threshold was chosen
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for group in ("dice_by_class", "dice_by_size"):  # nested: one MLflow metric per class / size band
                numbers.update({f"{group}_{key}": value for key, value in (metrics.get(group) or {}).items()})
            model_id = None if name == ENSEMBLE else _training_summary(metrics_dir, name).get("mlflow_model_id")
            tracking.log_metrics({f"test_{k}": v for k, v in numbers.items()}, model_id=model_id)  # beside the model in the Models tab
            for path in (metrics_path, out_dir / "per_image.csv", out_dir / "overlays.png"):
                tracking.log_artifact(path, "evaluation")
        results[name] = metrics
        log.info(
            "%s: test Dice %.4f (global %.4f), IoU %.4f, HD95 %s on %d %s images",
            name,
            metrics["dice"],
            metrics["global_dice"],
            metrics["iou"],
            metrics["hd95"],
            metrics["n_images"],
            record["data_source"],
        )
    if cfg.registry.register_best:
        _register_best(cfg, names, results, metrics_dir, reports_dir, uri)
    return results


def _register_best(cfg: Config, names: list[str], results: dict[str, dict], metrics_dir: Path, reports_dir: Path, uri: str) -> None:
    """Register the model with the best validation Dice (the tuned one when evaluate tuned on
    validation, else training's best epoch; never the test Dice) and move the alias to it."""
    from tumorseg.io import atomic_write_json

    def validation_dice(name: str) -> float:
        tuned = results[name].get("val_dice_tuned")
        return float(tuned) if tuned is not None else float(_training_summary(metrics_dir, name).get("best_val_dice", float("-inf")))

    candidates = [name for name in names if _training_summary(metrics_dir, name).get("mlflow_model_id")]
    if not candidates:
        log.warning("registry.register_best: no model of this pipeline was logged to MLflow (trained elsewhere): nothing registered")
        return
    best = max(candidates, key=validation_dice)
    info = tracking.register_model(
        cfg.registry.name,
        model_id=_training_summary(metrics_dir, best)["mlflow_model_id"],
        uri=uri,
        alias=cfg.registry.alias,
        tags={
            "model": best,
            "validation_dice": f"{validation_dice(best):.4f}",
            "test_dice": f"{results[best]['dice']:.4f}",
            "data_source": str(results[best].get("data_source", "")),
        },
    )
    atomic_write_json(reports_dir / "registered.json", info | {"model": best, "validation_dice": validation_dice(best)})
    log.info("registered %s (validation Dice %.4f) as %s version %s: %s", best, validation_dice(best), info["name"], info["version"], info["alias_uri"])


def _evaluation_run(
    cfg: Config,
    name: str,
    *,
    uri: str,
    record: dict,
    params_path: Path,
    metrics_dir: Path,
    models_dir: Path,
    member_runs: dict[str, str] | None,
    settings_key: str,
):
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
    tags = run_tags(cfg, name, record, params_path) | extra | {"evaluated": "true"}
    return tracking.run(uri, run_id=None, run_name=f"{name}-{tags['pipeline']}", tags=tags, resume_token=token), True


def _training_summary(metrics_dir: Path, name: str) -> dict:
    """``metrics/train_<name>.json`` with its ``.info.json``, or {} for a model that was not trained by this pipeline."""
    path = metrics_dir / f"train_{name}.json"
    return read_metrics(path) if path.is_file() else {}
