"""Self-supervised pretraining without ImageNet: the segmentation network first learns to restore
training images from copies with patches blanked out and noise added (a masked-patch / denoising
autoencoder); segmentation training then starts from those weights (``train.init_from.<model>``).

The pretext model *is* the segmentation model — same layers, same one-channel sigmoid output —
asked for the clean image scaled to [0, 1], so every weight (encoder, decoder, head) carries over.
Only images are used, never masks (load_pairs reads them with the pairs): the training split's
to learn from, the validation split's for the loss curve and the choice of the best epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.config import PretrainConfig, TrainConfig, UMobileNetV2Config, UNetConfig
from tumorseg.data.pairs import batch_as_float, load_pairs
from tumorseg.resume import publish_without_optimizer, save_model_atomically
from tumorseg.runtime import configure_runtime
from tumorseg.training import learning_rate_for, optimizer_for

log = logging.getLogger(__name__)


def corruption(*, holes: int, hole_fraction: float, noise_std: float, seed: int | None):
    """Blank 1..``holes`` rectangles (sides up to ``hole_fraction`` of the image), then add noise."""
    import albumentations as A

    transforms = [
        A.CoarseDropout(
            num_holes_range=(1, holes),
            hole_height_range=(hole_fraction / 2, hole_fraction),
            hole_width_range=(hole_fraction / 2, hole_fraction),
            fill=0,
            p=1.0,
        ),
    ]
    if noise_std > 0:
        transforms.append(A.GaussNoise(std_range=(0.0, noise_std), p=1.0))
    return A.Compose(transforms, seed=seed)


def corrupt_all(images: np.ndarray, corrupt) -> np.ndarray:
    """``(N, H, W, 1)`` uint8 images through ``corrupt``, one by one."""
    return np.stack([corrupt(image=image[..., 0])["image"] for image in images])[..., None]


def reconstruction_dataset(images: np.ndarray, *, batch_size: int, seed: int, corrupt=None, corrupted: np.ndarray | None = None):
    """(corrupted raw float image, clean image / 255) batches: fresh corruption per epoch from
    ``corrupt``, or the fixed ``corrupted`` copies (a stable validation loss)."""
    import tensorflow as tf

    if corrupted is not None:
        dataset = tf.data.Dataset.from_tensor_slices((corrupted, images))
    else:
        dataset = tf.data.Dataset.from_tensor_slices(images).shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

        def _map(image):
            noisy = tf.numpy_function(lambda x: corrupt(image=x[..., 0])["image"][..., None], [image], tf.uint8)
            noisy.set_shape(image.shape)
            return noisy, image

        dataset = dataset.map(_map, num_parallel_calls=1, deterministic=True)
    return batch_as_float(dataset, batch_size, target_scale=1.0 / 255.0)


@dataclass
class PretrainResult:
    model_path: Path
    best_epoch: int
    best_val_loss: float
    first_val_loss: float
    epochs_run: int
    seconds_per_epoch: float


def pretrain_model(
    name: str,
    *,
    architecture: UNetConfig | UMobileNetV2Config,
    train: TrainConfig,
    pretrain: PretrainConfig,
    image_size: int,
    batch_size: int,
    lr: float,
    seed: int,
    prepared_dir: Path,
    model_path: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Train ``name`` to restore corrupted training images; the epoch with the lowest validation
    loss is written to ``model_path`` (atomically), ready for ``train.init_from.<name>``.
    ``architecture``, ``train`` and ``pretrain`` are params.yaml's ``models.<name>``, ``train`` and
    ``pretrain`` sections (the epochs and the corruption are ``pretrain``'s)."""
    import keras

    from tumorseg.models import build_model, fuse_batch_norm

    configure_runtime(seed=seed, threads=train.threads, deterministic=train.deterministic)
    _, train_x, _ = load_pairs(prepared_dir / "train", image_size)
    _, val_x, _ = load_pairs(prepared_dir / "val", image_size)
    if len(train_x) == 0:
        raise FileNotFoundError(f"no training images in {prepared_dir / 'train'}; run the prepare stage first")
    if len(val_x) == 0:
        val_x = train_x
    settings = {"holes": pretrain.holes, "hole_fraction": pretrain.hole_fraction, "noise_std": pretrain.noise_std}
    epochs = pretrain.epochs
    train_ds = reconstruction_dataset(train_x, batch_size=batch_size, seed=seed, corrupt=corruption(**settings, seed=seed))
    val_ds = reconstruction_dataset(val_x, batch_size=batch_size, seed=seed, corrupted=corrupt_all(val_x, corruption(**settings, seed=seed + 1)))

    model = build_model(name, (image_size, image_size, 1), **architecture.model_dump())
    if train.fused_batch_norm:
        fuse_batch_norm(model)
    steps = -(-len(train_x) // batch_size)
    schedule = learning_rate_for(
        train.lr_schedule, lr, steps_per_epoch=steps, start_epoch=0, stop_epoch=epochs, warmup_epochs=train.warmup_epochs, min_lr=train.min_lr
    )
    model.compile(optimizer=optimizer_for(train.optimizer, schedule, train.weight_decay), loss=keras.losses.MeanAbsoluteError(), jit_compile=train.jit_compile)

    best = {"epoch": 0, "loss": float("inf"), "first": float("nan")}
    checkpoint = model_path.with_name(f".{model_path.stem}.best.keras")
    timing: list[float] = []

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            timing.append(time.perf_counter() - self._started)
            row = {k: float(v) for k, v in (logs or {}).items()} | {"epoch_seconds": timing[-1]}
            if epoch == 0:
                best["first"] = row["val_loss"]
            if row["val_loss"] < best["loss"]:
                best.update(epoch=epoch + 1, loss=row["val_loss"])
                save_model_atomically(self.model, checkpoint)
            if on_epoch:
                on_epoch(epoch + 1, row)

    log.info("%s: self-supervised pretraining, %d epochs, %d training / %d validation images", name, epochs, len(train_x), len(val_x))
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[KeepBest()], shuffle=False, verbose=1 if progress else 2)
    publish_without_optimizer(checkpoint, model_path)
    checkpoint.unlink(missing_ok=True)
    return PretrainResult(model_path, best["epoch"], best["loss"], best["first"], len(timing), float(np.median(timing)))
