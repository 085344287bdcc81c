"""Multi-sequence MRI datasets in, one raw layout out: ``RAW/<sequence>/<slice>.<ext>`` for each of
``data.sequences`` plus ``RAW/masks/<slice>.<ext>``, where a slice missing a sequence simply has no
file in that sequence's folder (prepare then skips or fills it).

Three layouts are read:

- ``folders``: ``ROOT/<sequence>/<slice>.png`` and ``ROOT/<mask_dir>/<slice><mask_suffix>.png``
  (e.g. ``../shared/data/lgg-256``); files are linked, not decoded.
- ``kaggle_lgg``: the Kaggle LGG set (``mateuszbuda/lgg-mri-segmentation``),
  ``kaggle_3m/<case>/<case>_<n>.tif`` holding pre-contrast T1, FLAIR and post-contrast T1 as RGB
  (OpenCV reads BGR) and ``<case>_<n>_mask.tif``. The set fills a missing sequence with a copy of
  FLAIR; a channel equal to FLAIR on every slice of a case is taken as missing, not as data.
- ``nifti``: ``<case>_<sequence>.nii[.gz]`` volumes with ``<case>_seg.nii[.gz]`` (BraTS naming),
  cut into axial slices (:mod:`tumorseg.volumes`: radiological view, per-volume 8-bit window);
  slices where every sequence is blank are left out.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tumorseg import images as image_gate
from tumorseg.errors import InputImageError, SourceError
from tumorseg.images import list_image_files
from tumorseg.io import encode_png, write_staged_bytes
from tumorseg.volumes import SEGMENTATION_TAG, is_nifti, load_volume, segmentation_to_mask, split_nifti_name, window_to_uint8

log = logging.getLogger(__name__)

LAYOUTS = ("folders", "kaggle_lgg", "nifti")
MASK_FOLDER = "masks"
KAGGLE_LGG_SEQUENCES = ("t1", "flair", "t1ce")  # the RGB order of the Kaggle LGG .tif files
_KAGGLE_BGR_INDEX = {"t1": 2, "flair": 1, "t1ce": 0}  # OpenCV decodes RGB files as BGR
KAGGLE_MASK_SUFFIX = "_mask"


def _visible_dirs(root: Path) -> list[Path]:
    def hidden(path: Path) -> bool:
        return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)

    return [root, *sorted(p for p in root.rglob("*") if p.is_dir() and not hidden(p))]


def detect_layout(root: Path, sequences: Sequence[str], mask_dir: str) -> str:
    """The layout of ``root``: sequence folders, the Kaggle LGG case folders, or NIfTI volumes."""
    names = {p.name.lower() for p in _visible_dirs(root)}
    if all(seq in names for seq in sequences) and mask_dir.lower() in names:
        return "folders"
    files = [p for p in root.rglob("*") if p.is_file()]
    if any(is_nifti(p) for p in files):
        return "nifti"
    if any(p.stem.endswith(KAGGLE_MASK_SUFFIX) for p in list_image_files(root, recursive=True)):
        return "kaggle_lgg"
    raise SourceError(
        f"no multi-sequence layout found under {root}: expected folders named {', '.join(sequences)} and {mask_dir} "
        f"(data.layout=folders), Kaggle LGG case folders with *_mask.tif (kaggle_lgg) or <case>_<sequence>.nii.gz "
        "volumes (nifti); set data.layout, or empty data.sequences for one grayscale image per slice"
    )


def import_dataset(layout: str, root: Path, staging: Path, sequences: Sequence[str], *, mask_dir: str, mask_suffix: str, progress: bool) -> str:
    """Fill ``staging`` with the raw layout from ``root``; returns the layout used (auto resolved)."""
    if layout == "auto":
        layout = detect_layout(root, sequences, mask_dir)
    log.info("multi-sequence data (%s layout), sequences %s, from %s", layout, ", ".join(sequences), root)
    if layout == "folders":
        _import_folders(root, staging, sequences, mask_dir, mask_suffix, progress)
    elif layout == "kaggle_lgg":
        _import_kaggle_lgg(root, staging, sequences, progress)
    elif layout == "nifti":
        _import_nifti(root, staging, sequences, progress)
    else:
        raise SourceError(f"data.layout must be auto, {', '.join(LAYOUTS)}, not {layout!r}")
    return layout


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------


def _find_folder(root: Path, name: str) -> Path:
    matches = [p for p in _visible_dirs(root) if p.name.lower() == name.lower() and list_image_files(p)]
    if len(matches) != 1:
        seen = ", ".join(sorted({str(p.relative_to(root)) for p in _visible_dirs(root) if list_image_files(p)})[:12]) or "none"
        problem = "no folder" if not matches else f"{len(matches)} folders"
        raise SourceError(f"{problem} named {name!r} with images under {root} (folders with images: {seen}); check data.sequences and data.mask_dir")
    return matches[0]


def _link(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise SourceError(f"two input files would both be {target.parent.name}/{target.name} (second: {path}); names must be unique")
    try:
        os.link(path, target)  # free on the same disk; the source is never modified
    except OSError:
        shutil.copy2(path, target)


def _import_folders(root: Path, staging: Path, sequences: Sequence[str], mask_dir: str, mask_suffix: str, progress: bool) -> None:
    for name, folder_name in [(seq, seq) for seq in sequences] + [(MASK_FOLDER, mask_dir)]:
        folder = _find_folder(root, folder_name)
        for path in tqdm(list_image_files(folder), desc=name, unit="file", disable=not progress, leave=False):
            stem = path.stem.removesuffix(mask_suffix) if name == MASK_FOLDER and mask_suffix else path.stem
            _link(path, staging / name / f"{stem}{path.suffix.lower()}")


# --------------------------------------------------------------------------------------------
# kaggle_lgg
# --------------------------------------------------------------------------------------------


def _read_gated(path: Path) -> np.ndarray:
    data = image_gate.read_file_bytes(path, path.name)
    return image_gate.decode_array(data, path.name, apply_orientation=False)


def _import_kaggle_lgg(root: Path, staging: Path, sequences: Sequence[str], progress: bool) -> None:
    unknown = [seq for seq in sequences if seq not in KAGGLE_LGG_SEQUENCES]
    if unknown:
        raise SourceError(f"the Kaggle LGG layout holds {', '.join(KAGGLE_LGG_SEQUENCES)}; data.sequences asks for {', '.join(unknown)}")
    masks = [p for p in list_image_files(root, recursive=True) if p.stem.endswith(KAGGLE_MASK_SUFFIX)]
    cases: dict[Path, list[Path]] = {}
    for mask in masks:
        cases.setdefault(mask.parent, []).append(mask)
    if not cases:
        raise SourceError(f"no Kaggle LGG slices (<case>_<n>{KAGGLE_MASK_SUFFIX}.tif) under {root}")
    for folder, case_masks in tqdm(sorted(cases.items()), desc="cases", unit="case", disable=not progress):
        slices: dict[str, np.ndarray] = {}
        for mask_path in case_masks:
            image_path = mask_path.with_name(mask_path.name.replace(KAGGLE_MASK_SUFFIX, "", 1))
            stem = image_path.stem
            try:
                image = _read_gated(image_path)
                mask = _read_gated(mask_path)
            except InputImageError as exc:
                log.warning("kaggle_lgg: %s skipped (%s)", stem, exc)
                continue
            if image.ndim != 3 or image.shape[2] < 3:
                log.warning("kaggle_lgg: %s skipped (expected 3 packed sequences, got shape %s)", stem, image.shape)
                continue
            slices[stem] = image
            write_staged_bytes(staging / MASK_FOLDER / f"{stem}.png", encode_png(mask if mask.ndim == 2 else mask.max(axis=2)))
        flair = [image[:, :, _KAGGLE_BGR_INDEX["flair"]] for image in slices.values()]
        for seq in sequences:
            planes = [image[:, :, _KAGGLE_BGR_INDEX[seq]] for image in slices.values()]
            if seq != "flair" and planes and all(np.array_equal(p, f) for p, f in zip(planes, flair)):
                log.info("kaggle_lgg: %s has no %s (the file repeats FLAIR there): left out", folder.name, seq)
                continue
            for stem, plane in zip(slices, planes):
                write_staged_bytes(staging / seq / f"{stem}.png", encode_png(np.ascontiguousarray(plane)))


# --------------------------------------------------------------------------------------------
# nifti
# --------------------------------------------------------------------------------------------


def nifti_cases(root: Path) -> dict[str, dict[str, Path]]:
    """``{case: {tag: path}}`` for every ``<case>_<tag>.nii[.gz]`` under ``root`` (tag ``seg`` = mask)."""
    cases: dict[str, dict[str, Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_nifti(p)):
        parts = split_nifti_name(path)
        if parts is None:
            log.warning("nifti: %s skipped (expected <case>_<sequence>.nii.gz)", path.name)
            continue
        case, tag = parts
        if tag in cases.setdefault(case, {}):
            raise SourceError(f"two volumes for case {case!r}, sequence {tag!r}: {cases[case][tag]} and {path}")
        cases[case][tag] = path
    return cases


def _import_nifti(root: Path, staging: Path, sequences: Sequence[str], progress: bool) -> None:
    cases = nifti_cases(root)
    if not cases:
        raise SourceError(f"no NIfTI volumes (<case>_<sequence>.nii.gz) under {root}")
    for case, volumes in tqdm(sorted(cases.items()), desc="volumes", unit="case", disable=not progress):
        if SEGMENTATION_TAG not in volumes:
            log.warning("nifti: case %s skipped (no %s_%s.nii.gz)", case, case, SEGMENTATION_TAG)
            continue
        try:
            mask = load_volume(volumes[SEGMENTATION_TAG])
            loaded = {seq: load_volume(volumes[seq]) for seq in sequences if seq in volumes}
        except InputImageError as exc:
            log.warning("nifti: case %s skipped (%s)", case, exc)
            continue
        shapes = {name: volume.slices.shape for name, volume in [(SEGMENTATION_TAG, mask), *loaded.items()]}
        if len(set(shapes.values())) > 1:
            log.warning("nifti: case %s skipped (volumes disagree in shape: %s)", case, shapes)
            continue
        windowed = {seq: window_to_uint8(volume.slices) for seq, volume in loaded.items()}
        labels = segmentation_to_mask(mask.slices)
        for index in range(labels.shape[2]):
            if not any(plane[:, :, index].any() for plane in windowed.values()):
                continue  # outside the head in every sequence
            stem = f"{case}_{index:03d}"
            write_staged_bytes(staging / MASK_FOLDER / f"{stem}.png", encode_png(np.ascontiguousarray(labels[:, :, index])))
            for seq, plane in windowed.items():
                write_staged_bytes(staging / seq / f"{stem}.png", encode_png(np.ascontiguousarray(plane[:, :, index])))


def count_files(staging: Path, folders: Sequence[str]) -> dict[str, int]:
    return {name: len(list_image_files(staging / name)) if (staging / name).is_dir() else 0 for name in folders}
