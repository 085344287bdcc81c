"""Training: tf.data input, fit with the reference callbacks, resume after a kill, outputs.

One function, :func:`train_model`, serves both DVC training stages. Long runs survive being killed
at any instant: every epoch ends with one atomic commit of model + optimizer, history, best score
(and the MLflow run id beside them), so a re-run continues after the last completed epoch, into
the same MLflow run, without repeating or losing epochs (see :class:`ResumeState`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tumorseg.io import OutputError, atomic_write_json, atomic_write_text, describe_os_error

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


def make_dataset(images: np.ndarray, masks: np.ndarray, *, batch_size: int, shuffle: bool, seed: int, augment=None, drop_remainder: bool = False, epochs: tuple[int, int] = (0, 1)):
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
            pairs = indices.enumerate().map(lambda position, index: (tf.gather(all_images, index), tf.gather(all_masks, index), epoch, position), num_parallel_calls=1, deterministic=True)
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


# --------------------------------------------------------------------------------------------
# Runtime set-up
# --------------------------------------------------------------------------------------------


def configure_runtime(*, seed: int, threads: int, deterministic: bool) -> None:
    """Seeds and thread pools; must run before TensorFlow executes its first op."""
    import keras
    import tensorflow as tf

    from tumorseg.processes import default_workers

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
# Resume state: one commit per epoch, so a kill at any instant loses or repeats nothing
# --------------------------------------------------------------------------------------------
#
# ``state_dir`` holds ``state.json`` plus at most two checkpoints (``epoch-NNNN.keras``: model and
# optimizer after epoch N; the latest and the best). At the end of every epoch, in this order:
#   1. the checkpoint is written (temporary file + fsync + rename),
#   2. ``state.json`` is replaced atomically: epochs done, history row, best score, files. THE COMMIT.
#   3. published: history CSV and (if improved) the best model at ``model_path`` (without the
#      optimizer state), then the ``on_epoch`` hook (MLflow).
# A kill before 2 redoes the epoch, and nothing of it was published; a kill after 2 loses nothing:
# the next run publishes again from the state (and ``tumorseg.tracking.log_missing_epochs`` adds
# what MLflow lacks). Keras' BackupAndRestore is not used: it overwrites its weights file and its
# epoch file in place, one after the other, so a kill can tear either or pair epoch N's weights
# with epoch N-1's counter (the epoch is then trained twice).

STATE_FILE = "state.json"
_CHECKPOINT = re.compile(r"epoch-(\d{4,})\.keras")


class ResumeState:
    """``state.json`` of one training run; every :meth:`commit` replaces it atomically."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.data: dict[str, Any] = read_state(state_dir)

    @property
    def epochs_done(self) -> int:
        return int(self.data.get("epochs_done", len(self.data.get("history", {}))))

    def checkpoint(self, key: str) -> Path | None:
        name = self.data.get(key)
        return self.dir / name if name else None

    def commit(self) -> None:
        atomic_write_json(self.dir / STATE_FILE, self.data)

    def discard_uncommitted(self) -> None:
        """Remove checkpoints and temporary files that no commit refers to (left by a kill)."""
        keep = {self.data.get("checkpoint"), self.data.get("best_checkpoint"), STATE_FILE}
        for path in self.dir.iterdir():
            if path.is_file() and path.name not in keep and (_CHECKPOINT.fullmatch(path.name) or path.name.startswith(".")):
                path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_atomically(model, target: Path) -> None:
    """``model.save`` to a temporary file beside ``target``, fsync, rename; no partial file is ever left.

    Raises :class:`~tumorseg.io.OutputError` naming ``target`` when the disk is full or read-only.
    """
    temporary = target.with_name(f".{target.stem}.{os.getpid()}.partial.keras")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        model.save(temporary)
        _fsync(temporary)
        os.replace(temporary, target)
    except OSError as exc:
        _remove_quietly(temporary)
        raise OutputError(describe_os_error(target, exc)) from exc
    except BaseException:
        _remove_quietly(temporary)
        raise


def publish_without_optimizer(checkpoint: Path, target: Path) -> None:
    """Write ``checkpoint``'s model to ``target`` without its optimizer state, atomically.

    A checkpoint keeps Adam's two slots per weight for a resume: three times the size of what
    prediction, evaluation, export and ``train.init_from`` read (65 MB instead of 22 MB for
    UMobileNetV2). Loading draws layer seeds from Python's ``random``; its state is restored, so
    publishing mid-run leaves the rest of the run as it would have been.
    """
    import random

    import keras

    from tumorseg.models import inference_model  # the import registers the custom layers for loading

    rng = random.getstate()
    try:
        model = keras.models.load_model(checkpoint, compile=False)
    finally:
        random.setstate(rng)
    save_model_atomically(inference_model(model), target)  # deep supervision's heads stay behind


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def write_history_csv(path: Path, rows: dict[int, dict[str, float]]) -> None:
    columns = sorted({key for row in rows.values() for key in row})
    lines = [",".join(["epoch", *columns])]
    for epoch in sorted(rows):
        lines.append(",".join([str(epoch), *(f"{rows[epoch].get(c, float('nan')):.6g}" for c in columns)]))
    atomic_write_text(path, "\n".join(lines) + "\n")


# What Keras' own callbacks remember between epochs. ``on_train_begin`` resets it, so a resumed
# ``fit`` would forget an early stop that was waiting or a plateau about to lower the learning rate;
# the commit stores it and puts it back (the learning rate itself is an optimizer variable, saved
# with the checkpoint).
RESUMABLE_CALLBACK_FIELDS = {
    "EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
}


def callback_states(callbacks) -> dict[str, dict[str, Any]]:
    states = {}
    for callback in callbacks:
        fields = RESUMABLE_CALLBACK_FIELDS.get(type(callback).__name__, ())
        if fields:
            states[type(callback).__name__] = {field: _plain_number(getattr(callback, field, None)) for field in fields}
    return states


def _plain_number(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float)) else float(value)


def seed_generator_variables(model) -> list:
    """The state variables of the model's random streams (dropout). ``model.save`` leaves them out, so
    without them a resumed run would draw the dropout masks of its first epochs again."""
    return [variable for variable in model.variables if variable.path.endswith("seed_generator_state")]


def _epoch_commit_callback(state: ResumeState, *, phase: str, phase_stop: int, model_path: Path, history_path: Path, on_epoch, ema: bool = False, resumable=()):
    """The callback that ends every epoch; it must come LAST in ``fit``'s list, after every callback
    whose state it records (``resumable``) has seen the epoch."""
    import keras

    class EpochCommit(keras.callbacks.Callback):
        """Checkpoint, commit, publish: see the comment above :class:`ResumeState`."""

        def on_train_begin(self, logs=None):
            # runs after the other callbacks' on_train_begin (which reset them): put back their state
            if state.epochs_done and state.data.get("checkpoint_phase") == phase:
                saved = state.data.get("callbacks", {})
                for callback in resumable:
                    for field, value in saved.get(type(callback).__name__, {}).items():
                        setattr(callback, field, value)
                for variable, value in zip(seed_generator_variables(self.model), state.data.get("seed_generators", [])):
                    variable.assign(np.asarray(value, dtype=variable.dtype))

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()
            self._steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self._steps += 1

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._started
            number = epoch + 1
            logs = dict(logs or {})
            # ReduceLROnPlateau notes the rate this epoch ran with before it lowers it
            lr = logs.pop("learning_rate", None)
            row = {k: float(v) for k, v in logs.items()}
            row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)) if lr is None else float(lr)
            row["epoch_seconds"] = seconds
            row["ms_per_step"] = 1000.0 * seconds / max(1, self._steps)

            checkpoint = state.dir / f"epoch-{number:04d}.keras"
            if ema:  # the averages are what was validated and what ships; the raw weights ride along
                _swap_ema_weights(self.model)  # in the optimizer's slots, for a resume
            save_model_atomically(self.model, checkpoint)  # 1. model + optimizer after this epoch
            if ema:
                _swap_ema_weights(self.model)
            score = row.get(MONITOR, float("nan"))
            improved = score == score and score > state.data.get("best_score", -math.inf)
            previous = {state.data.get("checkpoint"), state.data.get("best_checkpoint")}
            history = state.data.setdefault("history", {})
            history[str(number)] = row
            state.data.update(
                epochs_done=number,
                checkpoint=checkpoint.name,
                checkpoint_phase=phase,
                callbacks=callback_states(resumable),
                seed_generators=[keras.ops.convert_to_numpy(v).tolist() for v in seed_generator_variables(self.model)],
            )
            if improved:
                state.data.update(best_score=score, best_epoch=number, best_checkpoint=checkpoint.name)
            if self.model.stop_training:  # early stopping ended this phase: a resume must not reopen it
                state.data[f"{phase}_done_until"] = phase_stop
            state.commit()  # 2. the commit point
            for name in previous - {state.data["checkpoint"], state.data.get("best_checkpoint"), None}:
                _remove_quietly(state.dir / name)
            publish(state, model_path, history_path, model=improved)  # 3. outputs, then MLflow
            if on_epoch:
                on_epoch(number, row)

    return EpochCommit()


def publish(state: ResumeState, model_path: Path, history_path: Path, *, model: bool = True) -> None:
    """Write the outputs that the committed state implies (again, after a resume: idempotent)."""
    rows = {int(k): v for k, v in state.data.get("history", {}).items()}
    if rows:
        write_history_csv(history_path, rows)
    best = state.checkpoint("best_checkpoint")
    if model and best is not None and best.exists():
        publish_without_optimizer(best, model_path)


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

    The schedule is indexed by the optimizer's step count, which the resume checkpoint restores, so a
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


def optimizer_for(name: str, lr, weight_decay: float, ema_momentum: float = 0.0):
    import keras

    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum > 0 else {}
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay, **ema)
    return keras.optimizers.Adam(learning_rate=lr, **ema)


def _swap_ema_weights(model) -> None:
    """Exchange the model's weights with the optimizer's moving averages (Keras' own swap).

    Checkpoints are written with the averages in the model (they are what is validated and
    shipped) and the raw weights in the optimizer's average slots, so a resumed run swaps once to
    train on from the raw weights.
    """
    import keras

    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap._swap_variables()


def compile_for_training(model, *, train_params: dict[str, Any], loss_params: dict[str, Any], learning_rate: float, steps_per_epoch: int, start_epoch: int = 0, stop_epoch: int = 1) -> None:
    """Compile ``model`` with the reference loss, metrics and optimizer, as training does.

    Shared with benchmarks/bench_train_step.py, so the measured step is the trained step.
    """
    from tumorseg.losses import combined_loss
    from tumorseg.metrics import segmentation_metrics

    schedule = learning_rate_for(train_params["lr_schedule"], learning_rate, steps_per_epoch=steps_per_epoch, start_epoch=start_epoch, stop_epoch=stop_epoch, warmup_epochs=train_params["warmup_epochs"], min_lr=train_params["min_lr"])
    model.compile(
        optimizer=optimizer_for(train_params["optimizer"], schedule, train_params["weight_decay"], train_params.get("ema_momentum", 0.0)),
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

    from tumorseg.models import build_model, model_summary_stats, set_encoder_trainable, with_deep_supervision

    configure_runtime(seed=seed, threads=train_params["threads"], deterministic=train_params["deterministic"])
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe_os_error(state_dir, exc)) from exc
    state = ResumeState(state_dir)
    state.discard_uncommitted()
    sweep_temporaries(model_path, history_path)
    resumed_from = state.epochs_done
    if resumed_from:
        publish(state, model_path, history_path)  # a kill may have come between commit and publish

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
    val_ds = make_dataset(val_x, val_y, batch_size=val_batch, shuffle=False, seed=seed, drop_remainder=split_evenly)

    if train_params["lr_schedule"] == "cosine" and train_params["early_stopping_patience"]:
        # measured on real data: patience 10 ended an 80-epoch cosine run at epoch 33 (best 23) while
        # another seed trained on to 64; validation Dice is noisy while the learning rate is high
        log.warning("%s: early stopping (train.early_stopping_patience=%d) on a cosine schedule can end the run while the learning rate is still high; "
                    "the best epoch is kept either way, so -S train.early_stopping_patience=0 trains the whole schedule", name, train_params["early_stopping_patience"])
    with strategy.scope():
        model = build_model(name, (image_size, image_size, 1), **model_params)
        key = f"train.init_from.{name}"
        init_from = initial_weights_file(str((train_params.get("init_from") or {}).get(name, "none")), key=key)
        if init_from is not None and not state.epochs_done:  # a resume restores its own checkpoint
            load_initial_weights(model, init_from, key=key)
        shipped = model  # what is published: without deep supervision's training-only heads
        if train_params.get("deep_supervision", 0.0) > 0:
            model = with_deep_supervision(model, train_params["deep_supervision"])
        freeze_epochs = int(model_params.get("freeze_epochs", 0) or 0) if name == "umobilenetv2" else 0
        transfer = freeze_epochs > 0 and str(model_params.get("encoder_weights", "none")) != "none"

        steps = batches_per_epoch(len(train_x), global_batch, drop_remainder=split_evenly)

        def compile_model(learning_rate: float, start: int, stop: int) -> None:
            compile_for_training(model, train_params=train_params, loss_params=loss_params, learning_rate=learning_rate, steps_per_epoch=steps, start_epoch=start, stop_epoch=stop)

    stats = model_summary_stats(shipped)
    phases = [("fine_tune" if transfer else "train", 0, epochs, scaled_lr)]
    if transfer:
        phases = [("frozen_encoder", 0, min(freeze_epochs, epochs), scaled_lr), ("fine_tune", min(freeze_epochs, epochs), epochs, scaled_lr * model_params["fine_tune_lr_factor"])]

    restored = False
    ema = train_params.get("ema_momentum", 0.0) > 0
    for phase, start, stop, phase_lr in phases:
        if start >= stop or state.data.get(f"{phase}_done_until", 0) >= stop or state.epochs_done >= stop:
            continue
        with strategy.scope():
            if transfer:
                set_encoder_trainable(model, phase != "frozen_encoder")
            compile_model(phase_lr, start, stop)
            if state.epochs_done and not restored:
                _restore(model, state, phase)
                if ema and state.data.get("checkpoint_phase", phase) == phase:
                    _swap_ema_weights(model)  # the checkpoint holds the averages in the model
        restored = True  # later phases continue from the weights in memory
        initial_epoch = max(start, state.epochs_done)
        resumable = []
        if train_params["reduce_lr_patience"] and train_params["lr_schedule"] == "plateau":
            resumable.append(keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=train_params["reduce_lr_factor"], patience=train_params["reduce_lr_patience"], min_lr=train_params["min_lr"], verbose=1))
        if train_params["early_stopping_patience"]:
            resumable.append(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=train_params["early_stopping_patience"], verbose=1))
        commit = _epoch_commit_callback(state, phase=phase, phase_stop=stop, model_path=model_path, history_path=history_path, on_epoch=on_epoch, ema=ema, resumable=resumable)
        callbacks = [*resumable, commit]  # the commit last: it records what the others decided
        if ema:  # validate the averaged weights (Keras swaps them in around each validation)
            callbacks.insert(0, keras.callbacks.SwapEMAWeights())
        train_ds = make_dataset(train_x, train_y, batch_size=global_batch, shuffle=True, seed=seed, augment=online, drop_remainder=split_evenly, epochs=(initial_epoch, stop))
        log.info("%s: %s phase, epochs %d-%d, lr %.2g, %d training / %d validation pairs, batch %d", name, phase, initial_epoch + 1, stop, phase_lr, len(train_x), len(val_x), global_batch)
        model.fit(train_ds, validation_data=val_ds, initial_epoch=initial_epoch, epochs=stop, steps_per_epoch=steps, callbacks=callbacks, shuffle=False, verbose=1 if progress else 2)
        state.data[f"{phase}_done_until"] = stop  # also when early stopping ended it sooner
        state.commit()

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
        save_model_atomically(shipped, model_path)
    return result


def initial_weights_file(value: str, *, key: str) -> Path | None:
    """The ``train.init_from.<model>`` file, checked to exist; None for ``none`` (from scratch)."""
    if value == "none":
        return None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist; give a .keras model file or `none` to train from scratch")
    return path


def load_initial_weights(model, path: Path, *, key: str) -> None:
    """Warm-start ``model`` from a saved model of the same architecture (any input size)."""
    initial_weights_file(str(path), key=key)
    try:
        with warnings.catch_warnings():  # Keras 3.15 warns about weightless op containers of our blocks
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(path)
    except Exception as exc:  # Keras raises ValueError/KeyError/OSError for unfit or unreadable files
        raise ValueError(
            f"{key}: {path} does not fit the {model.name} model built from params.yaml ({type(exc).__name__}: {exc}); "
            "it must be a model trained with the same model settings (models.* in params.yaml)"
        ) from exc
    log.info("starting from the weights of %s (%s)", path, key)


def sweep_temporaries(*targets: Path) -> None:
    """Remove the temporary files of ``targets`` that a killed run left (a live writer uses fresh names)."""
    for target in targets:
        if target.parent.is_dir():
            for path in target.parent.glob(f".{target.stem}*"):
                if path.is_file() and path.name.endswith((".partial.keras", ".publish", ".tmp")):  # .publish: older versions
                    _remove_quietly(path)


def _restore(model, state: ResumeState, phase: str) -> None:
    """Load the last committed checkpoint; its optimizer too when it belongs to this phase."""
    checkpoint = state.checkpoint("checkpoint")
    legacy = state.dir / f"backup_{phase}" / "latest.weights.h5"  # state written before ResumeState
    if checkpoint is None and legacy.exists():
        model.optimizer.build(model.trainable_variables)
        model.load_weights(legacy)
        log.warning("resuming after epoch %d from a BackupAndRestore backup (%s)", state.epochs_done, legacy)
        return
    if checkpoint is None or not checkpoint.exists():
        raise FileNotFoundError(f"{state.dir / STATE_FILE} refers to {checkpoint}, which is missing: delete {state.dir} to start training afresh")
    try:
        if state.data.get("checkpoint_phase", phase) == phase:
            model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
            model.load_weights(checkpoint)
        else:  # the next phase starts with a new optimizer
            model.load_weights(checkpoint, objects_to_skip=[model.optimizer])
    except (ValueError, KeyError) as exc:  # what Keras raises for weights of another architecture
        raise ValueError(
            f"cannot resume from {checkpoint}: it does not fit the model that params.yaml builds now ({type(exc).__name__}: {exc}). "
            f"A resume needs the settings the run started with (models.*, train.deep_supervision): "
            f"set them back, or delete {state.dir} to train afresh"
        ) from exc
    log.info("resuming after epoch %d from %s", state.epochs_done, checkpoint)


def read_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def remember_run_id(state_dir: Path, run_id: str) -> None:
    update_state(state_dir, run_id=run_id)


def update_state(state_dir: Path, **values: Any) -> dict[str, Any]:
    """Set keys in ``state.json`` (atomically); returns the new state."""
    state = read_state(state_dir) | values
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe_os_error(state_dir, exc)) from exc
    atomic_write_json(state_dir / STATE_FILE, state)
    return state


def clear_state(state_dir: Path) -> None:
    """Remove the resume state of a finished run: renamed first, so it vanishes in one step."""
    if not state_dir.exists():
        return
    doomed = state_dir.with_name(f".{state_dir.name}.done-{os.getpid()}")
    os.replace(state_dir, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
