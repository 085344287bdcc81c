"""NIfTI volumes in and out: the 2-D axial slices a model sees, and a segmentation written back
with the input volume's shape, affine and header.

Slices are shown the way a radiologist reads an axial slice (anterior at the top, the patient's
right on the image's left), whatever the voxel order on disk: the volume is turned by whole
axes and flips only (no resampling) to rows = posterior, columns = left, slices = superior, and a
segmentation is turned back the same way, so it lies voxel for voxel on its input. Intensities
are windowed per volume (0.5th to 99.5th percentile of the non-zero voxels to 0..255), the 8-bit
range the project's PNG slices have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.errors import VolumeError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEGMENTATION_TAG = "seg"  # <case>_seg.nii.gz: the BraTS naming of the tumour mask
SLICE_ORDER = ("P", "L", "S")  # array axes of a turned volume: rows, columns, slices
WINDOW_PERCENTILES = (0.5, 99.5)
_NIFTI_NAME = re.compile(r"^(?P<case>.+)_(?P<tag>[A-Za-z0-9]+)\.nii(\.gz)?$")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def split_nifti_name(path: str | Path) -> tuple[str, str] | None:
    """``BraTS_001_flair.nii.gz`` -> (``BraTS_001``, ``flair``); None when the name has no ``_tag``."""
    match = _NIFTI_NAME.match(Path(path).name)
    return (match["case"], match["tag"].lower()) if match else None


@dataclass
class Volume:
    """One NIfTI file: its image object (affine and header kept for writing back) and its voxels
    turned to slice order (rows, columns, slices)."""

    path: Path
    image: object  # nibabel's image (Nifti1Image or Nifti2Image)
    slices: np.ndarray  # (rows, columns, slices), the file's dtype

    @property
    def slice_count(self) -> int:
        return self.slices.shape[2]


def _orientation_change(affine: np.ndarray, to_slices: bool) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    on_disk, in_slices = io_orientation(affine), axcodes2ornt(SLICE_ORDER)
    return ornt_transform(on_disk, in_slices) if to_slices else ornt_transform(in_slices, on_disk)


def load_volume(path: str | Path) -> Volume:
    """Read a 3-D NIfTI file (a 4-D one with a single volume is accepted); one clear line otherwise."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file") from None
    except Exception as exc:  # nibabel raises ImageFileError, gzip/zlib errors, EOFError, ...
        raise VolumeError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got shape {tuple(data.shape)}")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise VolumeError(f"{path}: voxel type {data.dtype} is not a real number")
    return Volume(path, image, apply_orientation(data, _orientation_change(image.affine, to_slices=True)))


def window_to_uint8(voxels: np.ndarray) -> np.ndarray:
    """Window a volume to 0..255 by the percentiles of its non-zero voxels (background stays 0)."""
    values = np.nan_to_num(np.asarray(voxels, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    foreground = values[values != 0]
    if foreground.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = np.percentile(foreground, WINDOW_PERCENTILES)
    if high <= low:
        return np.where(values != 0, 255, 0).astype(np.uint8)
    scaled = (values - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def segmentation_to_mask(voxels: np.ndarray) -> np.ndarray:
    """Any label above 0 is tumour (BraTS labels 1, 2, 4 alike): {0, 255} uint8."""
    return np.where(np.nan_to_num(np.asarray(voxels, dtype=np.float32)) > 0, 255, 0).astype(np.uint8)


def write_segmentation(path: str | Path, mask_slices: np.ndarray, like: Volume) -> Path:
    """Write (rows, columns, slices) 0/1 or {0,255} masks as a uint8 label volume on ``like``'s grid:
    its shape, affine and header (data type set to uint8, scaling removed)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    from tumorseg.io import atomic_write_bytes

    if mask_slices.shape != like.slices.shape:
        raise ValueError(f"segmentation shape {mask_slices.shape} does not match the volume's {like.slices.shape}")
    labels = apply_orientation((mask_slices > 0).astype(np.uint8), _orientation_change(like.image.affine, to_slices=False))
    header = like.image.header.copy()
    header.set_data_dtype(np.uint8)
    image_type = type(like.image) if isinstance(like.image, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image  # NIfTI-2 stays NIfTI-2
    out = image_type(np.ascontiguousarray(labels), like.image.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["descrip"] = b"tumorseg segmentation (1 = tumour)"
    return atomic_write_bytes(path, nifti_bytes(out, gzipped=str(path).endswith(".gz")))


def nifti_bytes(image, *, gzipped: bool) -> bytes:
    """A NIfTI image's file bytes; gzipped with mtime 0, so the same voxels always give the same bytes."""
    import gzip

    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gzipped else data
