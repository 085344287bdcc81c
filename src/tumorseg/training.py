"""Training: tf.data input, fit with the reference callbacks, resume after a kill, outputs.

One function, :func:`train_model`, serves both DVC training stages. Long runs survive being killed:
``BackupAndRestore`` checkpoints model + optimizer every epoch, and this module's own callbacks
keep the best-so-far score, the history and the MLflow run id beside it, so a re-run continues
from the last completed epoch, into the same MLflow run, without repeating or losing epochs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tumorseg.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MONITOR = "val_dice"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


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


def make_dataset(images: np.ndarray, masks: np.ndarray, *, batch_size: int, shuffle: bool, seed: int, augment=None, drop_remainder: bool = False):
    """A ``tf.data`` pipeline of (raw float image, 0/1 mask) batches.

    ``augment`` (an albumentations Compose) runs on the fly in a ``numpy_function``; it is applied
    before batching so image and mask go through it together.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, masks))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if augment is not None:
        from tumorseg.data.augment import apply

        def _augment(image, mask):
            out_image, out_mask = apply(augment, image[..., 0], mask[..., 0] * 255)
            return out_image[..., None], (out_mask > 127).astype(np.uint8)[..., None]

        def _map(image, mask):
            out_image, out_mask = tf.numpy_function(_augment, [image, mask], [tf.uint8, tf.uint8])
            out_image.set_shape(image.shape)
            out_mask.set_shape(mask.shape)
            return out_image, out_mask

        dataset = dataset.map(_map, num_parallel_calls=1, deterministic=True)
    # Several replicas need equal shares of every batch: drop the ragged last batch.
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.float32)), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------
# Runtime set-up
# --------------------------------------------------------------------------------------------


def configure_runtime(*, seed: int, threads: int, deterministic: bool) -> None:
    """Seeds and thread pools; must run before TensorFlow executes its first op."""
    import keras
    import tensorflow as tf

    from tumorseg.data.prepare import default_workers

    cores = threads or default_workers()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:  # already initialised in this process (tests): keep what is set
        pass
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def distribution_strategy(kind: str):
    import tensorflow as tf

    if kind == "mirrored":
        # Without GPUs MirroredStrategy would use one CPU; use every logical CPU device instead
        # (several exist only when configured, e.g. to test data parallelism on one machine).
        if not tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("CPU")])
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()  # the default (no-op) strategy


# --------------------------------------------------------------------------------------------
# Callbacks that make a killed run resumable without loss
# --------------------------------------------------------------------------------------------


def _keras_callbacks():
    import keras

    class StateFile:
        """Small JSON state kept beside the BackupAndRestore checkpoint (atomic writes)."""

        def __init__(self, path: Path):
            self.path = path
            self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

        def save(self) -> None:
            atomic_write_json(self.path, self.data)

    class BestModelCheckpoint(keras.callbacks.Callback):
        """Save the model whenever ``val_dice`` improves; the best score survives a resume."""

        def __init__(self, target: Path, state: StateFile):
            super().__init__()
            self.target, self.state = target, state

        def on_epoch_end(self, epoch, logs=None):
            score = float((logs or {}).get(MONITOR, float("nan")))
            best = self.state.data.get("best_score", -math.inf)
            if score == score and score > best:
                save_model_atomically(self.model, self.target)
                self.state.data.update(best_score=score, best_epoch=epoch + 1)
                self.state.save()

    class HistoryWriter(keras.callbacks.Callback):
        """Per-epoch metrics, timings and MLflow logging; one row per epoch even across resumes."""

        def __init__(self, csv_path: Path, state: StateFile, on_epoch=None):
            super().__init__()
            self.csv_path, self.state, self.on_epoch = csv_path, state, on_epoch
            self.rows: dict[int, dict[str, float]] = {int(k): v for k, v in state.data.get("history", {}).items()}

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()
            self._steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self._steps += 1

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._started
            row = {k: float(v) for k, v in (logs or {}).items()}
            row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row["epoch_seconds"] = seconds
            row["ms_per_step"] = 1000.0 * seconds / max(1, self._steps)
            self.rows[epoch + 1] = row
            self.state.data["history"] = self.rows
            self.state.save()
            write_history_csv(self.csv_path, self.rows)
            if self.on_epoch:
                self.on_epoch(epoch + 1, row)

    return StateFile, BestModelCheckpoint, HistoryWriter


def save_model_atomically(model, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.partial.keras")
    model.save(temporary)
    os.replace(temporary, target)


def write_history_csv(path: Path, rows: dict[int, dict[str, float]]) -> None:
    columns = sorted({key for row in rows.values() for key in row})
    lines = [",".join(["epoch", *columns])]
    for epoch in sorted(rows):
        lines.append(",".join([str(epoch), *(f"{rows[epoch].get(c, float('nan')):.6g}" for c in columns)]))
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model_path: Path
    best_epoch: int
    best_val_dice: float
    epochs_run: int
    seconds_per_epoch: float
    ms_per_step: float
    params_total: int
    run_id: str | None
    resumed_from_epoch: int


def learning_rate_for(schedule: str, lr: float, *, steps_per_epoch: int, start_epoch: int, stop_epoch: int, warmup_epochs: int, min_lr: float):
    """A float for ``plateau``; for ``cosine`` a warm-up + cosine-decay schedule over this phase.

    The schedule is indexed by the optimizer's step count, which BackupAndRestore restores, so a
    resumed run continues on the same curve.
    """
    import keras

    if schedule == "plateau":
        return lr
    total = max(1, (stop_epoch - start_epoch) * steps_per_epoch)
    warmup = min(warmup_epochs * steps_per_epoch, total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 10 if warmup else lr,
        decay_steps=total - warmup,
        alpha=min(1.0, min_lr / lr) if lr > 0 else 0.0,
        warmup_target=lr if warmup else None,
        warmup_steps=warmup,
    )


def _optimizer(name: str, lr, weight_decay: float):
    import keras

    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate=lr)


def compile_for_training(model, *, train_params: dict[str, Any], loss_params: dict[str, Any], learning_rate: float, steps_per_epoch: int, start_epoch: int = 0, stop_epoch: int = 1) -> None:
    """Compile ``model`` with the reference loss, metrics and optimizer, as training does.

    Shared with benchmarks/bench_train_step.py, so the measured step is the trained step.
    """
    from tumorseg.losses import combined_loss
    from tumorseg.metrics import segmentation_metrics

    schedule = learning_rate_for(train_params["lr_schedule"], learning_rate, steps_per_epoch=steps_per_epoch, start_epoch=start_epoch, stop_epoch=stop_epoch, warmup_epochs=train_params["warmup_epochs"], min_lr=train_params["min_lr"])
    model.compile(
        optimizer=_optimizer(train_params["optimizer"], schedule, train_params["weight_decay"]),
        loss=combined_loss(**loss_params),
        metrics=segmentation_metrics(tversky_alpha=loss_params["tversky_alpha"], tversky_beta=loss_params["tversky_beta"]),
        jit_compile=train_params["jit_compile"],
    )


def train_model(
    name: str,
    *,
    model_params: dict[str, Any],
    loss_params: dict[str, Any],
    train_params: dict[str, Any],
    augment_params: dict[str, Any],
    lr: float,
    epochs: int,
    batch_size: int,
    image_size: int,
    seed: int,
    prepared_dir: Path,
    augmented_dir: Path | None,
    model_path: Path,
    history_path: Path,
    state_dir: Path,
    on_epoch=None,
    progress: bool = True,
) -> TrainResult:
    """Train model ``name`` and leave its best-val-Dice version at ``model_path``.

    ``state_dir`` holds the resume state; it is removed when training completes. ``on_epoch``
    (epoch, metrics) is called after every epoch (MLflow logging).
    """
    import keras

    from tumorseg.models import build_model, model_summary_stats, set_encoder_trainable

    configure_runtime(seed=seed, threads=train_params["threads"], deterministic=train_params["deterministic"])
    StateFile, BestModelCheckpoint, HistoryWriter = _keras_callbacks()
    state_dir.mkdir(parents=True, exist_ok=True)
    state = StateFile(state_dir / "state.json")
    resumed_from = len(state.data.get("history", {}))

    _, train_x, train_y = load_pairs(prepared_dir / "train", image_size)
    if augmented_dir is not None and train_params["use_augmented"] and (augmented_dir / "images").is_dir():
        _, aug_x, aug_y = load_pairs(augmented_dir, image_size)
        train_x, train_y = np.concatenate([train_x, aug_x]), np.concatenate([train_y, aug_y])
    _, val_x, val_y = load_pairs(prepared_dir / "val", image_size)
    if len(train_x) == 0:
        raise FileNotFoundError(f"no training pairs in {prepared_dir / 'train'}; run the prepare stage first")
    if len(val_x) == 0:  # tiny datasets: validate on training data rather than not at all, and say so
        log.warning("validation split is empty: monitoring val_dice on the training pairs")
        val_x, val_y = train_x, train_y

    online = None
    if train_params["online_augment"]:
        from tumorseg.data.augment import build_augmentation

        online = build_augmentation(augment_params, seed)

    strategy = distribution_strategy(train_params["distribute"])
    replicas = strategy.num_replicas_in_sync
    global_batch = batch_size * replicas
    scaled_lr = lr * replicas  # linear scaling rule: same per-example step size
    # With several replicas the ragged last batch is dropped (at most global_batch - 1 pairs).
    split_evenly = replicas > 1
    val_batch = global_batch if len(val_x) >= global_batch else replicas
    train_ds = make_dataset(train_x, train_y, batch_size=global_batch, shuffle=True, seed=seed, augment=online, drop_remainder=split_evenly)
    val_ds = make_dataset(val_x, val_y, batch_size=val_batch, shuffle=False, seed=seed, drop_remainder=split_evenly)

    with strategy.scope():
        model = build_model(name, (image_size, image_size, 1), **model_params)
        freeze_epochs = int(model_params.get("freeze_epochs", 0) or 0) if name == "umobilenetv2" else 0
        transfer = freeze_epochs > 0 and str(model_params.get("encoder_weights", "none")) != "none"

        steps_per_epoch = len(train_x) // global_batch if split_evenly else -(-len(train_x) // global_batch)

        def compile_model(learning_rate: float, start: int, stop: int) -> None:
            compile_for_training(model, train_params=train_params, loss_params=loss_params, learning_rate=learning_rate, steps_per_epoch=steps_per_epoch, start_epoch=start, stop_epoch=stop)

    stats = model_summary_stats(model)
    phases = [("fine_tune" if transfer else "train", 0, epochs, scaled_lr)]
    if transfer:
        phases = [("frozen_encoder", 0, min(freeze_epochs, epochs), scaled_lr), ("fine_tune", min(freeze_epochs, epochs), epochs, scaled_lr * model_params["fine_tune_lr_factor"])]

    history = HistoryWriter(history_path, state, on_epoch)
    best = BestModelCheckpoint(model_path, state)
    for phase, start, stop, phase_lr in phases:
        if start >= stop or state.data.get(f"{phase}_done_until", 0) >= stop:
            continue
        with strategy.scope():
            if transfer:
                set_encoder_trainable(model, phase != "frozen_encoder")
            compile_model(phase_lr, start, stop)
        callbacks = [
            keras.callbacks.BackupAndRestore(backup_dir=str(state_dir / f"backup_{phase}"), delete_checkpoint=False),
            history,
            best,
        ]
        if train_params["reduce_lr_patience"] and train_params["lr_schedule"] == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=train_params["reduce_lr_factor"], patience=train_params["reduce_lr_patience"], min_lr=train_params["min_lr"], verbose=1))
        if train_params["early_stopping_patience"]:
            callbacks.append(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=train_params["early_stopping_patience"], verbose=1))
        log.info("%s: %s phase, epochs %d-%d, lr %.2g, %d training / %d validation pairs, batch %d", name, phase, start + 1, stop, phase_lr, len(train_x), len(val_x), global_batch)
        model.fit(train_ds, validation_data=val_ds, initial_epoch=start, epochs=stop, callbacks=callbacks, shuffle=False, verbose=1 if progress else 2)
        state.data[f"{phase}_done_until"] = stop
        state.save()

    rows = state.data.get("history", {})
    epoch_seconds = [row["epoch_seconds"] for row in rows.values()]
    step_ms = [row["ms_per_step"] for row in rows.values()]
    result = TrainResult(
        model_path=model_path,
        best_epoch=int(state.data.get("best_epoch", 0)),
        best_val_dice=float(state.data.get("best_score", float("nan"))),
        epochs_run=len(rows),
        seconds_per_epoch=float(np.median(epoch_seconds)) if epoch_seconds else float("nan"),
        ms_per_step=float(np.median(step_ms)) if step_ms else float("nan"),
        params_total=int(stats["params_total"]),
        run_id=state.data.get("run_id"),
        resumed_from_epoch=resumed_from,
    )
    if not model_path.exists():  # no epoch produced a finite val Dice: keep the last weights
        save_model_atomically(model, model_path)
    return result


def read_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def remember_run_id(state_dir: Path, run_id: str) -> None:
    state = read_state(state_dir)
    state["run_id"] = run_id
    atomic_write_json(state_dir / "state.json", state)


def clear_state(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)
