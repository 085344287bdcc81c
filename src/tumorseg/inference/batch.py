"""Batch jobs on files: image files, folders and zip archives in; masks, overlays and a CSV out.

Every file and zip member is read through :mod:`tumorseg.images`, the one gate for untrusted
bytes (header checked before decoding), and segmented by a :class:`~tumorseg.inference.predictor.Predictor`.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, MAX_FILE_BYTES, TOO_LARGE, InputImageError, decode_image, read_file_bytes
from tumorseg.inference.predictor import Prediction, Predictor
from tumorseg.inference.scans import SliceInput, VolumeInput, list_scan_inputs, missing_sequences, read_slice
from tumorseg.io import atomic_write_png, atomic_write_text, check_separate
from tumorseg.overlays import overlay_outline
from tumorseg.volumes import is_nifti, load_volume, window_to_uint8, write_segmentation

CSV_COLUMNS = ("file", "tumour_present", "area_px", "area_pct", "mean_confidence", "status", "reason", "mask", "overlay")


@dataclass(frozen=True)
class InputSource:
    """One image to read: a file, or a member of a zip archive (``member`` set)."""

    path: Path
    member: str | None = None

    @property
    def display(self) -> str:
        return f"{self.path}:{self.member}" if self.member is not None else str(self.path)

    @property
    def stem(self) -> str:
        """File-name stem without any folder part; zip member names are untrusted (``../x``, ``C:\\x``).
        Letters and digits of any script are kept (``Glioma_ß``), anything else becomes ``_``."""
        name = (self.member if self.member is not None else self.path.name).replace("\\", "/").rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        return re.sub(r"[^\w.-]+", "_", stem).strip("._-")[:100] or "image"


@dataclass
class InputListing:
    sources: list[InputSource] = field(default_factory=list)  # 2-D images (grayscale models)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (input, reason): could not even be listed
    ignored: int = 0  # files in folders/zips without an image extension
    slices: list[SliceInput] = field(default_factory=list)  # multi-sequence slices (per-sequence folders)
    volumes: list[VolumeInput] = field(default_factory=list)  # NIfTI cases

    @property
    def count(self) -> int:
        return len(self.sources) + len(self.slices) + len(self.volumes)


def list_inputs(paths: Iterable[str | Path], sequences: Sequence[str] = ()) -> InputListing:
    """Expand the inputs of a model taking ``sequences`` (``()``: one grayscale image).

    Grayscale: image files, folders (recursive, image extensions only, hidden files skipped) and
    ``.zip`` archives (their image members), sorted and duplicate-free, plus NIfTI volumes.
    Multi-sequence: per-sequence folders and NIfTI cases (:mod:`tumorseg.inference.scans`). A file
    named explicitly is always tried (a wrong format is reported, not skipped silently).
    """
    if sequences:
        scans = list_scan_inputs(paths, sequences)
        return InputListing(problems=scans.problems, ignored=scans.ignored, slices=scans.slices, volumes=scans.volumes)
    listing = InputListing()
    seen: set[InputSource] = set()
    volume_files: list[Path] = []

    def add(source: InputSource) -> None:
        if source not in seen:
            seen.add(source)
            listing.sources.append(source)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            for file in files:
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    add(InputSource(file))
                elif file.suffix.lower() == ".zip":
                    _list_zip(file, listing, add)
                elif is_nifti(file):
                    volume_files.append(file)
                else:
                    listing.ignored += 1
        elif path.is_file() and path.suffix.lower() == ".zip":
            _list_zip(path, listing, add)
        elif path.is_file() and is_nifti(path):
            volume_files.append(path)
        elif path.is_file():
            add(InputSource(path))
        else:
            listing.problems.append((str(path), "no such file or folder"))
    if volume_files:
        scans = list_scan_inputs(sorted(set(volume_files)), ())
        listing.volumes, listing.ignored = scans.volumes, listing.ignored + scans.ignored
    return listing


def _list_zip(path: Path, listing: InputListing, add) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        listing.problems.append((str(path), f"not a readable zip archive ({exc})"))
        return
    for info in sorted(members, key=lambda i: i.filename):
        name = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if name.startswith(".") or "__MACOSX/" in info.filename:
            continue
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            add(InputSource(path, info.filename))
        else:
            listing.ignored += 1


class ImageReader:
    """Reads sources' bytes, keeping each zip archive open while its members are read."""

    def __init__(self) -> None:
        self._archives: dict[Path, zipfile.ZipFile] = {}

    def read(self, source: InputSource) -> bytes:
        if source.member is None:
            return read_file_bytes(source.path)
        try:
            archive = self._archives.get(source.path) or self._archives.setdefault(source.path, zipfile.ZipFile(source.path))
            info = archive.getinfo(source.member)
            if info.file_size > MAX_FILE_BYTES:
                raise InputImageError(
                    f"{source.display}: member is too large ({info.file_size / 2**20:.0f} MiB uncompressed; the limit is {MAX_FILE_BYTES // 2**20} MiB)",
                    TOO_LARGE,
                )
            return archive.read(info)
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
            # RuntimeError: encrypted member; NotImplementedError: unsupported compression
            raise InputImageError(f"{source.display}: cannot extract from the zip archive ({exc})") from None

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()


def unique_stems(sources: Sequence[InputSource | SliceInput | VolumeInput]) -> list[str]:
    """Output stems: the input's stem, made unique (``_2``, ``_3``...; case-insensitively, for
    case-insensitive file systems) so that inputs of the same name never overwrite each other."""
    used: set[str] = set()
    stems = []
    for source in sources:
        stem, candidate, number = source.stem, source.stem, 1
        while candidate.lower() in used:
            number += 1
            candidate = f"{stem}_{number}"
        used.add(candidate.lower())
        stems.append(candidate)
    return stems


@dataclass
class PredictReport:
    rows: list[dict[str, Any]]
    ignored: int
    csv_path: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def succeeded(self) -> int:
        return len(self.rows) - len(self.failed)


def predict_files(
    predictor: Predictor,
    inputs: Iterable[str | Path] | InputListing,
    out_dir: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    missing_sequences: str = "skip",
    progress: bool = True,
) -> PredictReport:
    """Segment every input (files, folders, zips; per-sequence folders and NIfTI volumes) into ``out_dir``.

    Per image or slice: ``<stem>_mask.png`` (0/255 at the original size) and ``<stem>_overlay.png``
    (the image, or a multi-sequence slice's first sequence, with the predicted outline). Per NIfTI
    case: ``<case>_seg.nii.gz`` on the input's grid and ``<case>_overlay.png`` (the slice with the
    most tumour). ``predictions.csv`` lists every input with its status, and the reason when it
    could not be read. Bad inputs never stop the run. Every file is written atomically.
    ``missing_sequences``: ``skip`` refuses a slice or case without one of the model's sequences,
    ``fill`` predicts it with zeros there.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if isinstance(inputs, InputListing):
        listing = inputs
    else:
        inputs = list(inputs)
        check_separate(out_dir, inputs, what="the output folder")  # masks written among the inputs could overwrite them
        listing = list_inputs(inputs, predictor.sequences)
    rows: list[dict[str, Any]] = [_row(name, "failed", reason) for name, reason in listing.problems]
    pending: list[tuple[str, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        for (display, stem, image), result in zip(pending, predictor.predict([item[2] for item in pending])):
            mask_name, overlay_name = f"{stem}_mask.png", f"{stem}_overlay.png"
            atomic_write_png(out_dir / mask_name, result.mask)
            atomic_write_png(out_dir / overlay_name, overlay_outline(image if image.ndim == 2 else np.ascontiguousarray(image[..., 0]), result.mask))
            rows.append(_row(display, "ok", "", result, mask_name, overlay_name))
        pending.clear()

    reader = ImageReader()
    bar = tqdm(total=listing.count, desc="predict", unit="input", disable=not progress)
    stems = iter(unique_stems([*listing.sources, *listing.slices, *listing.volumes]))  # no two inputs share an output name
    try:
        for source, stem in zip(listing.sources, stems):
            bar.update()
            try:
                image = decode_image(reader.read(source), source.display, max_pixels=max_pixels)
            except InputImageError as exc:
                rows.append(_row(source.display, "failed", str(exc)))
                continue
            pending.append((source.display, stem, image))
            if len(pending) >= predictor.batch_size:
                flush()
        for item, stem in zip(listing.slices, stems):
            bar.update()
            try:
                image = read_slice(item, predictor.sequences, missing_sequences, max_pixels)
            except InputImageError as exc:
                rows.append(_row(item.display, "failed", str(exc)))
                continue
            pending.append((item.display, stem, image))
            if len(pending) >= predictor.batch_size:
                flush()
        flush()
        for item, stem in zip(listing.volumes, stems):
            bar.update()
            rows.append(_predict_volume(predictor, item, stem, out_dir, missing_sequences))
    finally:
        bar.close()
        reader.close()
    displays = [source.display for source in listing.sources] + [item.display for item in (*listing.slices, *listing.volumes)]
    order = {display: index for index, display in enumerate(displays)}
    rows.sort(key=lambda row: order.get(row["file"], -1))
    csv_path = out_dir / "predictions.csv"
    atomic_write_text(csv_path, _csv(rows))
    return PredictReport(rows, listing.ignored, csv_path)


def _row(name: str, status: str, reason: str, result: Prediction | None = None, mask: str = "", overlay: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"file": name, "tumour_present": "", "area_px": "", "area_pct": "", "mean_confidence": ""}
    if result is not None:
        row |= {
            "tumour_present": result.tumour_present,
            "area_px": result.area_px,
            "area_pct": round(result.area_pct, 4),
            "mean_confidence": round(result.mean_confidence, 4),
        }
    reason = reason[len(name) + 2 :] if reason.startswith(f"{name}: ") else reason  # the file is in its own column
    return row | {"status": status, "reason": reason, "mask": mask, "overlay": overlay}


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _predict_volume(predictor: Predictor, item: VolumeInput, stem: str, out_dir: Path, missing: str) -> dict[str, Any]:
    """Segment one NIfTI case slice by slice; ``<stem>_seg.nii.gz`` on the first volume's grid."""
    sequences = predictor.sequences
    try:
        absent = missing_sequences(item.files, sequences) if sequences else []
        if absent and missing != "fill":
            raise InputImageError(f"{item.display}: no {', '.join(absent)} volume (predict with zeros there: --missing-sequences fill)")
        volumes = [load_volume(path) if path is not None else None for path in item.files]
        grid = next(volume for volume in volumes if volume is not None)
        for name, volume in zip(sequences or ("image",), volumes):
            if volume is not None and volume.slices.shape != grid.slices.shape:
                raise InputImageError(f"{item.display}: the {name} volume is {volume.slices.shape}, the others {grid.slices.shape}")
        planes = [window_to_uint8(v.slices) if v is not None else np.zeros(grid.slices.shape, np.uint8) for v in volumes]
    except InputImageError as exc:
        return _row(item.display, "failed", str(exc))
    stacked = planes[0] if not sequences else np.stack(planes, axis=-1)  # (rows, columns, slices[, C])
    slices = [np.ascontiguousarray(stacked[:, :, index]) for index in range(stacked.shape[2])]
    results = predictor.predict(slices)
    masks = np.stack([result.mask for result in results], axis=2)
    mask_name, overlay_name = f"{stem}_seg.nii.gz", f"{stem}_overlay.png"
    write_segmentation(out_dir / mask_name, masks, grid)
    busiest = int(np.argmax([result.area_px for result in results]))
    atomic_write_png(out_dir / overlay_name, overlay_outline(np.ascontiguousarray(planes[0][:, :, busiest]), results[busiest].mask))
    voxels = sum(result.area_px for result in results)
    confidence = sum(result.mean_confidence * result.area_px for result in results) / voxels if voxels else 0.0
    summary = Prediction(
        probability=np.zeros(0, np.float32), mask=masks, tumour_present=voxels > 0, area_px=voxels,
        area_pct=100.0 * voxels / masks.size, mean_confidence=confidence,
    )
    return _row(item.display, "ok", "", summary, mask_name, overlay_name)
