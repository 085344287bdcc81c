"""The prepare stage: checked, resized, split pairs from the raw folder."""

from __future__ import annotations

import logging
from pathlib import Path

from tumorseg.config import Config, check_image_size
from tumorseg.data.prepare import PrepareReport, prepare_dataset
from tumorseg.data.sources import read_labels, read_source_info, report_fields

log = logging.getLogger(__name__)


def prepare_step(
    cfg: Config,
    images_dir: Path | dict[str, Path],
    masks_dir: Path,
    out_dir: Path,
    progress: bool = True,
    *,
    size: int | None = None,
    on_error: str | None = None,
    mask_suffix: str | None = None,
    report_extra: dict | None = None,
    tumour_types: dict[str, str] | None = None,
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
        missing_sequences=p.missing_sequences,
        tumour_types=tumour_types,
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
    """The DVC stage: raw folder from the download stage -> prepared splits (+ data source record,
    + the tumour types of the source's labels.csv in manifest.csv, if it has one)."""
    extra = report_fields(read_source_info(raw_dir))
    labels = read_labels("auto", raw_dir)
    types = labels["tumour_type"].dropna().to_dict() if labels is not None else None
    if not cfg.data.sequences:
        return prepare_step(cfg, raw_dir / "images", raw_dir / "masks", out_dir, progress, report_extra=extra, tumour_types=types)
    # The download stage names every raw mask like its slice (layouts.py), whatever data.mask_suffix says.
    sequences = {name: raw_dir / name for name in cfg.data.sequences}
    return prepare_step(cfg, sequences, raw_dir / "masks", out_dir, progress, mask_suffix="", report_extra=extra, tumour_types=types)


def write_prepare_metrics(report: PrepareReport, path: Path) -> dict:
    """The stage's numbers for ``dvc metrics show``: pairs kept and skipped (by reason), slices and
    groups per split. The full report (skipped files, settings, data source) stays in report.json."""
    from tumorseg.io import atomic_write_json

    numbers = {
        "valid_pairs": report.valid_pairs,
        "skipped": len(report.skipped),
        "skipped_by_reason": report.skipped_by_reason,
        "masks_binarised": report.masks_binarised,
        "splits": report.splits,
        "groups": report.groups,
    }
    atomic_write_json(path, {key: value for key, value in numbers.items() if value != {}})
    return numbers
