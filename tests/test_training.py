"""Training: input pipeline, outputs, and resuming without repeating or losing epochs."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import PROJECT_ROOT, blob_pair, write_pair
from helpers import train_tiny_unet as _train
from tumorseg.config import load_config
from tumorseg.data.pairs import load_pairs, make_dataset
from tumorseg.resume import read_state

CFG = load_config(PROJECT_ROOT / "params.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    for split, count in (("train", 16), ("val", 8), ("test", 8)):
        for index in range(count):
            write_pair(root / split, f"{split}{index}.png", *blob_pair(32, hash((split, index)) % 1000, radius=5))
    return root


def test_load_pairs_gives_uint8_images_and_binary_masks(prepared: Path):
    names, images, masks = load_pairs(prepared / "train", 32)
    assert len(names) == 16 and images.shape == masks.shape == (16, 32, 32, 1)
    assert images.dtype == np.uint8 and set(np.unique(masks)) == {0, 1}
    with pytest.raises(ValueError, match="expected 64x64"):
        load_pairs(prepared / "train", 64)


def test_dataset_batches_are_float_and_shuffled_per_seed(prepared: Path):
    _, images, masks = load_pairs(prepared / "train", 32)
    first = [x.numpy() for x, _ in make_dataset(images, masks, batch_size=4, shuffle=True, seed=1)]
    again = [x.numpy() for x, _ in make_dataset(images, masks, batch_size=4, shuffle=True, seed=1)]
    other = [x.numpy() for x, _ in make_dataset(images, masks, batch_size=4, shuffle=True, seed=2)]
    assert first[0].dtype == np.float32 and first[0].shape == (4, 32, 32, 1) and first[0].max() > 1
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_online_augmentation_keeps_pairs_aligned(prepared: Path):
    from tumorseg.data.augment import build_augmentation

    _, images, masks = load_pairs(prepared / "train", 32)
    pipeline = build_augmentation(CFG.augment, seed=0)
    for x, y in make_dataset(images, masks, batch_size=16, shuffle=False, seed=0, augment=pipeline):
        x, y = x.numpy(), y.numpy()
        assert set(np.unique(y)) <= {0.0, 1.0}
        bright = x > 150
        overlap = np.logical_and(bright, y > 0).sum() / max(1, np.logical_or(bright, y > 0).sum())
        assert overlap > 0.5


@pytest.mark.slow
def test_training_writes_the_best_model_and_resumes_after_an_interruption(prepared: Path, tmp_path: Path):
    """A run that stopped after epoch 1 continues at epoch 2: no epoch repeated, none lost."""
    import keras

    import tumorseg.models  # noqa: F401

    first = _train(prepared, tmp_path, epochs=1)
    assert first.epochs_run == 1 and first.resumed_from_epoch == 0
    assert (tmp_path / "unet.keras").exists()
    assert read_state(tmp_path / "state")["history"].keys() == {"1"}

    second = _train(prepared, tmp_path, epochs=3)  # same state folder: a re-run after a stop
    assert second.resumed_from_epoch == 1
    assert second.epochs_run == 3
    with open(tmp_path / "history.csv") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == [1, 2, 3]
    assert 1 <= second.best_epoch <= 3 and 0.0 <= second.best_val_dice <= 1.0
    model = keras.models.load_model(tmp_path / "unet.keras")
    assert model.predict(np.zeros((1, 32, 32, 1), np.float32), verbose=0).shape == (1, 32, 32, 1)
    # Published without the optimizer state the checkpoint keeps for resuming, same weights.
    state = read_state(tmp_path / "state")
    best = keras.models.load_model(tmp_path / "state" / state["best_checkpoint"])
    assert state["best_epoch"] == second.best_epoch and best.optimizer is not None and getattr(model, "optimizer", None) is None
    assert all(np.array_equal(a, b) for a, b in zip(best.get_weights(), model.get_weights()))

    def stored(path: Path) -> set[str]:
        with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
            return set(weights)

    assert stored(tmp_path / "state" / state["best_checkpoint"]) == stored(tmp_path / "unet.keras") | {"optimizer"}


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    from tumorseg.training import learning_rate_for

    assert learning_rate_for("plateau", 1e-3, steps_per_epoch=10, start_epoch=0, stop_epoch=5, warmup_epochs=1, min_lr=1e-6) == 1e-3
    schedule = learning_rate_for("cosine", 1e-3, steps_per_epoch=10, start_epoch=0, stop_epoch=5, warmup_epochs=1, min_lr=1e-5)
    values = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert values[0] == pytest.approx(1e-4)  # warm-up starts at lr / 10
    assert values[0] < values[1] < values[2] == pytest.approx(1e-3)  # reaches lr after one epoch
    assert values[2] > values[3] > values[4] == pytest.approx(1e-5, rel=1e-3)  # ends at min_lr


@pytest.mark.slow  # trains (3 epochs)
def test_cosine_training_logs_a_falling_learning_rate(prepared: Path, tmp_path: Path, caplog):
    _train(prepared, tmp_path, epochs=3, lr_schedule="cosine", warmup_epochs=0, early_stopping_patience=10)
    # early stopping can cut a cosine schedule short while the lr is high (seen on real data): said once
    assert [r.levelname for r in caplog.records if "on a cosine schedule" in r.getMessage()] == ["WARNING"]
    with open(tmp_path / "history.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    assert len(rates) == 3 and all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(CFG.train.min_lr, rel=1e-3)  # the last step reaches min_lr


@pytest.mark.slow  # trains (two 2-epoch runs)
def test_a_model_with_the_transformer_bottleneck_trains_deterministically(prepared: Path, tmp_path: Path):
    """Self-attention keeps the project's promise: the same seed gives the same weights."""
    import keras

    transformer = {"transformer_depth": 1, "transformer_heads": 2}
    runs = [_train(prepared, tmp_path / name, epochs=2, deterministic=True, architecture=transformer) for name in ("a", "b")]
    assert all(run.epochs_run == 2 for run in runs)
    a, b = (keras.models.load_model(tmp_path / name / "unet.keras") for name in ("a", "b"))
    assert "transformer1_attention" in {layer.name for layer in a.layers}
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.slow  # trains (three 1-epoch runs)
def test_warm_start_begins_from_the_given_model_at_another_input_size(prepared: Path, tmp_path: Path):
    """Progressive resizing: a model trained at 32² continues at 48² from its own weights."""
    import keras

    import tumorseg.models  # noqa: F401

    _train(prepared, tmp_path / "small", epochs=1)
    source = keras.models.load_model(tmp_path / "small" / "unet.keras")
    larger = tmp_path / "prepared48"
    for split, count in (("train", 8), ("val", 8)):
        for index in range(count):
            write_pair(larger / split, f"{split}{index}.png", *blob_pair(48, index, radius=7))
    # A learning rate of ~0 leaves the kernels where the run began.
    def continue_at_48(init: str | None, out: Path):
        result = _train(larger, out, epochs=1, lr=1e-12, image_size=48, seed=1, init_from=init)
        return keras.models.load_model(result.model_path)

    def same_kernels(a, b) -> bool:
        pairs = [(x, y) for x, y in zip(a.weights, b.weights) if x.path.endswith("kernel")]
        assert len(pairs) >= 4
        return all(np.allclose(x.numpy(), y.numpy(), atol=1e-6) for x, y in pairs)

    continued = continue_at_48(str(tmp_path / "small" / "unet.keras"), tmp_path / "big")
    assert continued.input_shape == (None, 48, 48, 1)
    assert same_kernels(source, continued)
    assert not same_kernels(source, continue_at_48(None, tmp_path / "scratch"))  # from scratch: the check can fail


@pytest.mark.slow
def test_weight_averaging_ships_the_average_and_survives_a_resume(prepared: Path, tmp_path: Path):
    """Keras starts the average at the weights after the first step, which Adam moves by at most
    lr; with ema_momentum close to 1 the average then stays there while the raw weights move on.
    So epoch 2's checkpoint (what is validated and published) holds the average only if it is within lr of the start, also after a
    resume (a resume that trained on from the averages, or that shipped the raw weights, is ~2 lr
    or more away)."""
    import keras

    import tumorseg.models  # noqa: F401

    start = _train(prepared, tmp_path / "start", epochs=1).model_path
    kernels = lambda model: [w.numpy() for w in model.weights if w.path.endswith("kernel")]  # noqa: E731
    begin = kernels(keras.models.load_model(start))

    def distance(folder: Path, **overrides) -> float:
        for epochs in (1, 2):  # stop after epoch 1, then resume from the state folder
            result = _train(prepared, folder, epochs=epochs, lr=1e-2, seed=3, init_from=start, **overrides)
        assert result.resumed_from_epoch == 1
        last = folder / "state" / read_state(folder / "state")["checkpoint"]  # epoch 2's, best or not
        return max(float(np.abs(a - b).max()) for a, b in zip(begin, kernels(keras.models.load_model(last))))

    assert distance(tmp_path / "ema", ema_momentum=0.99999) <= 1.001e-2
    assert distance(tmp_path / "raw") > 1.5e-2  # the check can fail: plain training moves on


def test_warm_start_names_the_key_when_the_file_is_missing_or_does_not_fit(tmp_path: Path):
    import tumorseg.models  # noqa: F401
    from tumorseg.models import build_model
    from tumorseg.training import initial_weights_file, load_initial_weights

    small = build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_caspp=False)
    with pytest.raises(FileNotFoundError, match=r"train\.init_from\.unet: .*missing\.keras does not exist"):
        initial_weights_file(str(tmp_path / "missing.keras"), key="train.init_from.unet")
    small.save(tmp_path / "small.keras")
    wider = build_model("unet", (32, 32, 1), base_filters=8, depth=2, use_caspp=False)
    with pytest.raises(ValueError, match=r"train\.init_from\.unet: .*small\.keras does not fit"):
        load_initial_weights(wider, tmp_path / "small.keras", key="train.init_from.unet")


def test_a_resume_with_changed_params_is_recorded_not_hidden(tmp_path: Path):
    """MLflow params cannot change: a resumed run whose params.yaml changed keeps its first values,
    so each change (and the epoch it took effect after) goes to a tag, the resume state and back
    to the caller for the train JSON; a restart with the same params adds nothing."""
    import mlflow

    from tumorseg import tracking
    from tumorseg.pipeline.train import _note_param_changes
    from tumorseg.resume import update_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state_dir = tmp_path / "state"
    first = {"train.early_stopping_patience": 10, "epochs": 80, "lr": 1e-4}
    with tracking.run(uri, run_id=None, run_name="r", tags={}) as active:
        assert _note_param_changes("m", state_dir, tracking.log_params(first)) == []
        run_id = active.info.run_id
    update_state(state_dir, epochs_done=36)

    def resume(params: dict) -> list[str]:
        with tracking.run(uri, run_id=run_id, run_name="r", tags={}):
            return _note_param_changes("m", state_dir, tracking.log_params(params))

    changed = first | {"train.early_stopping_patience": 0}
    assert resume(changed) == ["after epoch 36: train.early_stopping_patience 10 -> 0"]
    update_state(state_dir, epochs_done=50)
    assert resume(changed) == ["after epoch 36: train.early_stopping_patience 10 -> 0"], "the same change is not recorded twice"
    update_state(state_dir, epochs_done=60)
    assert resume(first) == ["after epoch 36: train.early_stopping_patience 10 -> 0", "after epoch 60: train.early_stopping_patience 0 -> 10"]

    run = mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params["train.early_stopping_patience"] == "10", "MLflow keeps the value the run started with"
    assert run.data.tags[tracking.PARAMS_CHANGED_TAG] == (
        "after epoch 36: train.early_stopping_patience 10 -> 0; after epoch 60: train.early_stopping_patience 0 -> 10"
    )
    assert len(read_state(state_dir)["param_changes"]) == 2
    # the study compares runs by what they trained on last
    assert resume(changed)[-1] == "after epoch 60: train.early_stopping_patience 10 -> 0"
    (study_run,) = tracking.study_runs(uri)
    assert study_run["params"]["train.early_stopping_patience"] == "0" and study_run["params"]["epochs"] == "80"


@pytest.mark.slow
def test_deep_supervision_trains_heads_resumes_and_publishes_the_plain_model(prepared: Path, tmp_path: Path):
    import keras

    from tumorseg.models import DeeplySupervised

    first = _train(prepared, tmp_path, epochs=1, deep_supervision=1.0)
    checkpoint = keras.models.load_model(tmp_path / "state" / read_state(tmp_path / "state")["checkpoint"])
    assert isinstance(checkpoint, DeeplySupervised) and len(checkpoint.outputs) == 2  # depth 2: one coarse stage
    assert first.params_total == keras.models.load_model(tmp_path / "unet.keras").count_params()  # the shipped model's count

    # switching it off mid-run cannot load the checkpoint: said with the way out, nothing overwritten
    with pytest.raises(ValueError, match=r"(?s)cannot resume from .*epoch-0001\.keras.*train\.deep_supervision.*delete .*state"):
        _train(prepared, tmp_path, epochs=2, deep_supervision=0.0)
    second = _train(prepared, tmp_path, epochs=2, deep_supervision=1.0)
    assert second.resumed_from_epoch == 1 and second.epochs_run == 2

    published = keras.models.load_model(tmp_path / "unet.keras")
    assert not isinstance(published, DeeplySupervised) and len(published.outputs) == 1
    assert not any("_aux_" in layer.name for layer in published.layers)
    with open(tmp_path / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2] and all(0.0 <= float(row["val_dice"]) <= 1.0 for row in rows)
    assert not any("aux" in column for column in rows[0])
