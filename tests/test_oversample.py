"""Class-aware sampling (``train.oversample``): which training pairs are drawn more often, that an
epoch then holds each of them ``repeats`` times in a seeded order a resume reproduces, and that
the tumour types come from the data's labels.csv through prepare's manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from helpers import PROJECT_ROOT, blob_at, train_tiny_unet, write_pair
from tumorseg.config import ConfigError, OversampleConfig, config_from_dict, load_config
from tumorseg.data.pairs import check_oversample_types, make_dataset, oversample_repeats, read_tumour_types

CFG = load_config(PROJECT_ROOT / "params.yaml")


def _masks(areas: list[int], size: int = 10) -> np.ndarray:
    """(N, size, size, 1) masks with the first ``area`` pixels set."""
    masks = np.zeros((len(areas), size * size), np.uint8)
    for row, area in zip(masks, areas):
        row[:area] = 1
    return masks.reshape(len(areas), size, size, 1)


def test_repeats_choose_the_named_type_and_the_smallest_third_of_tumours():
    names = [f"{i}.png" for i in range(7)]
    masks = _masks([0, 3, 6, 9, 12, 15, 18])  # slice 0 has no tumour; tumour areas 3 ... 18
    types = {"0": "glioma", "1": "meningioma", "2": "pituitary", "3": "glioma", "4": "meningioma", "5": "glioma", "6": "pituitary"}

    by_type = oversample_repeats(names, masks, OversampleConfig(tumour_type="glioma", repeats=3), types)
    assert by_type.tolist() == [3, 1, 1, 3, 1, 3, 1]
    # the smallest third of the six tumours (areas 3 and 6, evaluation's tercile cut); the empty slice is no tumour
    small = oversample_repeats(names, masks, OversampleConfig(small_tumours=True), types)
    assert small.tolist() == [1, 2, 2, 1, 1, 1, 1]
    both = oversample_repeats(names, masks, OversampleConfig(tumour_type="glioma", small_tumours=True), types)
    assert both.tolist() == [2, 2, 2, 2, 1, 2, 1]  # a pair chosen twice is still drawn `repeats` times

    assert not OversampleConfig().active and not OversampleConfig(tumour_type="glioma", repeats=1).active
    assert OversampleConfig(small_tumours=True).active


def test_a_type_no_training_pair_has_is_named_in_one_line():
    with pytest.raises(ValueError, match=r"train\.oversample\.tumour_type=glioma: the prepared data has no tumour types .*labels\.csv"):
        check_oversample_types(OversampleConfig(tumour_type="glioma"), {})
    with pytest.raises(ValueError, match=r"train\.oversample\.tumour_type=gliomas: no training pair has that type \(types: glioma, meningioma\)"):
        check_oversample_types(OversampleConfig(tumour_type="gliomas"), {"1": "glioma", "2": "meningioma"})
    check_oversample_types(OversampleConfig(), {})  # off: nothing to check
    with pytest.raises(ValueError, match="no training pair has that type"):  # types of other splits do not count
        oversample_repeats(["1.png"], _masks([4]), OversampleConfig(tumour_type="glioma"), {"2": "glioma", "1": "pituitary"})
    raw = CFG.model_dump(mode="json")
    raw["train"]["oversample"]["repeats"] = 0
    with pytest.raises(ConfigError, match=r"train\.oversample\.repeats"):
        config_from_dict(raw)


def _epochs(images: np.ndarray, repeats: np.ndarray | None, epochs: tuple[int, int], augment=None) -> list[np.ndarray]:
    """The images each epoch of ``make_dataset`` draws, in order (batch 4, shuffled, seed 5)."""
    dataset = make_dataset(images, np.zeros_like(images[..., :1]), batch_size=4, shuffle=True, seed=5, epochs=epochs, repeats=repeats, augment=augment)
    drawn = np.concatenate([x.numpy() for x, _ in dataset])
    per_epoch = len(drawn) // (epochs[1] - epochs[0])
    return [drawn[i : i + per_epoch] for i in range(0, len(drawn), per_epoch)]


def test_an_epoch_draws_each_pair_its_repeats_in_a_seeded_order_a_resume_reproduces():
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1) * np.ones((1, 4, 4, 1), np.uint8)  # pair i is all i
    repeats = np.array([1, 3, 1, 2, 1, 1])
    first, second = _epochs(images, repeats, (0, 2))
    for epoch in (first, second):
        drawn = epoch[:, 0, 0, 0].astype(int)
        assert len(drawn) == 9 and np.bincount(drawn, minlength=6).tolist() == repeats.tolist()
    assert not np.array_equal(first, second)  # a new order every epoch
    assert np.array_equal(_epochs(images, repeats, (1, 2))[0], second)  # resumed at epoch 1: the same batches
    # without repeats (or all ones) the order is the one plain training always had
    assert np.array_equal(_epochs(images, np.ones(6, np.int64), (0, 1))[0], _epochs(images, None, (0, 1))[0])
    with pytest.raises(ValueError, match="repeats has 2 counts for 6 pairs"):
        make_dataset(images, images, batch_size=4, shuffle=True, seed=0, repeats=np.array([1, 2]))


def test_each_draw_of_a_repeated_pair_is_augmented_anew():
    from tumorseg.data.augment import build_augmentation

    image, _ = blob_at(32, (10, 12), 5)
    images = np.stack([image, np.zeros_like(image)])[..., None]
    always = CFG.augment.model_copy(update={"noise": CFG.augment.noise.model_copy(update={"p": 1.0})})  # every draw changes
    (epoch,) = _epochs(images, np.array([4, 1]), (0, 1), augment=build_augmentation(always, seed=0))
    copies = [x for x in epoch if x.max() > 100]  # the blob image, four times
    assert len(copies) == 4
    assert len({x.tobytes() for x in copies}) == 4


def test_prepare_copies_the_sources_tumour_types_into_the_manifest(pair_folder: Path, tmp_path: Path):
    import pandas as pd

    from tumorseg.pipeline.download import download_step
    from tumorseg.pipeline.prepare import prepare_from_raw

    types = {index: ("glioma" if index % 2 else "meningioma") for index in range(1, 40)}  # 40.png has no label
    (pair_folder / "labels.csv").write_text("file,tumour_type\n" + "".join(f"{i}.png,{t}\n" for i, t in types.items()))
    raw = tmp_path / "raw"
    cfg = CFG.model_copy(update={
        "image_size": 32,
        "data": CFG.data.model_copy(update={"source": "local", "local_path": str(pair_folder)}),
        "prepare": CFG.prepare.model_copy(update={"group_by": "none", "workers": 1}),
    })  # fmt: skip
    download_step(cfg, raw, progress=False)  # the download stage brings labels.csv along
    prepare_from_raw(cfg, raw, tmp_path / "prepared", progress=False)

    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv", dtype=str, keep_default_na=False)
    assert all(row.tumour_type == types.get(int(row.id), "") for row in manifest.itertuples())
    train = read_tumour_types(tmp_path / "prepared")
    assert train == {row.id: row.tumour_type for row in manifest.itertuples() if row.split == "train" and row.tumour_type}
    assert read_tumour_types(tmp_path / "prepared", "test").keys() == set(manifest.loc[(manifest.split == "test") & (manifest.tumour_type != ""), "id"])

    (raw / "labels.csv").unlink()  # a source without labels: no column, no types
    prepare_from_raw(cfg, raw, tmp_path / "plain", progress=False)
    assert "tumour_type" not in pd.read_csv(tmp_path / "plain" / "manifest.csv").columns
    assert read_tumour_types(tmp_path / "plain") == {}


def test_the_train_stage_refuses_an_unknown_type_before_a_run_opens(tmp_path: Path, monkeypatch):
    from tumorseg import tracking
    from tumorseg.pipeline.train import train_step

    opened = []
    monkeypatch.setattr(tracking, "run", lambda *a, **k: opened.append(a))
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.csv").write_text("id,split,tumour_type\n1,train,glioma\n2,val,meningioma\n")
    over = CFG.train.oversample.model_copy(update={"tumour_type": "meningioma"})
    cfg = CFG.model_copy(update={"train": CFG.train.model_copy(update={"oversample": over})})
    with pytest.raises(ValueError, match=r"tumour_type=meningioma: no training pair has that type \(types: glioma\)"):
        train_step(cfg, "unet", prepared_dir=tmp_path / "prepared", augmented_dir=tmp_path,
                   models_dir=tmp_path / "m", metrics_dir=tmp_path / "x", params_path=tmp_path / "p")  # fmt: skip
    assert not opened and not (tmp_path / "m").exists()


@pytest.mark.slow  # trains a tiny U-Net three times (4 epochs in all)
def test_oversampled_training_draws_more_per_epoch_and_resumes_identically(tmp_path: Path, caplog):
    import keras

    import tumorseg.models  # noqa: F401

    prepared = tmp_path / "prepared"
    for index in range(12):
        write_pair(prepared / "train", f"{index}.png", *blob_at(32, (10 + index, 14), 3 if index < 4 else 7, seed=index))
    for index in range(4):
        write_pair(prepared / "val", f"v{index}.png", *blob_at(32, (16, 12 + index), 5, seed=50 + index))
    over = CFG.train.oversample.model_copy(update={"small_tumours": True, "repeats": 3})
    with caplog.at_level(logging.INFO, logger="tumorseg.training"):
        train_tiny_unet(prepared, tmp_path / "whole", 2, oversample=over, deterministic=True, online_augment=True)
    assert "oversampling 4 of 12 training pairs (smallest-third tumours) 3x: 20 draws per epoch" in caplog.text

    train_tiny_unet(prepared, tmp_path / "resumed", 1, oversample=over, deterministic=True, online_augment=True)
    train_tiny_unet(prepared, tmp_path / "resumed", 2, oversample=over, deterministic=True, online_augment=True)
    weights = [keras.models.load_model(tmp_path / run / "unet.keras", compile=False).get_weights() for run in ("whole", "resumed")]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
