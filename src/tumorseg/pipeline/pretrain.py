"""``tumorseg pretrain``: self-supervised pretraining of a model, as an MLflow run of its own."""

from __future__ import annotations

from pathlib import Path

from tumorseg import tracking
from tumorseg.config import Config
from tumorseg.io import sha256_file
from tumorseg.pipeline.runs import data_record, run_tags


def pretrain_step(cfg: Config, name: str, *, prepared_dir: Path, out_path: Path, params_path: Path, progress: bool = True) -> dict:
    """Self-supervised pretraining of ``name`` (an MLflow run of its own, tag ``task=pretrain``);
    the file it writes is meant for ``train.init_from.<name>``."""
    from tumorseg.pretrain import pretrain_model

    record = data_record(prepared_dir)
    uri = tracking.tracking_uri()
    tracking.check_tracking(uri)
    tags = run_tags(cfg, name, record, params_path) | {"task": "pretrain"}
    with tracking.run(uri, run_id=None, run_name=f"{name}-pretrain-{tags['pipeline']}", tags=tags) as active:
        tracking.log_params(cfg.flat() | {"model": name})
        result = pretrain_model(
            name,
            architecture=getattr(cfg.models, name),
            train=cfg.train,
            pretrain=cfg.pretrain,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            lr=cfg.lr * cfg.train.lr_scale,
            seed=cfg.train.effective_seed(cfg.seed),
            prepared_dir=prepared_dir,
            model_path=out_path,
            on_epoch=lambda epoch, row: tracking.log_metrics(row, step=epoch),
            progress=progress,
        )
        summary = {
            "model": name,
            "file": str(out_path),
            "sha256": sha256_file(out_path),
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "first_val_loss": result.first_val_loss,
            "epochs_run": result.epochs_run,
            "seconds_per_epoch": result.seconds_per_epoch,
            "mlflow_run_id": active.info.run_id,
            **record,
        }
        tracking.log_metrics({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch, "seconds_per_epoch": result.seconds_per_epoch})
        tracking.set_tags({"pretrained_sha256": summary["sha256"]})
    return summary
