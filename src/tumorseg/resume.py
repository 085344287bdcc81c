"""Resume state of a training run, the one owner of ``models/.state/<model>/state.json``.

Training commits to it every epoch; the pipeline records the MLflow run, the resume token and
parameter changes in it through :func:`update_state`; both read it through :class:`ResumeState`
or :func:`read_state`.
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
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.io import OutputError, atomic_write_json, atomic_write_text, describe_os_error

log = logging.getLogger(__name__)

MONITOR = "val_dice"  # the score that picks the best epoch, for checkpoints, early stopping and the LR plateau

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
    publishing mid-run leaves the rest of the run as it would have been. A checkpoint written
    before issue 23 (legacy HAC/CASPP layers) is published as the stock-layer graph.
    """
    import random

    import keras

    from tumorseg.models import inference_model, to_portable  # the import registers the custom layers for loading

    rng = random.getstate()
    try:
        model = to_portable(inference_model(keras.models.load_model(checkpoint, compile=False)))  # deep supervision's heads stay behind
    finally:
        random.setstate(rng)
    save_model_atomically(model, target)


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


def epoch_commit_callback(state: ResumeState, *, phase: str, phase_stop: int, model_path: Path, history_path: Path, on_epoch, ema: bool = False, resumable=()):
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
                swap_ema_weights(self.model)  # in the optimizer's slots, for a resume
            save_model_atomically(self.model, checkpoint)  # 1. model + optimizer after this epoch
            if ema:
                swap_ema_weights(self.model)
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


def sweep_temporaries(*targets: Path) -> None:
    """Remove the temporary files of ``targets`` that a killed run left (a live writer uses fresh names)."""
    for target in targets:
        if target.parent.is_dir():
            for path in target.parent.glob(f".{target.stem}*"):
                if path.is_file() and path.name.endswith((".partial.keras", ".publish", ".tmp")):  # .publish: older versions
                    _remove_quietly(path)


def restore_checkpoint(model, state: ResumeState, phase: str) -> None:
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
    same_phase = state.data.get("checkpoint_phase", phase) == phase
    try:
        if same_phase:
            model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
        if _legacy_checkpoint(checkpoint):
            _restore_legacy_checkpoint(model, checkpoint, optimizer=same_phase)
        elif same_phase:
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


def _legacy_checkpoint(checkpoint: Path) -> bool:
    from tumorseg.models.legacy import saved_with_legacy_layers

    return saved_with_legacy_layers(checkpoint)


def _restore_legacy_checkpoint(model, checkpoint: Path, *, optimizer: bool) -> None:
    """Resume a run begun before issue 23: its checkpoint holds the legacy HAC/CASPP layers, the
    model built now the stock-layer graph. The checkpoint is loaded as it is (with its optimizer)
    and its weights, and with ``optimizer`` Adam's moments, EMA averages and step count, are
    copied across, the projection of each HAC block sliced into its groups."""
    import random

    import keras

    from tumorseg.models.legacy import copy_legacy_state

    rng = random.getstate()  # loading draws layer seeds from Python's random: leave the run's stream alone
    try:
        saved = keras.models.load_model(checkpoint, compile=optimizer)
    finally:
        random.setstate(rng)
    if optimizer and (saved.optimizer is None or not saved.optimizer.built):
        raise ValueError(f"{checkpoint} holds no optimizer state to resume from")
    copy_legacy_state(saved, model, optimizer=optimizer)
    log.warning("resumed from %s, a checkpoint with the legacy HAC/CASPP layers: its weights were copied into the stock-layer U-Net", checkpoint)


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


def swap_ema_weights(model) -> None:
    """Exchange the model's weights with the optimizer's moving averages (Keras' own swap).

    Checkpoints are written with the averages in the model (they are what is validated and
    shipped) and the raw weights in the optimizer's average slots, so a resumed run swaps once to
    train on from the raw weights.
    """
    import keras

    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap._swap_variables()
