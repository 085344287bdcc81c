"""Self-supervised pretraining: the pretext task learns, and its file warm-starts segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import PROJECT_ROOT, TINY_UNET, blob_pair, write_pair
from tumorseg.config import load_config
from tumorseg.pretrain import corrupt_all, corruption

CFG = load_config(PROJECT_ROOT / "params.yaml")
TINY_UNET_PARAMS = CFG.models.unet.model_dump() | TINY_UNET  # every build_model argument


def test_corruption_blanks_patches_reproducibly():
    images = np.full((4, 32, 32, 1), 200, np.uint8)
    noisy = corrupt_all(images, corruption(holes=3, hole_fraction=0.25, noise_std=0.0, seed=1))
    assert noisy.shape == images.shape and noisy.dtype == np.uint8
    blanked = (noisy == 0).mean(axis=(1, 2, 3))
    assert np.all(blanked > 0) and np.all(blanked <= 3 * 0.25**2 + 1e-9)  # 1..3 holes of side <= 8 px
    assert np.array_equal(noisy, corrupt_all(images, corruption(holes=3, hole_fraction=0.25, noise_std=0.0, seed=1)))
    with_noise = corrupt_all(images, corruption(holes=1, hole_fraction=0.1, noise_std=0.1, seed=2))
    assert with_noise[with_noise > 0].std() > 1.0  # Gaussian noise on the kept pixels


@pytest.mark.slow
def test_pretraining_learns_to_restore_and_its_file_warm_starts_the_model(tmp_path: Path, monkeypatch, capsys):
    import keras
    import mlflow

    from tumorseg.cli import main
    from tumorseg.models import build_model
    from tumorseg.training import load_initial_weights

    prepared = tmp_path / "prepared"
    for split, count in (("train", 24), ("val", 8)):
        for index in range(count):
            write_pair(prepared / split, f"{split}{index}.png", *blob_pair(32, 7 * index + len(split), radius=6))
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw.update(image_size=32, lr=0.01)
    raw["pretrain"].update(epochs=4, holes=2, hole_fraction=0.25, noise_std=0.02)
    raw["models"]["unet"].update(TINY_UNET)
    raw["train"]["deterministic"] = False
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    (prepared / "report.json").write_text('{"data_source": "synthetic", "data_origin": "test", "data_hash": "h"}')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "pretrained" / "unet.keras"

    assert main(["pretrain", "unet", "--params", str(params), "--prepared", str(prepared), "--out", str(out)]) == 0
    message = capsys.readouterr().out
    assert "train.init_from.unet=" in message
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tumorseg").experiment_id])
    assert run.data.tags["task"] == "pretrain" and run.data.tags["data_source"] == "synthetic"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)]
    assert len(losses) == 4 and min(losses[1:]) < 0.8 * losses[0]  # it learns to restore the images
    assert run.data.metrics["best_val_loss"] == pytest.approx(min(losses), rel=1e-6)

    model = build_model("unet", (64, 64, 1), **TINY_UNET_PARAMS)  # segmentation at another size
    load_initial_weights(model, out, key="train.init_from.unet")
    pretrained = keras.models.load_model(out)
    assert getattr(pretrained, "optimizer", None) is None  # published without the optimizer state
    kernels = [(a, b) for a, b in zip(model.weights, pretrained.weights) if a.path.endswith("kernel")]
    assert kernels and all(np.array_equal(a.numpy(), b.numpy()) for a, b in kernels)
    assert not list(out.parent.glob(".*"))  # no temporary checkpoint left behind
