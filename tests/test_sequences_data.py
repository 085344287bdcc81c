"""Multi-sequence MRI and NIfTI, the data side (issue 22): sequence names in the config, NIfTI
volumes in and segmentations out, the three raw layouts (folders, Kaggle LGG, NIfTI), per-sequence
prepare with skip/fill, N-channel pairs, sequence dropout and aligned augmentation; and, when
../shared is there, the real LGG data."""

from __future__ import annotations

import csv
import gzip
import json
import time
from collections import Counter
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from helpers import blob_pair, shared_dataset, write_pair
from tumorseg.config import AugmentConfig, DataConfig, PrepareConfig, TrainConfig
from tumorseg.data.layouts import detect_layout, import_dataset
from tumorseg.data.pairs import drop_sequences, load_pairs, make_dataset
from tumorseg.data.prepare import MISSING_SEQUENCE, SIZE_MISMATCH, prepare_dataset
from tumorseg.data.sources import download, read_source_info, write_synthetic_source
from tumorseg.data.synthetic import write_sequence_dataset, write_sequence_volumes
from tumorseg.errors import InputImageError, SourceError, VolumeError
from tumorseg.volumes import is_nifti, load_volume, segmentation_to_mask, split_nifti_name, window_to_uint8, write_segmentation

SEQS = ("t1", "flair", "t1ce")
CASE_REGEX = r"regex:^(case\d+)_"
DOWNLOAD = dict(
    kaggle_dataset="unused/unused",
    network_timeout_s=1.0,
    image_dir="images",
    mask_dir="masks",
    mask_suffix="",
    synthetic_count=8,
    synthetic_size=32,
    seed=0,
    progress=False,
)


def gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"cannot read {path}"
    return image


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.png")} if folder.is_dir() else set()


def prepare_seqs(raw: Path, out: Path, sequences=SEQS, **kwargs):
    options = dict(size=32, group_by=CASE_REGEX, empty_masks="keep", workers=1, progress=False, seed=0) | kwargs
    return prepare_dataset({seq: raw / seq for seq in sequences}, raw / "masks", out, **options)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sequences, complaint",
    [
        (["T1"], "folder names"),
        (["1t"], "folder names"),
        (["t1__x"], "folder names"),
        (["t1-ce"], "folder names"),
        (["masks"], "folder names"),
        (["images"], "folder names"),
        (["t1", 2], "folder names"),
        (["t1", "flair", "t1"], "listed twice"),
        ([f"s{i}" for i in range(9)], "at most 8"),
    ],
)
def test_bad_sequence_names_are_refused(sequences, complaint):
    with pytest.raises(ValidationError, match=complaint):
        DataConfig(sequences=sequences)


def test_sequences_accept_lists_and_define_the_channels():
    cfg = DataConfig(sequences=["t1", "flair", "t1_ce2"])
    assert cfg.sequences == ("t1", "flair", "t1_ce2")
    assert cfg.channels == ("t1", "flair", "t1_ce2")
    assert DataConfig().sequences == () and DataConfig().channels == ("images",)
    assert DataConfig(sequences=[f"s{i}" for i in range(8)]).channels[-1] == "s7"
    assert DataConfig(layout="nifti").layout == "nifti"
    with pytest.raises(ValidationError):
        DataConfig(layout="dicom")
    assert PrepareConfig(missing_sequences="fill").missing_sequences == "fill"
    with pytest.raises(ValidationError):
        PrepareConfig(missing_sequences="guess")
    assert TrainConfig(sequence_dropout=0.25).sequence_dropout == 0.25
    with pytest.raises(ValidationError):
        TrainConfig(sequence_dropout=1.5)


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------

# Voxel axis i runs anterior (2 mm), j inferior (3 mm), k to the patient's left (1.5 mm): every
# axis permuted or flipped relative to the slice order (rows P, columns L, slices S).
TURNED_AFFINE = np.array([[0.0, 0.0, -1.5, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, -3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


def turned_volume(tmp_path: Path, name: str = "vol_t1.nii.gz") -> tuple[Path, np.ndarray]:
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, TURNED_AFFINE), str(path))
    return path, data


def test_load_volume_turns_by_axes_and_flips_only(tmp_path: Path):
    path, data = turned_volume(tmp_path)
    volume = load_volume(path)
    assert volume.slices.shape == (5, 7, 6) and volume.slice_count == 6
    # rows = posterior = i reversed; columns = left = k; slices = superior = j reversed
    expected = data[::-1, :, :][:, ::-1, :].transpose(0, 2, 1)
    np.testing.assert_array_equal(volume.slices, expected)
    assert volume.slices.dtype == np.int16


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_segmentation_is_written_back_on_the_input_grid(tmp_path: Path, suffix: str):
    path, data = turned_volume(tmp_path)
    labels = (data % 3 == 0).astype(np.uint8)  # on the file's grid
    volume = load_volume(path)
    # the same labels as a model would give them: in slice order, {0, 255}
    in_slices = np.where(labels[::-1, :, :][:, ::-1, :].transpose(0, 2, 1) > 0, 255, 0).astype(np.uint8)
    out = write_segmentation(tmp_path / f"vol_seg{suffix}", in_slices, volume)
    written = nib.load(str(out))
    assert written.shape == data.shape
    np.testing.assert_allclose(written.affine, TURNED_AFFINE)
    voxels = np.asanyarray(written.dataobj)
    assert voxels.dtype == np.uint8
    np.testing.assert_array_equal(voxels, labels)
    # and read back through load_volume it lies on the input's slices
    np.testing.assert_array_equal(load_volume(out).slices > 0, in_slices > 0)


def test_segmentation_shape_must_match_the_volume(tmp_path: Path):
    path, _ = turned_volume(tmp_path)
    volume = load_volume(path)
    with pytest.raises(ValueError, match="does not match"):
        write_segmentation(tmp_path / "bad_seg.nii.gz", np.zeros((5, 6, 7), np.uint8), volume)


def test_gzipped_segmentation_is_deterministic(tmp_path: Path):
    path, data = turned_volume(tmp_path)
    volume = load_volume(path)
    mask = (volume.slices > 100).astype(np.uint8)
    first = write_segmentation(tmp_path / "a_seg.nii.gz", mask, volume).read_bytes()
    time.sleep(1.1)  # a gzip header with a timestamp would differ now
    second = write_segmentation(tmp_path / "b_seg.nii.gz", mask, volume).read_bytes()
    assert first[:2] == b"\x1f\x8b" and first == second
    assert gzip.decompress(first)[344:348] == b"n+1\x00"  # a single-file NIfTI-1 inside


def test_bad_volumes_raise_volume_error_naming_the_file(tmp_path: Path):
    flat = tmp_path / "flat_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(flat))
    with pytest.raises(VolumeError, match=r"flat_t1\.nii\.gz.*3-D"):
        load_volume(flat)
    corrupt = tmp_path / "broken_flair.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI volume at all" * 20)
    with pytest.raises(VolumeError, match=r"broken_flair\.nii\.gz") as caught:
        load_volume(corrupt)
    assert isinstance(caught.value, InputImageError)
    truncated = tmp_path / "cut_t1.nii.gz"
    good, _ = turned_volume(tmp_path, "whole_t1.nii.gz")
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(VolumeError, match=r"cut_t1\.nii\.gz"):
        load_volume(truncated)
    with pytest.raises(VolumeError, match="no such file"):
        load_volume(tmp_path / "absent_t1.nii.gz")
    four = tmp_path / "four_t1.nii.gz"  # a 4-D file with one volume is fine
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3, 1), np.float32), np.eye(4)), str(four))
    assert load_volume(four).slices.shape[2] == 3


def test_names_windows_and_labels():
    assert split_nifti_name("/x/BraTS_001_FLAIR.nii.gz") == ("BraTS_001", "flair")
    assert split_nifti_name("case7_seg.nii") == ("case7", "seg")
    assert split_nifti_name("noseparator.nii.gz") is None
    assert is_nifti("a/B.NII.GZ") and is_nifti("b.nii") and not is_nifti("c.png")
    voxels = np.zeros((4, 4, 2), np.float32)
    voxels[1:3, 1:3, 0] = np.array([[100.0, 200.0], [300.0, 400.0]])
    windowed = window_to_uint8(voxels)
    assert windowed.dtype == np.uint8 and windowed[0, 0, 0] == 0 and not windowed[..., 1].any()
    assert windowed[1, 1, 0] < windowed[2, 2, 0] and windowed[2, 2, 0] == 255
    assert not window_to_uint8(np.zeros((3, 3, 3))).any()
    labels = np.array([0, 1, 2, 4], np.int16).reshape(1, 2, 2)
    np.testing.assert_array_equal(segmentation_to_mask(labels), np.array([0, 255, 255, 255]).reshape(1, 2, 2))


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def test_folders_layout_strips_the_mask_suffix(tmp_path: Path):
    root = tmp_path / "src" / "nested"
    for index in range(3):
        image, mask = blob_pair(32, index)
        for seq, folder in (("t1", "T1"), ("flair", "FLAIR")):
            if seq == "flair" and index == 2:
                continue  # slice 2 lacks FLAIR
            (root / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / folder / f"p1_{index}.png"), image + (10 if seq == "flair" else 0))
        (root / "labels").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "labels" / f"p1_{index}_mask.png"), mask)
    staging = tmp_path / "staging"
    used = import_dataset("auto", tmp_path / "src", staging, ("t1", "flair"), mask_dir="labels", mask_suffix="_mask", progress=False)
    assert used == "folders"
    assert stems(staging / "masks") == stems(staging / "t1") == {"p1_0", "p1_1", "p1_2"}
    assert stems(staging / "flair") == {"p1_0", "p1_1"}
    np.testing.assert_array_equal(gray(staging / "flair" / "p1_1.png"), gray(root / "FLAIR" / "p1_1.png"))
    np.testing.assert_array_equal(gray(staging / "masks" / "p1_2.png"), gray(root / "labels" / "p1_2_mask.png"))
    with pytest.raises(SourceError, match="'t1ce'"):
        import_dataset("folders", tmp_path / "src", tmp_path / "s2", ("t1", "t1ce"), mask_dir="labels", mask_suffix="_mask", progress=False)


def test_detect_layout(tmp_path: Path):
    folders = tmp_path / "folders"
    for name in ("T1", "flair", "masks"):
        (folders / "d" / name).mkdir(parents=True)
    assert detect_layout(folders, ("t1", "flair"), "masks") == "folders"
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    (nifti / "case1_t1.nii.gz").write_bytes(b"")
    assert detect_layout(nifti, ("t1",), "masks") == "nifti"
    kaggle = tmp_path / "kaggle" / "kaggle_3m" / "c1"
    kaggle.mkdir(parents=True)
    (kaggle / "c1_1_mask.tif").write_bytes(b"")
    assert detect_layout(tmp_path / "kaggle", SEQS, "masks") == "kaggle_lgg"
    # a folder per sequence but no mask folder is none of them
    with pytest.raises(SourceError, match="no multi-sequence layout.*t1, flair and masks"):
        detect_layout(folders / "d" / "T1", ("t1", "flair"), "masks")
    hidden = tmp_path / "hidden"
    for name in ("t1", "masks"):
        (hidden / ".cache" / name).mkdir(parents=True)
    with pytest.raises(SourceError):
        detect_layout(hidden, ("t1",), "masks")
    with pytest.raises(SourceError, match="data.layout must be"):
        import_dataset("dicom", folders, tmp_path / "staging", ("t1",), mask_dir="masks", mask_suffix="", progress=False)


def write_kaggle_case(root: Path, case: str, slices: int, t1ce_is_flair: list[bool]) -> None:
    """RGB .tif slices (R = t1, G = flair, B = t1ce, written with PIL, not OpenCV) with distinct
    constant planes per channel and slice, and grayscale masks."""
    folder = root / "kaggle_3m" / case
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, slices + 1):
        rgb = np.zeros((32, 32, 3), np.uint8)
        rgb[..., 0], rgb[..., 1] = 10 + n, 100 + n
        rgb[..., 2] = rgb[..., 1] if t1ce_is_flair[n - 1] else 200 + n
        Image.fromarray(rgb, "RGB").save(folder / f"{case}_{n}.tif")
        mask = np.zeros((32, 32), np.uint8)
        mask[4 : 4 + n, 4:10] = 255
        Image.fromarray(mask, "L").save(folder / f"{case}_{n}_mask.tif")


def test_kaggle_lgg_layout_reads_rgb_order_and_drops_flair_copies(tmp_path: Path):
    root = tmp_path / "download"
    write_kaggle_case(root, "A_0001", 3, [False] * 3)
    write_kaggle_case(root, "B_0002", 3, [True] * 3)  # no t1ce: the file repeats FLAIR on every slice
    write_kaggle_case(root, "C_0003", 2, [True, False])  # equal on one slice only: real data
    staging = tmp_path / "staging"
    assert import_dataset("auto", root, staging, SEQS, mask_dir="masks", mask_suffix="", progress=False) == "kaggle_lgg"
    every = {f"A_0001_{n}" for n in (1, 2, 3)} | {f"B_0002_{n}" for n in (1, 2, 3)} | {"C_0003_1", "C_0003_2"}
    assert stems(staging / "masks") == stems(staging / "t1") == stems(staging / "flair") == every
    assert stems(staging / "t1ce") == every - {f"B_0002_{n}" for n in (1, 2, 3)}
    for n in (1, 2, 3):
        a = f"A_0001_{n}.png"
        assert gray(staging / "t1" / a).ndim == 2
        assert np.all(gray(staging / "t1" / a) == 10 + n)
        assert np.all(gray(staging / "flair" / a) == 100 + n)
        assert np.all(gray(staging / "t1ce" / a) == 200 + n)
        mask = gray(staging / "masks" / a)
        assert mask.shape == (32, 32) and int((mask == 255).sum()) == 6 * n
    assert np.all(gray(staging / "t1ce" / "C_0003_1.png") == 101)
    # a subset, in another order
    subset = tmp_path / "subset"
    import_dataset("kaggle_lgg", root, subset, ("flair", "t1"), mask_dir="masks", mask_suffix="", progress=False)
    assert not (subset / "t1ce").exists() and np.all(gray(subset / "t1" / "B_0002_2.png") == 12)
    with pytest.raises(SourceError, match="t2"):
        import_dataset("kaggle_lgg", root, tmp_path / "t2", ("t1", "t2"), mask_dir="masks", mask_suffix="", progress=False)


def test_nifti_layout_cuts_volumes_into_slices(tmp_path: Path):
    seqs = ("t1", "flair")
    volumes, pngs = tmp_path / "volumes", tmp_path / "pngs"
    cases = write_sequence_volumes(volumes, count=40, size=32, seed=5, sequences=seqs, progress=False)
    write_sequence_dataset(pngs, count=40, size=32, seed=5, sequences=seqs, progress=False)
    assert cases == [f"case{c:03d}" for c in range(1, 6)]
    assert not (volumes / "case005_flair.nii.gz").exists()  # every 5th case lacks the last sequence
    # one hand-made case: slices 0 and 4 blank in every sequence, slice 2 blank in flair only
    t1 = np.zeros((32, 32, 5), np.float32)
    t1[8:24, 8:24, 1:4] = np.linspace(1.0, 50.0, 16 * 16 * 3).reshape(16, 16, 3)
    flair = t1.copy()
    flair[..., 2] = 0
    seg = np.zeros((32, 32, 5), np.int16)
    seg[10:14, 10:14, 2] = 4  # a BraTS label
    for tag, data in (("t1", t1), ("flair", flair), ("seg", seg)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(volumes / f"hand_{tag}.nii.gz"))
    # a case whose volumes disagree in shape is left out
    for tag, shape in (("t1", (32, 32, 4)), ("flair", (32, 32, 5)), ("seg", (32, 32, 4))):
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), str(volumes / f"odd_{tag}.nii.gz"))

    raw = tmp_path / "raw"
    info = download(raw, source="local", local_path=str(volumes), sequences=seqs, layout="auto", **DOWNLOAD)
    phantom = {f"case{c:03d}_{i:03d}" for c in range(1, 6) for i in range(8)}
    hand = {"hand_001", "hand_002", "hand_003"}
    assert stems(raw / "masks") == stems(raw / "t1") == phantom | hand
    assert stems(raw / "flair") == (phantom | hand) - {f"case005_{i:03d}" for i in range(8)}
    assert info.n_images == 43 and info.n_masks == 43 and info.kind == "real"
    for name in stems(raw / "masks"):
        assert set(np.unique(gray(raw / "masks" / f"{name}.png")).tolist()) <= {0, 255}
    assert gray(raw / "masks" / "hand_002.png").max() == 255 and not gray(raw / "masks" / "hand_001.png").any()
    # PHANTOM_AFFINE is already in slice order: the masks are the phantom masks, slice for slice
    for case in (1, 3, 5):
        for index in range(8):
            np.testing.assert_array_equal(gray(raw / "masks" / f"case{case:03d}_{index:03d}.png"), gray(pngs / "masks" / f"case{case:03d}_{index + 1:02d}.png"))
    assert not gray(raw / "masks" / "case002_000.png").any() and gray(raw / "masks" / "case002_003.png").any()


def test_synthetic_source_with_sequences(tmp_path: Path):
    info = write_synthetic_source(tmp_path / "raw", count=40, size=32, seed=2, sequences=("t1", "t2"), progress=False)
    raw = tmp_path / "raw"
    assert info.n_images == 40 and info.n_masks == 40 and info.kind == "synthetic"
    assert len(stems(raw / "t1")) == 40 and len(stems(raw / "t2")) == 32  # case005 has no t2
    assert read_source_info(raw) == info
    # the phantoms depend on the seed and the slice only
    again = write_synthetic_source(tmp_path / "raw2", count=40, size=32, seed=2, sequences=("t1", "t2"), progress=False)
    assert again.data_hash == info.data_hash


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequence_raw(tmp_path_factory) -> Path:
    """5 cases x 8 slices of t1/flair/t1ce phantoms at 32 px; case005 has no t1ce."""
    raw = tmp_path_factory.mktemp("sequence_raw")
    write_sequence_dataset(raw, count=40, size=32, seed=3, sequences=SEQS, progress=False)
    return raw


def test_missing_sequences_skip(sequence_raw: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    report = prepare_seqs(sequence_raw, out, missing_sequences="skip")
    assert report.valid_pairs == 32
    assert report.skipped_by_reason == {MISSING_SEQUENCE: 8}
    assert report.missing_by_case == {"case005": {"t1ce": 8}}
    assert all("t1ce" in s["detail"] for s in report.skipped)
    saved = json.loads((out / "report.json").read_text())
    assert saved["sequences"] == list(SEQS) and saved["missing_sequences"] == "skip"
    assert saved["missing_by_case"] == {"case005": {"t1ce": 8}}
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert {"t1_path", "flair_path", "t1ce_path", "filled"} <= set(manifest.columns)
    assert not manifest["id"].str.startswith("case005").any() and (manifest["filled"] == "").all()
    # all slices of a case in one split
    assert manifest.groupby("group")["split"].nunique().max() == 1 and manifest["group"].nunique() == 4
    for split in ("train", "val", "test"):
        names = stems(out / split / "masks")
        assert all(stems(out / split / seq) == names for seq in SEQS)
        assert names == set(manifest.loc[manifest["split"] == split, "id"])


def test_missing_sequences_fill_writes_zeros(sequence_raw: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    report = prepare_seqs(sequence_raw, out, missing_sequences="fill", size=48)
    assert report.valid_pairs == 40 and report.skipped_by_reason == {}
    assert report.missing_by_case == {"case005": {"t1ce": 8}}
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    filled = manifest[manifest["id"].str.startswith("case005")]
    assert len(filled) == 8 and (filled["filled"] == "t1ce").all() and (filled["t1ce_path"] == "").all()
    assert (filled["t1_path"] != "").all() and (manifest.loc[~manifest.index.isin(filled.index), "filled"] == "").all()
    assert manifest.groupby("group")["split"].nunique().max() == 1
    split_of = dict(zip(manifest["id"], manifest["split"]))
    for name, split in split_of.items():
        t1ce = gray(out / split / "t1ce" / f"{name}.png")
        assert t1ce.shape == (48, 48)
        assert (not t1ce.any()) == name.startswith("case005"), name
        assert gray(out / split / "t1" / f"{name}.png").any()
    assert json.loads((out / "report.json").read_text())["missing_sequences"] == "fill"


def test_patient_split_does_not_depend_on_the_sequences_used(tmp_path: Path):
    """A T1-CE-only study must test on the same patients as an all-sequence one (minus those
    without T1-CE): the split is drawn over every slice with a mask, sequences aside."""
    raw = tmp_path / "raw"
    write_sequence_dataset(raw, count=160, size=32, seed=5, sequences=SEQS, progress=False)  # 20 cases; 5, 10, 15, 20 lack t1ce
    options = dict(size=16, val_fraction=0.2, test_fraction=0.2)
    every = prepare_seqs(raw, tmp_path / "all", missing_sequences="fill", **options)
    only = prepare_seqs(raw, tmp_path / "t1ce", sequences=("t1ce",), missing_sequences="skip", **options)
    filled = prepare_seqs(raw, tmp_path / "t1ce-fill", sequences=("t1ce",), missing_sequences="fill", **options)
    assert every.valid_pairs == 160 and only.valid_pairs == filled.valid_pairs == 128
    # nothing to fill a slice from when it has no sequence at all: skipped either way, never an orphan
    assert only.skipped_by_reason == filled.skipped_by_reason == {MISSING_SEQUENCE: 32}
    assert only.missing_by_case == {f"case{c:03d}": {"t1ce": 8} for c in (5, 10, 15, 20)}
    assert all(s["detail"] == "no t1ce file" for s in filled.skipped)
    split_of = {run: pd.read_csv(tmp_path / run / "manifest.csv").set_index("id")["split"] for run in ("all", "t1ce", "t1ce-fill")}
    assert split_of["t1ce"].equals(split_of["all"].loc[split_of["t1ce"].index]) and split_of["t1ce-fill"].equals(split_of["t1ce"])
    lacking = split_of["all"][split_of["all"].index.str.match(r"case0(05|10|15|20)_")]
    assert lacking.nunique() > 1  # the cases without t1ce fall in several splits: dropping them first would move others


def test_size_mismatch_names_the_sequence(sequence_raw: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    for folder in (*SEQS, "masks"):
        (raw / folder).mkdir(parents=True)
        for path in sorted((sequence_raw / folder).glob("case00[12]_*.png")):
            (raw / folder / path.name).write_bytes(path.read_bytes())
    odd = raw / "flair" / "case002_04.png"
    cv2.imwrite(str(odd), cv2.resize(gray(odd), (40, 36)))
    report = prepare_seqs(raw, tmp_path / "out", group_by="none")
    assert report.valid_pairs == 15 and report.skipped_by_reason == {SIZE_MISMATCH: 1}
    (skip,) = report.skipped
    assert skip["reason"] == SIZE_MISMATCH and "flair image is 40x36 but mask is 32x32" in skip["detail"]
    assert report.missing_by_case == {}


def test_missing_sequence_folder_counts_every_slice(sequence_raw: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    for folder in ("t1", "masks"):
        (raw / folder).mkdir(parents=True)
        for path in sorted((sequence_raw / folder).glob("case001_*.png")):
            (raw / folder / path.name).write_bytes(path.read_bytes())
    report = prepare_seqs(raw, tmp_path / "out", sequences=("t1", "t2"), missing_sequences="fill", val_fraction=0.0, test_fraction=0.0)
    assert report.valid_pairs == 8 and report.missing_by_case == {"case001": {"t2": 8}}


def test_single_channel_report_has_no_sequence_keys(tmp_path: Path):
    root = tmp_path / "pairs"
    for index in range(1, 9):
        write_pair(root, f"{index}.png", *blob_pair(32, index))
    out = tmp_path / "out"
    report = prepare_dataset(root / "images", root / "masks", out, size=32, group_by="none", workers=1, progress=False)
    assert report.valid_pairs == 8 and report.sequences == ()
    saved = json.loads((out / "report.json").read_text())
    assert not {"sequences", "missing_sequences", "missing_by_case"} & set(saved)
    manifest = pd.read_csv(out / "manifest.csv")
    assert "filled" not in manifest.columns and not any(c.endswith("_path") and c not in ("image_path", "mask_path") for c in manifest.columns)
    assert (out / "train" / "images").is_dir() and not (out / "train" / "t1").exists()


def test_prepare_stage_uses_the_configured_sequences(tmp_path: Path):
    from helpers import PROJECT_ROOT
    from tumorseg.config import load_config
    from tumorseg.pipeline.prepare import prepare_from_raw

    overrides = {
        "data.sequences": ["t1", "flair"],  # a YAML list
        "data.mask_suffix": "_mask",  # the raw masks are named like their slices whatever this says
        "prepare.missing_sequences": "fill",
        "prepare.group_by": CASE_REGEX,
        "prepare.empty_masks": "keep",
        "prepare.workers": 1,
        "image_size": 32,
    }
    cfg = load_config(PROJECT_ROOT / "params.yaml", overrides=overrides)
    assert cfg.data.sequences == ("t1", "flair") and cfg.data.channels == ("t1", "flair")
    raw = tmp_path / "raw"
    info = download(raw, source="synthetic", local_path=None, sequences=cfg.data.sequences, **(DOWNLOAD | {"synthetic_count": 40}))
    assert info.kind == "synthetic" and "sequences=t1+flair" in info.origin
    report = prepare_from_raw(cfg, raw, tmp_path / "prepared", progress=False)
    assert report.valid_pairs == 40 and report.sequences == ("t1", "flair")
    assert report.missing_by_case == {"case005": {"flair": 8}}
    saved = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert saved["missing_sequences"] == "fill" and saved["data_source"] == "synthetic"
    assert not (tmp_path / "prepared" / "train" / "images").exists() and (tmp_path / "prepared" / "train" / "flair").is_dir()


# --------------------------------------------------------------------------------------------
# pairs and augmentation
# --------------------------------------------------------------------------------------------


def write_split(folder: Path, planes: dict[str, list[np.ndarray]], masks: list[np.ndarray]) -> None:
    for channel, images in {**planes, "masks": masks}.items():
        (folder / channel).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            assert cv2.imwrite(str(folder / channel / f"s{index:02d}.png"), image)


def test_load_pairs_stacks_channels_in_order(tmp_path: Path):
    masks = [blob_pair(32, i)[1] for i in range(3)]
    planes = {seq: [np.full((32, 32), 10 * (k + 1) + i, np.uint8) for i in range(3)] for k, seq in enumerate(SEQS)}
    write_split(tmp_path / "train", planes, masks)
    names, images, loaded_masks = load_pairs(tmp_path / "train", 32, channels=SEQS)
    assert names == ["s00.png", "s01.png", "s02.png"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and loaded_masks.shape == (3, 32, 32, 1)
    assert [int(images[2, 0, 0, c]) for c in range(3)] == [12, 22, 32]
    _, reordered, _ = load_pairs(tmp_path / "train", 32, channels=("t1ce", "t1"))
    assert reordered.shape[-1] == 2 and [int(reordered[0, 5, 5, c]) for c in range(2)] == [30, 10]
    assert set(np.unique(loaded_masks).tolist()) == {0, 1}
    (tmp_path / "train" / "flair" / "s01.png").unlink()
    with pytest.raises(FileNotFoundError, match="s01.png in flair"):
        load_pairs(tmp_path / "train", 32, channels=SEQS)


def test_drop_sequences_blanks_one_by_default():
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1] = 5, 7  # channel 2 is a missing (blank) sequence
    dropped = set()
    for seed in range(60):
        out = drop_sequences(image, np.random.default_rng(seed), 1.0)
        present = [c for c in range(3) if out[..., c].any()]
        assert len(present) == 1, "exactly one of the two non-blank channels is blanked"
        dropped.add({0, 1}.difference(present).pop())
        np.testing.assert_array_equal(out, drop_sequences(image, np.random.default_rng(seed), 1.0))
    assert dropped == {0, 1}
    assert image[..., 0].all() and image[..., 1].all(), "the input is not modified"
    assert drop_sequences(image, np.random.default_rng(0), 0.0) is image
    last = image.copy()
    last[..., 1] = 0
    for seed in range(20):  # the last non-blank channel is never blanked
        np.testing.assert_array_equal(drop_sequences(last, np.random.default_rng(seed), 1.0), last)
    kept = sum(drop_sequences(image, np.random.default_rng(s), 0.3) is image for s in range(400))
    assert 220 < kept < 340  # about 70% untouched


def test_drop_sequences_up_to_most_never_all():
    image = np.full((8, 8, 3), 9, np.uint8)
    counts = Counter()
    for seed in range(300):
        out = drop_sequences(image, np.random.default_rng(seed), 1.0, most=2)
        blanked = [c for c in range(3) if not out[..., c].any()]
        assert 1 <= len(blanked) <= 2  # never every sequence
        counts[tuple(blanked)] += 1
        np.testing.assert_array_equal(out, drop_sequences(image, np.random.default_rng(seed), 1.0, most=2))
    assert set(counts) == {(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)}  # FLAIR alone (1) is among what it teaches
    assert 100 < sum(v for k, v in counts.items() if len(k) == 2) < 200  # one or two: about half each
    two_present = image.copy()
    two_present[..., 2] = 0
    for seed in range(40):  # with two present, at most one can go, whatever `most` says
        out = drop_sequences(two_present, np.random.default_rng(seed), 1.0, most=7)
        assert sum(out[..., c].any() for c in range(3)) == 1
    for seed in range(40):  # most=1 draws exactly what the one-sequence version drew (recorded runs reproduce)
        rng, expected = np.random.default_rng(seed), image.copy()
        if rng.random() < 0.5:
            expected[..., int(rng.integers(3))] = 0
        np.testing.assert_array_equal(drop_sequences(image, np.random.default_rng(seed), 0.5, most=1), expected)


def collect(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_sequence_dropout_batches_are_seeded_and_resume_safe():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (10, 16, 16, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (10, 16, 16, 1), dtype=np.uint8)
    options = dict(batch_size=4, shuffle=True, sequence_dropout=0.5)
    run = collect(make_dataset(images, masks, seed=7, epochs=(0, 2), **options))
    assert len(run) == 6  # 3 batches per epoch
    again = collect(make_dataset(images, masks, seed=7, epochs=(0, 2), **options))
    for (x1, y1), (x2, y2) in zip(run, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    resumed = collect(make_dataset(images, masks, seed=7, epochs=(1, 2), **options))
    for (x1, y1), (x2, y2) in zip(run[3:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    blanked = sum(int((~x.reshape(len(x), -1, 3).any(axis=1)).any(axis=1).sum()) for x, _ in run)
    assert 3 <= blanked <= 17  # about half of 20 slices lost one sequence, never more than one
    assert all((x.reshape(len(x), -1, 3).any(axis=1)).sum(axis=1).min() >= 2 for x, _ in run)
    other = collect(make_dataset(images, masks, seed=8, epochs=(0, 2), **options))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(run, other))
    plain = collect(make_dataset(images, masks, seed=7, epochs=(0, 1), batch_size=4, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in plain]), images.astype(np.float32))


def disc_planes(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    image, mask = blob_pair(size, 0)
    image[:] = 40
    mask[:] = 0
    cv2.circle(mask, (16, 20), 7, 255, -1)  # off-centre: every flip or shift moves it
    image[mask > 0] = 220
    return image, mask


def centroid(plane: np.ndarray, threshold: int = 130) -> np.ndarray:
    ys, xs = np.nonzero(plane > threshold)
    return np.array([ys.mean(), xs.mean()])


def test_augmentation_keeps_sequences_aligned(tmp_path: Path):
    from tumorseg.data.augment import augment_dataset, preview_grid

    image, mask = disc_planes()
    write_split(tmp_path / "train", {seq: [image, image] for seq in SEQS}, [mask, mask])
    # geometric transforms only (and always a horizontal flip): identical planes stay identical
    geometric = AugmentConfig(hflip={"p": 1.0}, brightness_contrast={"p": 0.0, "brightness": 0.1, "contrast": 0.1}, noise={"p": 0.0, "std": 0.03})
    report = augment_dataset(tmp_path / "train", tmp_path / "aug", settings=geometric, copies_per_image=3, seed=1, progress=False, workers=1, channels=SEQS)
    assert report.augmented_pairs == 6
    for name in stems(tmp_path / "aug" / "masks"):
        planes = [gray(tmp_path / "aug" / seq / f"{name}.png") for seq in SEQS]
        assert planes[0].shape == (64, 64)
        np.testing.assert_array_equal(planes[0], planes[1])
        np.testing.assert_array_equal(planes[0], planes[2])
        assert centroid(planes[0])[1] > 32, "the flip moved the disc to the right half"
    # the reference settings (noise, brightness): the disc lands in the same place on every plane
    report = augment_dataset(
        tmp_path / "train", tmp_path / "aug2", settings=AugmentConfig(), copies_per_image=4, seed=3, progress=False, workers=1, channels=SEQS
    )
    moved = 0
    for name in stems(tmp_path / "aug2" / "masks"):
        aug_mask = gray(tmp_path / "aug2" / "masks" / f"{name}.png")
        where = centroid(aug_mask, 127)
        for seq in SEQS:
            np.testing.assert_allclose(centroid(gray(tmp_path / "aug2" / seq / f"{name}.png")), where, atol=1.5)
        moved += bool(np.abs(where - np.array([20, 16])).max() > 2)
    assert moved >= 2
    grid = preview_grid(tmp_path / "train", AugmentConfig(), rows=2, copies=2, seed=0, channels=SEQS)
    assert grid.ndim == 3 and grid.shape[2] == 3


# --------------------------------------------------------------------------------------------
# real data (../shared)
# --------------------------------------------------------------------------------------------

LGG_CASE_REGEX = r"regex:^(.+)_\d+$"


@pytest.mark.shared
@pytest.mark.slow
def test_lgg256_missing_sequences_by_case(tmp_path: Path):
    root = shared_dataset("lgg-256", expect="flair")
    with open(root / "cases.csv", newline="") as handle:
        cases = list(csv.DictReader(handle))
    lacking = {
        row["case"]: {seq: int(row["slices"]) for seq in SEQS if seq not in row["sequences"].split(";")}
        for row in cases
        if set(row["sequences"].split(";")) != set(SEQS)
    }
    assert len(lacking) == 8
    raw = tmp_path / "raw"
    info = download(raw, source="local", local_path=str(root), sequences=SEQS, layout="auto", **DOWNLOAD)
    assert info.n_images == sum(int(row["slices"]) for row in cases) and info.kind == "real"
    assert (raw / "cases.csv").read_bytes() == (root / "cases.csv").read_bytes()
    report = prepare_seqs(raw, tmp_path / "prepared", size=64, workers=2, group_by=LGG_CASE_REGEX, missing_sequences="skip")
    assert report.missing_by_case == lacking
    assert report.skipped_by_reason == {MISSING_SEQUENCE: sum(int(row["slices"]) for row in cases if row["case"] in lacking)}
    assert report.valid_pairs == sum(int(row["slices"]) for row in cases if row["case"] not in lacking)
    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv")
    assert manifest.groupby("group")["split"].nunique().max() == 1


@pytest.mark.shared
def test_kaggle_sample_equals_lgg256(tmp_path: Path):
    sample = shared_dataset("lgg-kaggle-sample", expect="kaggle_3m")
    lgg = shared_dataset("lgg-256", expect="flair")
    raw = tmp_path / "raw"
    info = download(raw, source="local", local_path=str(sample), sequences=SEQS, layout="auto", **DOWNLOAD)
    assert info.n_images == 20 and info.n_masks == 20
    case = "TCGA_CS_5395_19981004"
    assert all(len(stems(raw / seq)) == 20 for seq in SEQS)  # this patient has all three sequences
    shared = stems(lgg / "flair") & stems(raw / "flair")
    assert len(shared) == 9 and all(name.startswith(case) for name in shared)
    for name in sorted(shared):
        for folder in (*SEQS, "masks"):
            np.testing.assert_array_equal(gray(raw / folder / f"{name}.png"), gray(lgg / folder / f"{name}.png"), err_msg=f"{folder}/{name}")
