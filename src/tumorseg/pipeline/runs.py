"""What every MLflow run of a step records: the data origin and the run tags."""

from __future__ import annotations

import os
from pathlib import Path

from tumorseg import tracking
from tumorseg.config import Config
from tumorseg.io import read_json


def data_record(prepared_dir: Path) -> dict:
    """The data source record that prepare copied into its report (kind, origin, hash)."""
    report = read_json(prepared_dir / "report.json")
    return {key: report.get(key, "unknown") for key in ("data_source", "data_origin", "data_hash")}


def run_tags(cfg: Config, name: str, record: dict, params_path: Path) -> dict[str, str]:
    root = tracking.workspace_root()
    params_text = params_path.read_text(encoding="utf-8") if params_path.exists() else ""
    return {
        "model": name,
        "data_source": record["data_source"],
        "data_origin": record["data_origin"],
        "data_hash": record["data_hash"],
        "sequences": "+".join(cfg.data.sequences) or "image",  # the model's input: MRI sequences in channel order, or one grayscale image
        "git_commit": tracking.git_commit(root),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "pipeline": tracking.pipeline_id(root, params_text, record["data_hash"]),
        "profile": cfg.profile,
        "seed": str(cfg.seed),
        "train_seed": str(cfg.train.effective_seed(cfg.seed)),
        **tracking.environment_tags(),
    }


# MLflow's dataset contexts for the splits a run used.
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def log_split_inputs(prepared_dir: Path, record: dict, splits: tuple[str, ...]) -> None:
    """Log each split's manifest rows (slice id, group, file hash, tumour area) as an MLflow dataset
    input of the active run, named ``<data>:<split>`` and tagged with the data's kind and hash."""
    import pandas as pd

    manifest_path = prepared_dir / "manifest.csv"
    if not manifest_path.exists():
        return
    manifest = pd.read_csv(manifest_path, keep_default_na=False, dtype={"id": str, "group": str, "sha256": str})
    columns = [c for c in ("id", "group", "sha256", "area_fraction", "filled") if c in manifest.columns]
    origin = str(record.get("data_origin", "unknown"))
    label = Path(origin).name if Path(origin).is_absolute() else origin.split("/")[-1].split(" ")[0]
    for split in splits:
        rows = manifest.loc[manifest["split"] == split, columns].reset_index(drop=True)
        tags = {"kind": str(record.get("data_source", "unknown")), "data_hash": str(record.get("data_hash", "unknown")), "slices": str(len(rows))}
        tracking.log_dataset(rows, name=f"{label}:{split}", origin=origin, context=SPLIT_CONTEXTS[split], tags=tags)
