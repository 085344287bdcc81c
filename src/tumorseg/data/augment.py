"""The reference augmentation, built with albumentations from ``params.yaml``'s ``augment`` section.

One :func:`build_augmentation` serves both the offline augment stage and on-the-fly use in
training, so the two can never drift apart. Image and mask always pass through the same
``Compose`` call (albumentations applies the geometric part to both, with nearest-neighbour for
the mask, and the intensity part to the image only), so they stay aligned and the mask binary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import (offline machines)

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tumorseg.config import SINGLE_CHANNEL, AugmentConfig  # noqa: E402
from tumorseg.io import atomic_directory, atomic_write_json, atomic_write_png, write_staged_png  # noqa: E402
from tumorseg.overlays import TRUTH_BGR, frame_tile, overlay_outline  # noqa: E402
from tumorseg.processes import default_workers, worker_pool  # noqa: E402


def build_augmentation(settings: AugmentConfig, seed: int | None) -> A.Compose:
    """Compose the eight reference transform kinds; each has its own probability and limits.

    ``settings`` is the ``augment:`` section of params.yaml. Geometric transforms pad with black
    (background), never with reflected anatomy that would put a second tumour in the image.
    """
    s = settings
    constant = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    transforms = [
        A.Affine(rotate=(-s.rotate.limit, s.rotate.limit), p=s.rotate.p, **constant),
        A.Affine(
            translate_percent={"x": (-s.translate.limit, s.translate.limit), "y": (-s.translate.limit, s.translate.limit)},
            p=s.translate.p,
            **constant,
        ),
        A.Affine(scale=(1 - s.scale.limit, 1 + s.scale.limit), p=s.scale.p, **constant),
        A.HorizontalFlip(p=s.hflip.p),
        A.VerticalFlip(p=s.vflip.p),
        A.ElasticTransform(alpha=s.elastic.alpha, sigma=s.elastic.sigma, p=s.elastic.p, **constant),
        A.CropAndPad(percent=(-s.crop_pad.limit, s.crop_pad.limit), keep_size=True, p=s.crop_pad.p, **constant),
        A.RandomBrightnessContrast(
            brightness_limit=s.brightness_contrast.brightness,
            contrast_limit=s.brightness_contrast.contrast,
            p=s.brightness_contrast.p,
        ),
        A.GaussNoise(std_range=(0.0, s.noise.std), p=s.noise.p),
    ]
    return A.Compose(transforms, seed=seed)


def apply(pipeline: A.Compose, image: np.ndarray, mask: np.ndarray, *, binary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Augment one pair; the mask comes back exactly {0, 255} (``binary=False``: a soft 0..255
    distillation target, moved by the same geometry and kept as it comes out)."""
    result = pipeline(image=image, mask=mask)
    if not binary:
        return result["image"], np.asarray(result["mask"], np.uint8)
    out_mask = np.where(result["mask"] > 127, 255, 0).astype(np.uint8)
    return result["image"], out_mask


@dataclass
class AugmentReport:
    source_pairs: int
    augmented_pairs: int
    copies_per_image: int


def _read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path} cannot be read as an image; re-run the prepare stage (`dvc repro -f prepare`)")
    return image


def pair_seed(seed: int, index: int) -> int:
    """The random seed of pair ``index``: depends on nothing else, so pairs can be augmented in any
    order and in any number of processes with identical results."""
    return derived_seed(seed, index)


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends on ``keys`` only (e.g. seed, epoch, position): random streams
    drawn from it do not depend on what ran before, so a resumed run draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([int(key) for key in keys]).generate_state(1)[0])


def _read_slice(folder: Path, name: str, channels: tuple[str, ...]) -> np.ndarray:
    """One prepared slice: ``(H, W)`` for one channel, ``(H, W, C)`` stacked in ``channels`` order."""
    planes = [_read_gray(folder / channel / name) for channel in channels]
    return planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)


def _augment_pair(pipeline: A.Compose, job: tuple) -> None:
    train_dir, staging, name, index, copies, seed, channels = job
    pipeline.set_random_seed(pair_seed(seed, index))
    image = _read_slice(train_dir, name, channels)
    mask = _read_gray(train_dir / "masks" / name)
    for copy in range(copies):
        aug_image, aug_mask = apply(pipeline, image, mask)
        out_name = f"{Path(name).stem}__aug{copy + 1}.png"
        for position, channel in enumerate(channels):
            write_staged_png(staging / channel / out_name, aug_image if aug_image.ndim == 2 else np.ascontiguousarray(aug_image[..., position]))
        write_staged_png(staging / "masks" / out_name, aug_mask)


_worker_pipeline: A.Compose | None = None


def _worker_init(settings: AugmentConfig, seed: int) -> None:
    global _worker_pipeline
    cv2.setNumThreads(1)  # parallelism comes from processes; nested threads only contend
    _worker_pipeline = build_augmentation(settings, seed)


def _worker_job(job: tuple) -> None:
    _augment_pair(_worker_pipeline, job)


def augment_dataset(
    train_dir: str | Path,
    out_dir: str | Path,
    *,
    settings: AugmentConfig,
    copies_per_image: int,
    seed: int,
    progress: bool = True,
    workers: int = 0,
    channels: tuple[str, ...] = (SINGLE_CHANNEL,),
) -> AugmentReport:
    """Write ``copies_per_image`` augmented copies of every training pair to ``out_dir``.

    Copies are named ``<id>__aug<k>.png`` so a copy is always traceable to (and split with) its
    original. Only the training split is ever augmented. Replaced atomically. ``workers`` processes
    (0 = all cores) share the pairs; each pair is seeded by (``seed``, its index), so the output
    does not depend on the number of workers. Multi-sequence slices (``channels``: one folder per
    sequence) go through the transforms as one multi-channel image, so their sequences stay aligned.
    """
    train_dir, out_dir, channels = Path(train_dir), Path(out_dir), tuple(channels)
    names = sorted(p.name for p in (train_dir / channels[0]).glob("*.png"))
    workers = workers or default_workers()
    with atomic_directory(out_dir, inputs=(train_dir,)) as staging:
        for folder in (*channels, "masks"):
            (staging / folder).mkdir()
        jobs = [(train_dir, staging, name, index, copies_per_image, seed, channels) for index, name in enumerate(names)]
        bar = tqdm(total=len(jobs), desc="augment", unit="pair", disable=not progress)
        if workers <= 1 or len(jobs) < 64:  # a pool's start-up costs more than a few pairs
            pipeline = build_augmentation(settings, seed)
            for job in jobs:
                _augment_pair(pipeline, job)
                bar.update()
        else:
            with worker_pool(workers, _worker_init, (settings, seed)) as pool:
                for _ in pool.map(_worker_job, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 8)))):
                    bar.update()
        bar.close()
        report = AugmentReport(len(names), len(names) * copies_per_image, copies_per_image)
        atomic_write_json(staging / "report.json", report.__dict__)
    return report


def preview_grid(
    train_dir: str | Path, settings: AugmentConfig, *, rows: int, copies: int, seed: int, channels: tuple[str, ...] = (SINGLE_CHANNEL,)
) -> np.ndarray:
    """Rows of (original, augmented copies...) with the mask outline drawn on each tile (the first
    sequence of multi-sequence slices)."""
    train_dir, channels = Path(train_dir), tuple(channels)
    names = sorted(p.name for p in (train_dir / channels[0]).glob("*.png"))
    if not names:
        raise ValueError(f"no training images in {train_dir / channels[0]}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(names), size=min(rows, len(names)), replace=False))
    pipeline = build_augmentation(settings, seed)
    lines = []
    for index in chosen:
        image = _read_slice(train_dir, names[index], channels)
        mask = _read_gray(train_dir / "masks" / names[index])
        tiles = [overlay_outline(first_channel(image), mask, TRUTH_BGR)]
        for _ in range(copies):
            aug_image, aug_mask = apply(pipeline, image, mask)
            tiles.append(overlay_outline(first_channel(aug_image), aug_mask, TRUTH_BGR))
        lines.append(np.concatenate([frame_tile(t) for t in tiles], axis=1))
    return np.concatenate(lines, axis=0)


def first_channel(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else np.ascontiguousarray(image[..., 0])


def write_preview(path: str | Path, grid: np.ndarray) -> Path:
    return atomic_write_png(path, grid)
