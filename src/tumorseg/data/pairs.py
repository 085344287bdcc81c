"""Prepared pairs in, training batches out: ``load_pairs`` reads a split folder into memory,
``make_dataset`` turns pairs into the ``tf.data`` batches training and pretraining consume.

Used by training, pretraining and evaluation (which scores the prepared split or its originals).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from tumorseg.config import SINGLE_CHANNEL, OversampleConfig


def load_pairs(folder: Path, size: int | None = None, channels: Sequence[str] = (SINGLE_CHANNEL,)) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All slices of a prepared split folder with their masks, as uint8 arrays: images
    ``(N, H, W, C)`` stacked from ``folder/<channel>/*.png`` in ``channels`` order (``images`` for
    one grayscale channel), masks ``(N, H, W, 1)`` of 0/1.

    Prepared data is small (2,572 slices at 256² = 170 MB), so it is held in memory: no per-step
    decoding, and the input pipeline never stalls the model.
    """
    channels = tuple(channels)
    names = sorted(p.name for p in (folder / channels[0]).glob("*.png"))

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        planes = [cv2.imread(str(folder / channel / name), cv2.IMREAD_GRAYSCALE) for channel in channels]
        mask = cv2.imread(str(folder / "masks" / name), cv2.IMREAD_GRAYSCALE)
        if mask is None or any(plane is None for plane in planes):
            missing = [channel for channel, plane in zip(channels, planes) if plane is None] + (["masks"] if mask is None else [])
            raise FileNotFoundError(f"{folder}: cannot read {name} in {', '.join(missing)}; re-run `dvc repro -f prepare`")
        for channel, plane in zip(channels, planes):
            if plane.shape != mask.shape or (size and plane.shape != (size, size)):
                expected = f"{size}x{size}" if size else f"{mask.shape[1]}x{mask.shape[0]} like its mask"
                raise ValueError(f"{folder / channel / name} is {plane.shape[1]}x{plane.shape[0]}, expected {expected}: re-run the prepare stage")
        return np.stack(planes, axis=-1), mask

    if not names:
        empty = (0, size or 0, size or 0)
        return [], np.zeros((*empty, len(channels)), np.uint8), np.zeros((*empty, 1), np.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        pairs = list(pool.map(read, names))
    images = np.stack([p[0] for p in pairs])
    masks = (np.stack([p[1] for p in pairs]) > 127).astype(np.uint8)[..., None]
    return names, images, masks


def read_tumour_types(prepared_dir: Path, split: str = "train") -> dict[str, str]:
    """{slice name: tumour type} of one split from prepare's manifest.csv ({} when the data had no
    labels.csv)."""
    path = prepared_dir / "manifest.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {row["id"]: row["tumour_type"] for row in csv.DictReader(handle) if row.get("tumour_type") and row["split"] == split}


def check_oversample_types(oversample: OversampleConfig, tumour_types: Mapping[str, str]) -> None:
    """One line naming ``train.oversample.tumour_type`` if no training pair has that type."""
    if oversample.tumour_type == "none" or not oversample.active:
        return
    if not tumour_types:
        raise ValueError(
            f"train.oversample.tumour_type={oversample.tumour_type}: the prepared data has no tumour types "
            "(manifest.csv gets them from the data source's labels.csv, file,tumour_type; re-run prepare after adding one)"
        )
    if oversample.tumour_type not in set(tumour_types.values()):
        known = ", ".join(sorted(set(tumour_types.values())))
        raise ValueError(f"train.oversample.tumour_type={oversample.tumour_type}: no training pair has that type (types: {known})")


def oversample_repeats(names: Sequence[str], masks: np.ndarray, oversample: OversampleConfig, tumour_types: Mapping[str, str]) -> np.ndarray:
    """How many times each training pair is drawn per epoch (``train.oversample``): ``repeats`` for
    a pair of ``tumour_type`` or, with ``small_tumours``, one in the smallest third of the split's
    tumours by area (the cut evaluation's size terciles use), 1 for the rest. ``names``: the pairs'
    file names; ``masks`` ``(N, H, W, 1)`` 0/1; ``tumour_types``: :func:`read_tumour_types`."""
    chosen = np.zeros(len(names), bool)
    if oversample.tumour_type != "none":
        types = [tumour_types.get(Path(name).stem) for name in names]
        check_oversample_types(oversample, {name: kind for name, kind in zip(names, types) if kind})
        chosen |= np.array([kind == oversample.tumour_type for kind in types], bool)
    if oversample.small_tumours:
        area = masks.reshape(len(masks), -1).mean(axis=1, dtype=np.float64)
        tumours = area > 0
        if tumours.any():
            cut = np.quantile(area[tumours], 1 / 3)
            chosen |= tumours & (area <= cut)
    return np.where(chosen, oversample.repeats, 1).astype(np.int64)


def soft_targets(masks: np.ndarray, probabilities: np.ndarray, weight: float) -> np.ndarray:
    """Distillation targets: ``(1 - weight) * mask + weight * probability`` per pixel, stored as
    uint8 0..255 like a mask (the quantisation step, 1/255, is below any Dice difference) so they
    travel through the same pipeline. ``masks`` ``(N, H, W, 1)`` of 0/1; ``probabilities`` the
    teachers' maps ``(N, H, W)`` or ``(N, H, W, 1)`` in [0, 1]."""
    probabilities = probabilities.reshape(masks.shape).astype(np.float32)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    blended = (1.0 - weight) * masks.astype(np.float32) + weight * np.clip(probabilities, 0.0, 1.0)
    return np.rint(255.0 * blended).astype(np.uint8)


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    augment=None,
    sequence_dropout: float = 0.0,
    sequence_dropout_max: int = 1,
    drop_remainder: bool = False,
    epochs: tuple[int, int] = (0, 1),
    soft: bool = False,
    repeats: np.ndarray | None = None,
):
    """A ``tf.data`` pipeline of (raw float image, 0/1 mask) batches for epochs ``[first, stop)``;
    ``soft``: ``masks`` are :func:`soft_targets` (0..255), given as floats in [0, 1].

    Epoch ``e``'s order is a stateless shuffle seeded by (``seed``, ``e``) and every pair's
    augmentation is seeded by (``seed``, ``e``, position), so nothing depends on what ran before:
    a run resumed at epoch ``e`` is fed exactly the batches an uninterrupted run gets there. The
    epochs follow each other in one dataset, so ``fit`` needs ``steps_per_epoch``
    (:func:`batches_per_epoch`). ``augment`` (an albumentations Compose) runs in a ``numpy_function``
    before batching, so image and mask go through it together; then, with probability
    ``sequence_dropout``, 1 to ``sequence_dropout_max`` channels of a multi-channel slice are blanked
    (as a missing sequence is stored), drawn from the same per-pair seed. ``repeats`` (one count per
    pair, :func:`oversample_repeats`): pair ``i`` is drawn ``repeats[i]`` times per epoch, each draw
    in its own place in the order and augmented anew; an epoch is ``sum(repeats)`` draws.
    """
    import tensorflow as tf

    first, stop = epochs
    all_images, all_masks = tf.constant(images), tf.constant(masks)
    if repeats is not None and len(repeats) != len(images):
        raise ValueError(f"repeats has {len(repeats)} counts for {len(images)} pairs")
    draws = np.arange(len(images), dtype=np.int64) if repeats is None else np.repeat(np.arange(len(images), dtype=np.int64), repeats)
    dropout = sequence_dropout if images.ndim == 4 and images.shape[-1] > 1 else 0.0  # one channel: nothing to drop

    def one_epoch(epoch):
        order = tf.constant(draws)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        indices = tf.data.Dataset.from_tensor_slices(order)
        if augment is None and not dropout:
            pairs = indices.map(lambda index: (tf.gather(all_images, index), tf.gather(all_masks, index)), num_parallel_calls=1, deterministic=True)
        else:  # the per-pair seed needs the pair's position in the epoch
            pairs = indices.enumerate().map(
                lambda position, index: (tf.gather(all_images, index), tf.gather(all_masks, index), epoch, position),
                num_parallel_calls=1,
                deterministic=True,
            )
            pairs = pairs.map(_online_augmentation(augment, seed, dropout, sequence_dropout_max, soft), num_parallel_calls=1, deterministic=True)
        # Several replicas need equal shares of every batch: drop the ragged last batch.
        return pairs.batch(batch_size, drop_remainder=drop_remainder)

    return as_float_batches(tf.data.Dataset.range(first, stop).flat_map(one_epoch), target_scale=1.0 / 255.0 if soft else 1.0)


def batches_per_epoch(pairs: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    return pairs // batch_size if drop_remainder else -(-pairs // batch_size)


def _online_augmentation(augment, seed: int, sequence_dropout: float = 0.0, sequence_dropout_max: int = 1, soft: bool = False):
    """A tf.data map function augmenting one pair (and maybe blanking some of its sequences),
    reseeded from (seed, epoch, position). ``soft``: the target is a 0..255 soft target, moved
    with the image as a mask is (same geometry) but kept soft."""
    import tensorflow as tf

    from tumorseg.data.augment import apply, derived_seed

    def augment_pair(image, mask, epoch, position):
        pair_seed = derived_seed(seed, int(epoch), int(position))
        if augment is not None:
            augment.set_random_seed(pair_seed)
            out_image, out_mask = apply(augment, image if image.shape[-1] > 1 else image[..., 0], mask[..., 0] if soft else mask[..., 0] * 255, binary=not soft)
            image, mask = out_image.reshape(image.shape), (out_mask if soft else (out_mask > 127).astype(np.uint8))[..., None]
        if sequence_dropout:
            image = drop_sequences(image, np.random.default_rng(pair_seed), sequence_dropout, sequence_dropout_max)
        return image, mask

    def map_pair(image, mask, epoch, position):
        out_image, out_mask = tf.numpy_function(augment_pair, [image, mask, epoch, position], [tf.uint8, tf.uint8])
        out_image.set_shape(image.shape)
        out_mask.set_shape(mask.shape)
        return out_image, out_mask

    return map_pair


def drop_sequences(image: np.ndarray, rng: np.random.Generator, probability: float, most: int = 1) -> np.ndarray:
    """With ``probability``, a copy of ``(H, W, C)`` with 1 to ``most`` of its non-blank channels
    (drawn uniformly, never every one) set to zero: the model learns to segment without them, as
    a missing sequence is stored. ``most=1`` draws exactly what the one-channel version did."""
    if rng.random() >= probability:
        return image
    present = [channel for channel in range(image.shape[-1]) if image[..., channel].any()]
    if len(present) < 2:
        return image
    count = 1 if min(most, len(present) - 1) == 1 else int(rng.integers(1, min(most, len(present) - 1) + 1))
    out = image.copy()
    if count == 1:
        out[..., present[int(rng.integers(len(present)))]] = 0
    else:
        out[..., rng.choice(present, size=count, replace=False)] = 0
    return out


def batch_as_float(dataset, batch_size: int, *, target_scale: float = 1.0, drop_remainder: bool = False):
    """Batched float32 (input, target * target_scale) pairs, prefetched, with tf.data's autotuner off."""
    return as_float_batches(dataset.batch(batch_size, drop_remainder=drop_remainder), target_scale=target_scale)


def as_float_batches(batches, *, target_scale: float = 1.0):
    """(input, target * target_scale) batches cast to float32 and prefetched, with tf.data's autotuner off."""
    import tensorflow as tf

    # One cheap cast per batch and a fixed 2-batch prefetch: tf.data's autotuner sizes its own thread
    # pools to the core count, and on a 2-core machine those threads took time from the training step.

    def _cast(x, y):
        y = tf.cast(y, tf.float32)
        return tf.cast(x, tf.float32), y if target_scale == 1.0 else y * target_scale

    batches = batches.map(_cast, num_parallel_calls=1, deterministic=True)
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.prefetch(2).with_options(options)
