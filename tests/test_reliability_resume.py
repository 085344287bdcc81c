"""A training run killed with SIGKILL and resumed is the same run as one that was never interrupted.

Same per-epoch history, same learning-rate reductions, the same early stop and the same weights,
with early stopping, ReduceLROnPlateau, dropout and on-the-fly augmentation all on. The kills land
right after a learning-rate reduction, while early stopping is waiting, and at a random point in
an epoch; before the fix a resumed run forgot the callbacks' state and restarted the data order,
the augmentation and the dropout streams, and diverged from the epoch after the kill.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import PROJECT_ROOT, TINY_UNET, blob_pair, train_stage_command, write_pair

pytestmark = pytest.mark.slow

EPOCHS = 16
TIMINGS = ("epoch_seconds", "ms_per_step")  # the only history columns allowed to differ


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from tumorseg.config import load_config
    from tumorseg.pipeline.prepare import prepare_step

    root = tmp_path_factory.mktemp("resume")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(profile="full", epochs=EPOCHS, image_size=32, batch_size=8, lr=3e-3)
    params["models"]["unet"].update(TINY_UNET, base_filters=8, dropout=0.1)
    params["train"].update(
        deterministic=True, threads=1, online_augment=True, use_augmented=False, lr_scale=1, lr_schedule="plateau",
        reduce_lr_patience=1, reduce_lr_factor=0.5, early_stopping_patience=3,
    )
    params["prepare"].update(group_by="none", workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for index in range(1, 161):  # bright discs: a tiny U-Net learns them in a few epochs, then plateaus
        write_pair(root / "raw", f"{index}.png", *blob_pair(32, index))
    record = {"data_source": "synthetic", "data_origin": "test", "data_hash": "0" * 64}
    prepare_step(
        load_config(root / "params.yaml"),
        root / "raw" / "images",
        root / "raw" / "masks",
        root / "data" / "prepared",
        progress=False,
        report_extra=record,
    )
    return root


def _env(root: Path) -> dict[str, str]:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", CI="true", TF_CPP_MIN_LOG_LEVEL="3", TUMORSEG_PROGRESS="0")


def _copy(project: Path, name: str) -> Path:
    root = project.parent / f"{project.name}-{name}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    shutil.copy(project / "params.yaml", root / "params.yaml")
    shutil.copytree(project / "data", root / "data")
    return root


def _history(root: Path) -> dict[int, dict[str, float]]:
    with open(root / "metrics" / "history_unet.csv") as handle:
        return {int(row["epoch"]): {k: float(v) for k, v in row.items() if k not in (*TIMINGS, "epoch")} for row in csv.DictReader(handle)}


def _state(root: Path) -> dict:
    try:
        return json.loads((root / "models" / ".state" / "unet" / "state.json").read_text())
    except (OSError, ValueError):  # not there yet, or being replaced this instant
        return {}


def _weights(root: Path) -> list[np.ndarray]:
    import keras

    import tumorseg.models  # noqa: F401 - registers the custom layers

    return keras.models.load_model(root / "models" / "unet.keras", compile=False).get_weights()


def _run_to_completion(root: Path) -> None:
    result = subprocess.run(train_stage_command(root), cwd=root, env=_env(root), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def _kill_when(root: Path, condition, *, then_wait: float = 0.0) -> dict:
    """Start the stage, SIGKILL it once ``condition(state)`` holds (after ``then_wait`` s); the state seen."""
    process = subprocess.Popen(train_stage_command(root), cwd=root, env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            state = _state(root)
            if condition(state):
                time.sleep(then_wait)
                process.send_signal(signal.SIGKILL)
                process.wait()
                return state
            time.sleep(0.005)
        raise AssertionError(f"training ended (rc {process.poll()}) before the kill point: {process.stderr.read().decode()[-2000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _early_stopping_waits(history: dict[int, dict[str, float]]) -> dict[int, int]:
    """Epoch -> how many epochs early stopping has waited without improvement, after that epoch."""
    best, wait, waits = -np.inf, 0, {}
    for epoch in sorted(history):
        score = history[epoch]["val_dice"]
        wait = 0 if score > best else wait + 1
        best = max(best, score)
        waits[epoch] = wait
    return waits


def test_a_run_killed_three_times_equals_the_uninterrupted_run(project: Path):
    uninterrupted = _copy(project, "uninterrupted")
    _run_to_completion(uninterrupted)
    expected = _history(uninterrupted)

    epochs = sorted(expected)
    lr_cuts = [e for e in epochs[:-1] if expected[e + 1]["lr"] < expected[e]["lr"]]
    waits = _early_stopping_waits(expected)
    assert lr_cuts, f"the plateau schedule never lowered the learning rate: {expected}"
    assert len(epochs) < EPOCHS, "early stopping never stopped the run: the test needs it to"
    cut = lr_cuts[0]  # kill right after the epoch whose end lowered the learning rate
    waiting = next((e for e in epochs[:-1] if e > cut and waits[e] > 0), None)
    assert waiting is not None, f"early stopping never waited after epoch {cut}: {waits}"
    assert cut > 1, "the first kill needs an earlier epoch to land in"

    killed = _copy(project, "killed")
    rng = random.Random(20)
    first = rng.randint(1, cut - 1)
    seen = [
        # 1. a random point inside an epoch before the reduction
        _kill_when(killed, lambda s: s.get("epochs_done", 0) >= first, then_wait=rng.uniform(0.05, 0.5)),
        # 2. right after the commit of the epoch that lowered the learning rate
        _kill_when(killed, lambda s: s.get("epochs_done", 0) >= cut),
        # 3. while early stopping is waiting (and has not stopped yet)
        _kill_when(killed, lambda s: s.get("epochs_done", 0) >= waiting),
    ]
    assert seen[1]["epochs_done"] == cut and seen[1]["callbacks"]["ReduceLROnPlateau"]["wait"] == 0
    assert seen[2]["epochs_done"] == waiting and seen[2]["callbacks"]["EarlyStopping"]["wait"] == waits[waiting] > 0
    _run_to_completion(killed)

    resumed = _history(killed)
    assert sorted(resumed) == epochs, "the resumed run stopped early at a different epoch"
    for epoch in epochs:
        for key in expected[epoch]:
            assert resumed[epoch][key] == pytest.approx(expected[epoch][key], rel=1e-6, abs=1e-7), f"epoch {epoch}: {key} differs after resuming"
    for ours, theirs in zip(_weights(killed), _weights(uninterrupted), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
