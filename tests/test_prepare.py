"""The prepare stage: every pair check with a deliberately bad file, resizing, splitting, output."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from helpers import blob_pair, shared_dataset, write_pair
from tumorseg.cli import main as cli_main
from tumorseg.data.prepare import (
    NoValidPairs,
    PrepareError,
    assign_splits,
    binarise_mask,
    group_ids,
    prepare_dataset,
    to_gray_uint8,
)


def run(root: Path, out: Path, **kwargs):
    options = dict(size=32, workers=1, progress=False, val_fraction=0.2, test_fraction=0.2, group_by="none")
    options.update(kwargs)
    return prepare_dataset(root / "images", root / "masks", out, **options)


def skipped_reasons(out: Path) -> dict[str, str]:
    report = json.loads((out / "report.json").read_text())
    return {Path(item["file"]).stem: item["reason"] for item in report["skipped"]}


def all_output_names(out: Path) -> list[str]:
    return sorted(p.name for split in ("train", "val", "test") for p in (out / split / "images").iterdir())


@pytest.mark.parametrize(
    "breakage, expected_reason",
    [
        ("orphan_image", "orphan_image"),
        ("orphan_mask", "orphan_mask"),
        ("zero_byte_image", "empty_file"),
        ("zero_byte_mask", "empty_file"),
        ("random_bytes", "unreadable"),
        ("truncated_png", "unreadable"),
        ("size_mismatch", "size_mismatch"),
        ("empty_mask", "empty_mask"),
        ("duplicate", "duplicate_image"),
        ("ambiguous", "ambiguous_name"),
    ],
)
def test_each_bad_pair_is_skipped_with_its_reason(pair_folder: Path, tmp_path: Path, breakage: str, expected_reason: str):
    images, masks = pair_folder / "images", pair_folder / "masks"
    bad = "7.png"
    if breakage == "orphan_image":
        (masks / bad).unlink()
    elif breakage == "orphan_mask":
        (images / bad).unlink()
    elif breakage == "zero_byte_image":
        (images / bad).write_bytes(b"")
    elif breakage == "zero_byte_mask":
        (masks / bad).write_bytes(b"")
    elif breakage == "random_bytes":
        (images / bad).write_bytes(np.random.default_rng(0).bytes(500))
    elif breakage == "truncated_png":
        data = (images / bad).read_bytes()
        (images / bad).write_bytes(data[: len(data) // 2])
    elif breakage == "size_mismatch":
        cv2.imwrite(str(masks / bad), np.zeros((48, 64), np.uint8) + 255)
    elif breakage == "empty_mask":
        cv2.imwrite(str(masks / bad), np.zeros((64, 64), np.uint8))
    elif breakage == "duplicate":
        (images / bad).write_bytes((images / "3.png").read_bytes())
    elif breakage == "ambiguous":
        cv2.imwrite(str(images / "7.jpg"), blob_pair(64, 99)[0])

    out = tmp_path / "out"
    report = run(pair_folder, out)

    assert skipped_reasons(out) == {"7": expected_reason}
    assert report.skipped_by_reason == {expected_reason: 1}
    assert report.valid_pairs == 39
    assert bad not in all_output_names(out)
    assert len(all_output_names(out)) == 39


def test_fail_mode_stops_at_the_first_bad_pair_naming_it(pair_folder: Path, tmp_path: Path):
    (pair_folder / "images" / "12.png").write_bytes(b"not an image")
    with pytest.raises(PrepareError, match=r"12\.png.*unreadable"):
        run(pair_folder, tmp_path / "out", on_error="fail")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_no_valid_pairs_exits_2_with_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the CLI uses the documented defaults
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "a.png").write_bytes(b"garbage")
    (root / "masks" / "a.png").write_bytes(b"garbage")
    with pytest.raises(NoValidPairs):
        run(root, tmp_path / "out")
    code = cli_main(["prepare", "--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no valid image/mask pairs" in err and "Traceback" not in err


def test_masks_stay_binary_after_resize_and_non_binary_masks_are_binarised(tmp_path: Path):
    root = tmp_path / "pairs"
    for index in range(1, 11):
        image, mask = blob_pair(100, index)
        if index % 2:  # anti-aliased soft mask with intermediate values
            mask = cv2.GaussianBlur(mask, (7, 7), 2)
        write_pair(root, f"{index}.png", image, mask)
    out = tmp_path / "out"
    report = run(root, out, size=64)
    assert report.valid_pairs == 10
    assert report.masks_binarised == 5
    for split in ("train", "val", "test"):
        for path in (out / split / "masks").iterdir():
            mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 64)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            image = cv2.imread(str(out / split / "images" / path.name), cv2.IMREAD_UNCHANGED)
            assert image.shape == (64, 64) and image.dtype == np.uint8


def test_resized_mask_matches_resized_image_content(tmp_path: Path):
    """Nearest-neighbour mask and area-resized image still line up: the bright disc is the tumour."""
    root = tmp_path / "pairs"
    image, mask = blob_pair(256, 3, radius=40)
    write_pair(root, "1.png", image, mask)
    out = tmp_path / "out"
    run(root, out, size=64, val_fraction=0.0, test_fraction=0.0)
    small_image = cv2.imread(str(out / "train" / "images" / "1.png"), cv2.IMREAD_GRAYSCALE)
    small_mask = cv2.imread(str(out / "train" / "masks" / "1.png"), cv2.IMREAD_GRAYSCALE)
    inside = small_image[small_mask > 0]
    assert inside.mean() > 180
    assert small_image[small_mask == 0].mean() < 90


def test_colour_rgba_and_16bit_inputs_are_accepted(tmp_path: Path):
    root = tmp_path / "pairs"
    image, mask = blob_pair(64, 1)
    write_pair(root, "1.png", cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), mask)
    write_pair(root, "2.png", cv2.cvtColor(blob_pair(64, 2)[0], cv2.COLOR_GRAY2BGRA), blob_pair(64, 2)[1])
    image16 = blob_pair(64, 3)[0].astype(np.uint16) * 257
    write_pair(root, "3.png", image16, blob_pair(64, 3)[1])
    write_pair(root, "4.png", blob_pair(64, 4)[0], (blob_pair(64, 4)[1] > 0).astype(np.uint8))  # 0/1 mask
    report = run(root, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert report.valid_pairs == 4
    assert report.skipped == []
    assert report.masks_binarised == 1


def test_gray_conversion_and_binarise_helpers():
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 2] = 255  # pure red, alpha 0 must not matter
    assert to_gray_uint8(bgra).shape == (2, 2)
    assert to_gray_uint8(np.array([[0, 1000], [2000, 4000]], np.uint16)).tolist() == [[0, 64], [128, 255]]
    mask, changed = binarise_mask(np.array([[0, 100], [200, 255]], np.uint8), 127)
    assert changed and mask.tolist() == [[0, 0], [255, 255]]
    mask, changed = binarise_mask(np.array([[0, 255]], np.uint8), 127)
    assert not changed and mask.tolist() == [[0, 255]]


def test_mask_suffix_pairs_by_stem(tmp_path: Path):
    root = tmp_path / "pairs"
    for index in range(1, 6):
        image, mask = blob_pair(64, index)
        write_pair(root, f"{index}.png", image, mask)
        (root / "masks" / f"{index}.png").rename(root / "masks" / f"{index}_mask.png")
    report = run(root, tmp_path / "out", mask_suffix="_mask", val_fraction=0.0, test_fraction=0.0)
    assert report.valid_pairs == 5


def test_block_grouping_keeps_neighbouring_numbers_together():
    names = [str(i) for i in range(1, 101)]
    groups = group_ids(names, "block:20")
    assert groups[0] == groups[19] != groups[20]
    assert len(set(groups)) == 5
    assert group_ids(["p07_slice3", "p07_slice4", "p09_slice1"], r"regex:p(\d+)_") == ["id:07", "id:07", "id:09"]


def test_split_has_no_group_or_duplicate_leakage_and_is_seeded(tmp_path: Path):
    root = tmp_path / "pairs"
    for index in range(1, 201):
        write_pair(root, f"{index}.png", *blob_pair(48, index))
    for copy in (150, 151):  # exact duplicates of 5.png far away in the numbering
        (root / "images" / f"{copy}.png").write_bytes((root / "images" / "5.png").read_bytes())
    out = tmp_path / "out"
    report = run(root, out, size=32, group_by="block:20", val_fraction=0.15, test_fraction=0.15, workers=2)
    manifest = pd.read_csv(out / "manifest.csv")
    assert report.valid_pairs == 198 == len(manifest)
    assert manifest.groupby("group")["split"].nunique().max() == 1, "a group appears in two splits"
    assert manifest["sha256"].is_unique
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert report.groups == {"train": 7, "val": 1, "test": 2}  # 10 blocks: round(1.5), round(8 * 0.15 / 0.85)
    # same seed -> same split; another seed -> another split
    ids, fractions = manifest["id"].astype(str).tolist(), manifest["area_fraction"].tolist()
    again = assign_splits(ids, fractions, group_by="block:20", n_strata=3, val_fraction=0.15, test_fraction=0.15, seed=42)
    assert again[0] == manifest["split"].tolist()
    other = assign_splits(ids, fractions, group_by="block:20", n_strata=3, val_fraction=0.15, test_fraction=0.15, seed=7)
    assert other[0] != again[0]


def test_split_is_stratified_by_tumour_size():
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(1, 601)]
    areas = rng.lognormal(-4.5, 0.8, 600).tolist()
    splits, _ = assign_splits(names, areas, group_by="none", n_strata=3, val_fraction=0.2, test_fraction=0.2, seed=1)
    frame = pd.DataFrame({"split": splits, "area": areas})
    frame["tercile"] = pd.qcut(frame["area"], 3, labels=False)
    shares = frame.groupby("split")["tercile"].value_counts(normalize=True).unstack()
    assert (shares.sub(1 / 3).abs() < 0.03).all().all(), shares


def test_parallel_and_serial_outputs_are_identical(tmp_path: Path):
    root = tmp_path / "pairs"
    for index in range(1, 81):
        write_pair(root, f"{index}.png", *blob_pair(48, index))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run(root, serial, workers=1)
    run(root, parallel, workers=2)
    assert (serial / "report.json").read_text() == (parallel / "report.json").read_text()
    assert (serial / "manifest.csv").read_text() == (parallel / "manifest.csv").read_text()
    for name in all_output_names(serial):
        split = pd.read_csv(serial / "manifest.csv").set_index("id").loc[int(name[:-4]), "split"]
        assert (serial / split / "masks" / name).read_bytes() == (parallel / split / "masks" / name).read_bytes()


def test_failed_run_leaves_previous_output_and_inputs_untouched(pair_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    run(pair_folder, out)
    before = (out / "manifest.csv").read_text()
    inputs_before = {p: p.read_bytes() for p in pair_folder.rglob("*.png")}
    (pair_folder / "images" / "3.png").write_bytes(b"broken")
    inputs_before[pair_folder / "images" / "3.png"] = b"broken"
    with pytest.raises(PrepareError):
        run(pair_folder, out, on_error="fail")
    assert (out / "manifest.csv").read_text() == before
    assert {p: p.read_bytes() for p in pair_folder.rglob("*.png")} == inputs_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"


def test_unwritable_output_gives_a_clear_error(pair_folder: Path, tmp_path: Path, capsys, monkeypatch):
    """An output folder that cannot be created (its parent is a file; or read-only for non-root)."""
    import os

    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    targets = [blocker / "out"]
    locked = tmp_path / "locked"
    if os.geteuid() != 0:  # root ignores directory permissions
        locked.mkdir()
        locked.chmod(0o500)
        targets.append(locked / "out")
    try:
        for target in targets:
            code = cli_main(["prepare", "--images", str(pair_folder / "images"), "--masks", str(pair_folder / "masks"), "--out", str(target)])
            err = capsys.readouterr().err
            assert code == 1
            assert "cannot write" in err and str(target) in err and "Traceback" not in err
    finally:
        if locked.exists():
            locked.chmod(0o700)
    assert len(list((pair_folder / "images").iterdir())) == 40


def test_report_and_manifest_have_the_documented_fields(pair_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    run(pair_folder, out)
    report = json.loads((out / "report.json").read_text())
    assert {"valid_pairs", "skipped", "skipped_by_reason", "masks_binarised", "splits", "groups"} <= report.keys()
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns[:7]) == ["id", "split", "group", "image_path", "mask_path", "sha256", "area_fraction"]
    assert manifest["area_fraction"].between(0, 1).all()


@pytest.mark.shared
def test_prepare_on_the_real_512_sample(tmp_path: Path):
    root = shared_dataset("figshare-512-sample")
    out = tmp_path / "out"
    report = prepare_dataset(root / "images", root / "masks", out, size=256, group_by="block:20", workers=2, progress=False)
    assert report.valid_pairs >= 190, report.skipped_by_reason
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest.groupby("group")["split"].nunique().max() == 1
    assert (manifest["original_height"] >= 256).all()
    sample = manifest.iloc[0]
    mask = cv2.imread(str(out / sample["split"] / "masks" / f"{sample['id']}.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (256, 256) and set(np.unique(mask).tolist()) == {0, 255}
    # tumour area fraction survives the 512 -> 256 resize within a few percent
    assert abs(np.count_nonzero(mask) / mask.size - sample["area_fraction"]) < 0.2 * sample["area_fraction"] + 1e-3


def test_blank_images_are_not_duplicates_but_identical_content_is(tmp_path: Path):
    """A blank slice (a sequence outside the scanned range) carries nothing that could leak between
    splits: two of them are both kept, while two copies of a real image are one image."""
    root = tmp_path / "raw"
    for index in range(8):
        write_pair(root, f"{index}.png", *blob_pair(32, index))
    image, mask = blob_pair(32, 0)
    write_pair(root, "copy.png", image, mask)  # same pixels as 0.png
    blank = np.zeros((32, 32), np.uint8)
    write_pair(root, "blank_a.png", blank, mask)
    write_pair(root, "blank_b.png", blank, mask)
    report = run(root, tmp_path / "out", empty_masks="keep")
    assert skipped_reasons(tmp_path / "out") == {"copy": "duplicate_image"}
    assert report.valid_pairs == 10
