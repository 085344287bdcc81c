"""The download stage: the raw dataset (Kaggle, a local folder or zip, or synthetic phantoms)."""

from __future__ import annotations

import logging
from pathlib import Path

from tumorseg.config import Config
from tumorseg.data.sources import SourceInfo, data_label, download

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
        sequences=d.sequences,
        layout=d.layout,
        progress=progress,
    )
    log.info("download: %d images, %d masks -> %s [%s]", info.n_images, info.n_masks, out_dir, data_label(info))
    return info
