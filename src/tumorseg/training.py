"""Training: fit one model with the reference callbacks, resumable after a kill.

One function, :func:`train_model`, serves both DVC training stages. Its input pipeline is
:mod:`tumorseg.data.pairs`; its resume state, committed atomically every epoch, is
:mod:`tumorseg.resume` (a re-run continues after the last completed epoch, into the same MLflow
run, without repeating or losing epochs); its TensorFlow set-up is :mod:`tumorseg.runtime`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.config import SINGLE_CHANNEL, AugmentConfig, LossConfig, TrainConfig, UMobileNetV2Config, UNetConfig
from tumorseg.data.pairs import batches_per_epoch, load_pairs, make_dataset, oversample_repeats, soft_targets
from tumorseg.io import OutputError, describe_os_error
from tumorseg.resume import MONITOR, ResumeState, epoch_commit_callback, publish, restore_checkpoint, save_model_atomically, swap_ema_weights, sweep_temporaries
from tumorseg.runtime import configure_runtime, distribution_strategy

log = logging.getLogger(__name__)


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


def compile_for_training(
    model,
    *,
    train: TrainConfig,
    loss: LossConfig,
    learning_rate: float,
    steps_per_epoch: int,
    start_epoch: int = 0,
    stop_epoch: int = 1,
) -> None:
    """Compile ``model`` with the reference loss, metrics and optimizer, as training does.

    Shared with benchmarks/bench_train_step.py, so the measured step is the trained step. With
    ``train.fused_batch_norm`` the model's BatchNormalization layers compute through TensorFlow's
    fused kernel (:func:`~tumorseg.models.fuse_batch_norm`; the layers stay stock).
    """
    from tumorseg.losses import combined_loss
    from tumorseg.metrics import segmentation_metrics
    from tumorseg.models import fuse_batch_norm

    if train.fused_batch_norm:
        fuse_batch_norm(model)

    schedule = learning_rate_for(
        train.lr_schedule,
        learning_rate,
        steps_per_epoch=steps_per_epoch,
        start_epoch=start_epoch,
        stop_epoch=stop_epoch,
        warmup_epochs=train.warmup_epochs,
        min_lr=train.min_lr,
    )
    model.compile(
        optimizer=optimizer_for(train.optimizer, schedule, train.weight_decay, train.ema_momentum),
        loss=combined_loss(loss),
        metrics=segmentation_metrics(tversky_alpha=loss.tversky_alpha, tversky_beta=loss.tversky_beta),
        jit_compile=train.jit_compile,
    )


def train_model(
    name: str,
    *,
    architecture: UNetConfig | UMobileNetV2Config,
    loss: LossConfig,
    train: TrainConfig,
    augment: AugmentConfig,
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
    init_from: Path | None = None,
    sequences: tuple[str, ...] = (),
    teacher: Callable[[np.ndarray], np.ndarray] | None = None,
    tumour_types: Mapping[str, str] | None = None,
    on_epoch=None,
    progress: bool = True,
) -> TrainResult:
    """Train model ``name`` and leave its best-val-Dice version at ``model_path``.

    ``architecture``, ``loss``, ``train`` and ``augment`` are params.yaml's ``models.<name>``,
    ``loss``, ``train`` and ``augment`` sections; ``init_from``: a resolved
    ``train.init_from.<name>`` file to start from (a resume restores its own checkpoint instead);
    ``sequences``: ``data.sequences``, the prepared channel folders and the model's input channels.
    ``teacher``: knowledge distillation (``train.distill``): a function giving the teachers'
    probability maps ``(N, H, W)`` of the training images ``(N, H, W, C)``; the targets become
    ``(1 - train.distill.weight) * mask + weight * probability``. Validation keeps the masks.
    ``tumour_types``: {slice name: type} of the prepared pairs (manifest.csv), for
    ``train.oversample.tumour_type``; oversampling draws chosen pairs of ``prepared_dir/train``
    several times per epoch (augmented copies from ``augmented_dir`` once).
    ``state_dir`` holds the resume state; it is removed when training completes. ``on_epoch``
    (epoch, metrics) is called after every epoch (MLflow logging).
    """
    import keras

    from tumorseg.models import build_model, model_summary_stats, set_encoder_trainable, with_deep_supervision

    configure_runtime(seed=seed, threads=train.threads, deterministic=train.deterministic)
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

    channels = sequences or (SINGLE_CHANNEL,)
    train_names, train_x, train_y = load_pairs(prepared_dir / "train", image_size, channels)
    repeats = oversample_repeats(train_names, train_y, train.oversample, tumour_types or {}) if train.oversample.active else None
    if augmented_dir is not None and train.use_augmented and (augmented_dir / channels[0]).is_dir():
        _, aug_x, aug_y = load_pairs(augmented_dir, image_size, channels)
        train_x, train_y = np.concatenate([train_x, aug_x]), np.concatenate([train_y, aug_y])
        if repeats is not None:  # the copies are drawn once
            repeats = np.concatenate([repeats, np.ones(len(aug_x), np.int64)])
    _, val_x, val_y = load_pairs(prepared_dir / "val", image_size, channels)
    if len(train_x) == 0:
        raise FileNotFoundError(f"no training pairs in {prepared_dir / 'train'}; run the prepare stage first")
    if len(val_x) == 0:  # tiny datasets: validate on training data rather than not at all, and say so
        log.warning("validation split is empty: monitoring val_dice on the training pairs")
        val_x, val_y = train_x, train_y
    if teacher is not None:  # after the fallback above: validation is always scored against masks
        train_y = distillation_targets(name, teacher, train_x, train_y, train.distill.weight)
    if repeats is not None:
        over = train.oversample
        kinds = " or ".join(([over.tumour_type] if over.tumour_type != "none" else []) + (["smallest-third tumours"] if over.small_tumours else []))
        chosen = int((repeats > 1).sum())
        log.info("%s: oversampling %d of %d training pairs (%s) %dx: %d draws per epoch", name, chosen, len(repeats), kinds, over.repeats, int(repeats.sum()))

    online = None
    if train.online_augment:
        from tumorseg.data.augment import build_augmentation

        online = build_augmentation(augment, seed)

    strategy = distribution_strategy(train.distribute)
    replicas = strategy.num_replicas_in_sync
    global_batch = batch_size * replicas
    scaled_lr = lr * replicas  # linear scaling rule: same per-example step size
    # With several replicas the ragged last batch is dropped (at most global_batch - 1 pairs).
    split_evenly = replicas > 1
    val_batch = global_batch if len(val_x) >= global_batch else replicas
    val_ds = make_dataset(val_x, val_y, batch_size=val_batch, shuffle=False, seed=seed, drop_remainder=split_evenly)

    if train.lr_schedule == "cosine" and train.early_stopping_patience:
        # measured on real data: patience 10 ended an 80-epoch cosine run at epoch 33 (best 23) while
        # another seed trained on to 64; validation Dice is noisy while the learning rate is high
        log.warning("%s: early stopping (train.early_stopping_patience=%d) on a cosine schedule can end the run while the learning rate is still high; "
                    "the best epoch is kept either way, so -S train.early_stopping_patience=0 trains the whole schedule", name, train.early_stopping_patience)
    with strategy.scope():
        model = build_model(name, (image_size, image_size, len(channels)), sequences=sequences, **architecture.model_dump())
        if init_from is not None and not state.epochs_done:  # a resume restores its own checkpoint
            load_initial_weights(model, init_from, key=f"train.init_from.{name}")
        shipped = model  # what is published: without deep supervision's training-only heads
        if train.deep_supervision > 0:
            model = with_deep_supervision(model, train.deep_supervision)
        freeze_epochs = getattr(architecture, "freeze_epochs", 0)  # encoder models only
        transfer = freeze_epochs > 0 and str(getattr(architecture, "encoder_weights", "none")) != "none"

        draws = len(train_x) if repeats is None else int(repeats.sum())
        steps = batches_per_epoch(draws, global_batch, drop_remainder=split_evenly)

        def compile_model(learning_rate: float, start: int, stop: int) -> None:
            compile_for_training(model, train=train, loss=loss, learning_rate=learning_rate, steps_per_epoch=steps, start_epoch=start, stop_epoch=stop)

    stats = model_summary_stats(shipped)
    phases = [("fine_tune" if transfer else "train", 0, epochs, scaled_lr)]
    if transfer:
        phases = [
            ("frozen_encoder", 0, min(freeze_epochs, epochs), scaled_lr),
            ("fine_tune", min(freeze_epochs, epochs), epochs, scaled_lr * architecture.fine_tune_lr_factor),
        ]

    restored = False
    ema = train.ema_momentum > 0
    for phase, start, stop, phase_lr in phases:
        if start >= stop or state.data.get(f"{phase}_done_until", 0) >= stop or state.epochs_done >= stop:
            continue
        with strategy.scope():
            if transfer:
                set_encoder_trainable(model, phase != "frozen_encoder")
            compile_model(phase_lr, start, stop)
            if state.epochs_done and not restored:
                restore_checkpoint(model, state, phase)
                if ema and state.data.get("checkpoint_phase", phase) == phase:
                    swap_ema_weights(model)  # the checkpoint holds the averages in the model
        restored = True  # later phases continue from the weights in memory
        initial_epoch = max(start, state.epochs_done)
        resumable = []
        if train.reduce_lr_patience and train.lr_schedule == "plateau":
            resumable.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=MONITOR, mode="max", factor=train.reduce_lr_factor, patience=train.reduce_lr_patience, min_lr=train.min_lr, verbose=1
                )
            )
        if train.early_stopping_patience:
            resumable.append(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=train.early_stopping_patience, verbose=1))
        commit = epoch_commit_callback(
            state,
            phase=phase,
            phase_stop=stop,
            model_path=model_path,
            history_path=history_path,
            on_epoch=on_epoch,
            ema=ema,
            resumable=resumable,
        )
        callbacks = [*resumable, commit]  # the commit last: it records what the others decided
        if ema:  # validate the averaged weights (Keras swaps them in around each validation)
            callbacks.insert(0, keras.callbacks.SwapEMAWeights())
        train_ds = make_dataset(
            train_x,
            train_y,
            batch_size=global_batch,
            shuffle=True,
            seed=seed,
            augment=online,
            sequence_dropout=train.sequence_dropout,
            sequence_dropout_max=train.sequence_dropout_max,
            drop_remainder=split_evenly,
            epochs=(initial_epoch, stop),
            soft=teacher is not None,
            repeats=repeats,
        )
        log.info(
            "%s: %s phase, epochs %d-%d, lr %.2g, %d training / %d validation pairs, batch %d",
            name,
            phase,
            initial_epoch + 1,
            stop,
            phase_lr,
            len(train_x),
            len(val_x),
            global_batch,
        )
        model.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=initial_epoch,
            epochs=stop,
            steps_per_epoch=steps,
            callbacks=callbacks,
            shuffle=False,
            verbose=1 if progress else 2,
        )
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


def distillation_targets(name: str, teacher: Callable[[np.ndarray], np.ndarray], images: np.ndarray, masks: np.ndarray, weight: float) -> np.ndarray:
    """The soft training targets of knowledge distillation (:func:`~tumorseg.data.pairs.soft_targets`).
    The teachers run once, before the first epoch (and again, with the same result, on a resume);
    Python's and NumPy's random streams are kept, so the student starts from the weights a run
    without distillation would draw."""
    import random
    import time

    log.info("%s: distillation: the teachers predict the %d training images (weight %.2f)", name, len(images), weight)
    started, python_state, numpy_state = time.perf_counter(), random.getstate(), np.random.get_state()
    try:
        probabilities = np.asarray(teacher(images), np.float32)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    if probabilities.shape[0] != len(images) or probabilities.reshape(len(images), -1).shape[1] != masks[0].size:
        raise ValueError(f"the distillation teachers gave maps of shape {probabilities.shape} for {len(images)} training images of {masks.shape[1:3]}")
    targets = soft_targets(masks, probabilities, weight)
    agreement = float(np.mean((probabilities.reshape(masks.shape) > 0.5) == (masks > 0)))
    seconds = time.perf_counter() - started
    log.info("%s: distillation targets ready in %.0f s (the teachers agree with the masks on %.2f%% of the pixels)", name, seconds, 100 * agreement)
    return targets


def initial_weights_file(value: str, *, key: str) -> Path | None:
    """The ``train.init_from.<model>`` file, checked to exist; None for ``none`` (from scratch)."""
    if value == "none":
        return None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist; give a .keras model file or `none` to train from scratch")
    return path


def load_initial_weights(model, path: Path, *, key: str) -> None:
    """Warm-start ``model`` from a saved model of the same architecture (any input size); ``path``
    as :func:`initial_weights_file` resolved it. A file saved before issue 23 (a U-Net with the
    legacy HAC/CASPP layers) is loaded as it is and its weights copied into the stock-layer graph."""
    import random

    import keras

    from tumorseg.models.legacy import copy_legacy_state, saved_with_legacy_layers

    try:
        with warnings.catch_warnings():  # Keras 3.15 warns about weightless op containers of the legacy blocks
            warnings.filterwarnings("ignore", message="Skipping nested container")
            if saved_with_legacy_layers(path):
                rng = random.getstate()  # loading draws layer seeds from Python's random: keep the run's stream
                try:
                    saved = keras.models.load_model(path, compile=False)
                finally:
                    random.setstate(rng)
                copy_legacy_state(saved, model)
            else:
                model.load_weights(path)
    except Exception as exc:  # Keras raises ValueError/KeyError/OSError for unfit or unreadable files
        raise ValueError(
            f"{key}: {path} does not fit the {model.name} model built from params.yaml ({type(exc).__name__}: {exc}); "
            "it must be a model trained with the same model settings (models.* in params.yaml)"
        ) from exc
    log.info("starting from the weights of %s (%s)", path, key)
