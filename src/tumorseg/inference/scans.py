"""Multi-sequence and volume inputs for batch prediction: a per-sequence folder of slices, or
NIfTI volumes.

- A per-sequence folder ``ROOT/<sequence>/<slice>.png`` (one folder per sequence the model was
  trained on, any image format) gives one input per slice name, its planes stacked in the
  model's sequence order.
- NIfTI volumes (``<case>_<sequence>.nii.gz``, or any ``.nii``/``.nii.gz`` file for a grayscale
  model) are predicted slice by slice and written back as ``<case>_seg.nii.gz`` on the input's
  grid (:mod:`tumorseg.volumes`).

A slice or case without one of the model's sequences is refused with the reason, or predicted
with zeros there when asked (``fill``), as prepare's ``missing_sequences`` does in training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorseg.errors import InputImageError, SequenceMismatch
from tumorseg.images import decode_image, list_image_files, read_file_bytes, to_gray_uint8
from tumorseg.volumes import SEGMENTATION_TAG, is_nifti, split_nifti_name

MISSING_POLICIES = ("skip", "fill")


@dataclass(frozen=True)
class SliceInput:
    """One multi-sequence slice: its file per sequence (None = missing)."""

    name: str
    files: tuple[Path | None, ...]
    display: str

    @property
    def stem(self) -> str:
        return safe_stem(self.name)


@dataclass(frozen=True)
class VolumeInput:
    """One case of NIfTI volumes: a file per sequence (None = missing); one file for a grayscale model."""

    case: str
    files: tuple[Path | None, ...]

    @property
    def display(self) -> str:
        present = [f for f in self.files if f is not None]
        return str(present[0].parent / self.case) if present else self.case

    @property
    def stem(self) -> str:
        return safe_stem(self.case)


def safe_stem(name: str) -> str:
    """An output file stem: letters and digits of any script, ``.``, ``-`` and ``_`` kept, anything else ``_``."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._-")[:100] or "image"


@dataclass
class ScanListing:
    slices: list[SliceInput] = field(default_factory=list)
    volumes: list[VolumeInput] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def is_sequence_root(path: Path, sequences: Sequence[str]) -> bool:
    """A folder holding a sub-folder for at least one of ``sequences``."""
    return path.is_dir() and any((path / sequence).is_dir() for sequence in sequences)


def list_scan_inputs(paths: Iterable[str | Path], sequences: Sequence[str]) -> ScanListing:
    """Sort the inputs of a ``predict`` run into per-sequence slices and NIfTI cases.

    ``sequences`` are the model's (``()`` for a grayscale model, which takes NIfTI files only
    here; its image files go through :func:`~tumorseg.inference.batch.list_inputs`). Anything else
    given is a problem naming what was expected.
    """
    listing = ScanListing()
    for raw in paths:
        path = Path(raw)
        if sequences and is_sequence_root(path, sequences):
            _list_sequence_root(path, sequences, listing)
        elif path.is_dir():
            files = _visible_files(path)
            nifti = [f for f in files if is_nifti(f)]
            listing.ignored += len(files) - len(nifti)
            _add_volumes(nifti, sequences, listing)
        elif path.is_file() and is_nifti(path):
            _add_volumes([path], sequences, listing)
        elif path.exists():
            expected = f"folders {', '.join(f'{s}/' for s in sequences)} or NIfTI volumes" if sequences else "a NIfTI volume"
            takes = f"{len(sequences) or 1} sequence(s) ({', '.join(sequences) or 'one grayscale image'})"
            listing.problems.append((str(path), f"the model takes {takes}: expected {expected}"))
        else:
            listing.problems.append((str(path), "no such file or folder"))
    return listing


def _list_sequence_root(root: Path, sequences: Sequence[str], listing: ScanListing) -> None:
    by_sequence: list[dict[str, Path]] = []
    for sequence in sequences:
        folder = root / sequence
        files = {}
        if folder.is_dir():
            images = list_image_files(folder, recursive=True)
            listing.ignored += len(_visible_files(folder)) - len(images)
            for path in images:
                if path.stem in files:
                    listing.problems.append((str(path), f"two {sequence} files named {path.stem}: {files[path.stem].name} and {path.name}"))
                    continue
                files[path.stem] = path
        by_sequence.append(files)
    for name in sorted(set().union(*by_sequence)):
        listing.slices.append(SliceInput(name, tuple(files.get(name) for files in by_sequence), str(root / name)))


def _add_volumes(files: list[Path], sequences: Sequence[str], listing: ScanListing) -> None:
    if not sequences:  # a grayscale model: every volume is a case of its own (its segmentations are skipped)
        for path in files:
            parts = split_nifti_name(path)
            if parts and parts[1] == SEGMENTATION_TAG:
                listing.ignored += 1
                continue
            listing.volumes.append(VolumeInput(path.name.split(".nii")[0], (path,)))
        return
    cases: dict[str, dict[str, Path]] = {}
    for path in files:
        parts = split_nifti_name(path)
        if parts is None:
            listing.problems.append((str(path), "expected a NIfTI file named <case>_<sequence>.nii.gz"))
            continue
        case, tag = parts
        if tag == SEGMENTATION_TAG:
            listing.ignored += 1
        elif tag in sequences:
            cases.setdefault(case, {})[tag] = path
        else:
            listing.ignored += 1
    for case, found in sorted(cases.items()):
        listing.volumes.append(VolumeInput(case, tuple(found.get(sequence) for sequence in sequences)))


def missing_sequences(files: Sequence[Path | None], sequences: Sequence[str]) -> list[str]:
    return [sequence for sequence, path in zip(sequences, files) if path is None]


def read_slice(item: SliceInput, sequences: Sequence[str], missing: str, max_pixels: int) -> np.ndarray:
    """The slice's ``(H, W, C)`` uint8 stack, each plane read through the decode gate; a missing
    sequence is zeros with ``missing="fill"``, else an error naming it."""
    absent = missing_sequences(item.files, sequences)
    if absent and missing != "fill":
        raise InputImageError(f"{item.display}: no {', '.join(absent)} file (predict with zeros there: --missing-sequences fill)")
    planes: list[np.ndarray | None] = []
    for sequence, path in zip(sequences, item.files):
        if path is None:
            planes.append(None)
            continue
        plane = to_gray_uint8(decode_image(read_file_bytes(path), str(path), max_pixels=max_pixels))
        if planes and any(p is not None and p.shape != plane.shape for p in planes):
            first = next(p for p in planes if p is not None)
            raise InputImageError(
                f"{item.display}: {sequence} is {plane.shape[1]}x{plane.shape[0]} but the other sequences are {first.shape[1]}x{first.shape[0]}"
            )
        planes.append(plane)
    shape = next(p.shape for p in planes if p is not None)
    return np.stack([p if p is not None else np.zeros(shape, np.uint8) for p in planes], axis=-1)


def check_model_sequences(model_sequences: Sequence[str], data_sequences: Sequence[str], where: str) -> None:
    """Refuse, in one line, inputs whose sequences (names and order) are not the model's."""
    if tuple(model_sequences) != tuple(data_sequences):
        model = ", ".join(model_sequences) or "one grayscale image"
        data = ", ".join(data_sequences) or "one grayscale image"
        raise SequenceMismatch(f"{where}: the model was trained on {model}, the input has {data}")
