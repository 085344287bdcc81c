"""One function per pipeline step, shared by the DVC stage scripts and the ``tumorseg`` CLI.

Each takes the validated :class:`~tumorseg.config.Config` plus explicit paths (the paths live in
``dvc.yaml``), does the work through the library, and returns what it wrote.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tumorseg.config import Config
from tumorseg.data.prepare import PrepareReport, prepare_dataset
from tumorseg.data.sources import SourceInfo, data_label, download, read_source_info

log = logging.getLogger(__name__)


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
        size=size or cfg.image_size,
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
    info = read_source_info(raw_dir)
    extra = {"data_source": info.kind, "data_origin": info.origin, "data_hash": info.data_hash}
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
