"""The augment stage: offline augmented copies of the training pairs, and their preview."""

from __future__ import annotations

import logging
from pathlib import Path

from tumorseg.config import Config
from tumorseg.data.augment import augment_dataset, preview_grid, write_preview

log = logging.getLogger(__name__)


def augment_step(cfg: Config, prepared_dir: Path, out_dir: Path, preview_path: Path, progress: bool = True):
    settings = cfg.augment
    report = augment_dataset(
        prepared_dir / "train",
        out_dir,
        settings=settings,
        copies_per_image=cfg.augment.copies_per_image,
        seed=cfg.seed,
        progress=progress,
        channels=cfg.data.channels,
    )
    grid = preview_grid(prepared_dir / "train", settings, rows=cfg.augment.preview_pairs, copies=4, seed=cfg.seed, channels=cfg.data.channels)
    write_preview(preview_path, grid)
    log.info("augment: %d training pairs -> %d augmented copies in %s; preview %s", report.source_pairs, report.augmented_pairs, out_dir, preview_path)
    return report
