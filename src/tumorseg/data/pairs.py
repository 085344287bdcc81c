"""Prepared pairs in, training batches out: ``load_pairs`` reads a split folder into memory,
``make_dataset`` turns pairs into the ``tf.data`` batches training and pretraining consume.

Used by training, pretraining and evaluation (which scores the prepared split or its originals).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np


def load_pairs(folder: Path, size: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All ``folder/images/*.png`` with their masks as uint8 arrays ``(N, H, W, 1)``.

    Prepared data is small (2,572 slices at 256² = 170 MB), so it is held in memory: no per-step
    decoding, and the input pipeline never stalls the model.
    """
    names = sorted(p.name for p in (folder / "images").glob("*.png"))

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        image = cv2.imread(str(folder / "images" / name), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(folder / "masks" / name), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            raise FileNotFoundError(f"{folder}: cannot read the pair {name}; re-run `dvc repro -f prepare`")
        if size and image.shape != (size, size):
            raise ValueError(f"{folder / 'images' / name} is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}: re-run the prepare stage")
        return image, mask

    if not names:
        return [], np.zeros((0, size or 0, size or 0, 1), np.uint8), np.zeros((0, size or 0, size or 0, 1), np.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        pairs = list(pool.map(read, names))
    images = np.stack([p[0] for p in pairs])[..., None]
    masks = (np.stack([p[1] for p in pairs]) > 127).astype(np.uint8)[..., None]
    return names, images, masks


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    augment=None,
    drop_remainder: bool = False,
    epochs: tuple[int, int] = (0, 1),
):
    """A ``tf.data`` pipeline of (raw float image, 0/1 mask) batches for epochs ``[first, stop)``.

    Epoch ``e``'s order is a stateless shuffle seeded by (``seed``, ``e``) and every pair's
    augmentation is seeded by (``seed``, ``e``, position), so nothing depends on what ran before:
    a run resumed at epoch ``e`` is fed exactly the batches an uninterrupted run gets there. The
    epochs follow each other in one dataset, so ``fit`` needs ``steps_per_epoch``
    (:func:`batches_per_epoch`). ``augment`` (an albumentations Compose) runs in a ``numpy_function``
    before batching, so image and mask go through it together.
    """
    import tensorflow as tf

    first, stop = epochs
    all_images, all_masks = tf.constant(images), tf.constant(masks)
    count = len(images)

    def one_epoch(epoch):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        indices = tf.data.Dataset.from_tensor_slices(order)
        if augment is None:
            pairs = indices.map(lambda index: (tf.gather(all_images, index), tf.gather(all_masks, index)), num_parallel_calls=1, deterministic=True)
        else:  # the augmentation's seed needs the pair's position in the epoch
            pairs = indices.enumerate().map(
                lambda position, index: (tf.gather(all_images, index), tf.gather(all_masks, index), epoch, position),
                num_parallel_calls=1,
                deterministic=True,
            )
            pairs = pairs.map(_online_augmentation(augment, seed), num_parallel_calls=1, deterministic=True)
        # Several replicas need equal shares of every batch: drop the ragged last batch.
        return pairs.batch(batch_size, drop_remainder=drop_remainder)

    return as_float_batches(tf.data.Dataset.range(first, stop).flat_map(one_epoch))


def batches_per_epoch(pairs: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    return pairs // batch_size if drop_remainder else -(-pairs // batch_size)


def _online_augmentation(augment, seed: int):
    """A tf.data map function augmenting one pair, reseeded from (seed, epoch, position)."""
    import tensorflow as tf

    from tumorseg.data.augment import apply, derived_seed

    def augment_pair(image, mask, epoch, position):
        augment.set_random_seed(derived_seed(seed, int(epoch), int(position)))
        out_image, out_mask = apply(augment, image[..., 0], mask[..., 0] * 255)
        return out_image[..., None], (out_mask > 127).astype(np.uint8)[..., None]

    def map_pair(image, mask, epoch, position):
        out_image, out_mask = tf.numpy_function(augment_pair, [image, mask, epoch, position], [tf.uint8, tf.uint8])
        out_image.set_shape(image.shape)
        out_mask.set_shape(mask.shape)
        return out_image, out_mask

    return map_pair


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
