"""Inference: read any user image safely, segment it with a saved model, and give masks back at the
image's own size.

``Predictor`` wraps a segmentation model behind one ``predict(images)`` call: images of any size
are resized to the model's square input (area interpolation when shrinking, linear when
enlarging), run in batches, optionally with flip test-time augmentation, and the probability map
is resized back (linear) before thresholding, so masks line up with the original pixels. The model
can be a Keras model, a ``.keras`` file, an MLflow model URI (``runs:/...``, ``models:/...``), or an
exported ``.tflite`` / ``.onnx`` file (:mod:`tumorseg.export`); all run behind the same interface.

Every file and zip member is read through :mod:`tumorseg.images` (``decode_image``, re-exported
here), the one gate for untrusted bytes: the header's dimensions, channels and bit depth are
checked *before* decoding, so a decompression bomb or a non-image is refused with a reason instead
of exhausting memory.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

# Reading untrusted images lives in tumorseg.images (one gate for every command); re-exported here.
from tumorseg.images import (  # noqa: F401
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    MAX_DECODE_BYTES,
    MAX_FILE_BYTES,
    SUPPORTED_FORMATS,
    TOO_LARGE,
    InputImageError,
    decode_image,
    read_file_bytes,
    read_image,
    to_gray_uint8,
)

log = logging.getLogger(__name__)

RUNTIME_SUFFIXES = (".tflite", ".onnx")


class ModelLoadError(ValueError):
    """A model file or URI cannot be loaded; the message names it and the reason."""


# --------------------------------------------------------------------------------------------
# Model back-ends: Keras, TFLite, ONNX Runtime behind one call
# --------------------------------------------------------------------------------------------


class Backend(Protocol):
    """Runs a float32 ``(N, S, S, 1)`` raw-pixel batch to ``(N, S, S, 1)`` probabilities."""

    input_size: int
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def _square_side(shape: Sequence[Any], where: str) -> int:
    height, width = shape[1], shape[2]
    if height is None or width is None or height != width or int(height) <= 0:
        raise ValueError(f"{where}: expected a fixed square input (N, S, S, 1), got {tuple(shape)}")
    return int(height)


class KerasBackend:
    name = "keras"

    def __init__(self, model) -> None:
        self.model = model
        self.input_size = _square_side(model.input_shape, "model")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # predict_on_batch runs a compiled graph function: no per-call Python overhead of model.predict.
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


class TFLiteBackend:
    name = "tflite"

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        from tumorseg.export import tflite_interpreter

        self.path = Path(path)
        self.interpreter = tflite_interpreter(self.path, num_threads=num_threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.input_size = _square_side(self._input["shape"], str(path))
        self._batch = int(self._input["shape"][0])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] != self._batch:
            self.interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._batch = batch.shape[0]
        self.interpreter.set_tensor(self._input["index"], _quantize(batch, self._input))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self._output["index"]), self._output)


def _quantize(batch: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return batch
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(batch / scale + zero), info.min, info.max).astype(detail["dtype"])


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return values.copy()
    scale, zero = detail["quantization"]
    return ((values.astype(np.float32) - zero) * scale).astype(np.float32)


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0]
        self.input_size = _square_side(self._input.shape, str(path))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self._input.name: batch})[0], dtype=np.float32)


def resize_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``(N, H, W, 1)`` float32 -> ``(N, size, size, 1)``, each image as :func:`resize_to_input` does."""
    if batch.shape[1:3] == (size, size):
        return batch
    return np.stack([resize_to_input(image[..., 0], size) for image in batch])[..., None].astype(np.float32)


def predict_at_size(call, size: int, batch: np.ndarray) -> np.ndarray:
    """``call`` (a model built for ``size``²) on ``batch`` resized to it, its output resized back."""
    return resize_batch(np.asarray(call(resize_batch(batch, size)), np.float32), batch.shape[1])


class EnsembleBackend:
    """The mean probability of several models: any mix of back-ends and input sizes.

    Each member sees the batch resized to its own input size; its output is resized back to the
    batch's size before averaging. Averaging two differently built models (the U-Net and
    UMobileNetV2) cancels part of their independent errors.
    """

    def __init__(self, members: Sequence[Backend]) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(members)}")
        self.members = list(members)
        self.input_size = max(member.input_size for member in self.members)
        self.name = "ensemble(" + "+".join(member.name for member in self.members) + ")"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        total = np.zeros(batch.shape, np.float32)
        for member in self.members:
            total += predict_at_size(member, member.input_size, batch)
        return total / len(self.members)

    def predict(self, x: np.ndarray, batch_size: int = 8, verbose: int = 0) -> np.ndarray:
        """Keras-style batched call: scoring code takes an ensemble wherever it takes a model."""
        x = np.asarray(x, np.float32)
        return np.concatenate([self(x[start : start + batch_size]) for start in range(0, len(x), batch_size)])


def load_keras_model(source: str | Path):
    """A Keras model from a ``.keras``/``.h5`` file or an MLflow URI (``runs:/``, ``models:/``)."""
    text = str(source)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        from tumorseg import tracking

        return tracking.load_keras_model(text)
    path = Path(text)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file (give a .keras file, runs:/<run id>/model or models:/<name>/<version>)")
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist (give a .keras file, runs:/<run id>/model or models:/<name>/<version>)")
    problem = model_file_problem(path)
    if problem:
        raise ModelLoadError(f"{path}: {problem}")

    import keras

    import tumorseg.models  # noqa: F401 - registers the custom layers, losses and metrics

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError/OSError/zipfile errors for a bad file
        detail = " ".join(str(exc).split())[:200]
        raise ModelLoadError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {detail})") from None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def model_file_problem(path: Path) -> str | None:
    """What is wrong with a model file, found before Keras reads it: Keras reports any .keras file
    that is not a zip archive as "File not found", although the file is there."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if not head:
        return "empty file (0 bytes)"
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return None if head == HDF5_SIGNATURE else "not an HDF5 file (a .h5 model starts with the HDF5 signature)"
    if suffix != ".keras":
        return None  # Keras names the formats it supports
    if head == HDF5_SIGNATURE:
        return "an HDF5 (.h5) file, not a Keras model archive: rename it to .h5"
    if head == PNG_SIGNATURE:
        return "a PNG image, not a Keras model archive"
    if not zipfile.is_zipfile(path):
        return "truncated or corrupt zip archive (its directory at the end is missing)" if head.startswith(b"PK") else "not a Keras model archive (not a zip file)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # a damaged member header or length
        return f"corrupt zip archive ({exc})"
    if "config.json" not in names:
        return "not a Keras model archive (no config.json inside)"
    if not any(name.startswith("model.weights.") for name in names):
        return "a Keras model archive without its weights (no model.weights.h5 inside)"
    if damaged:
        return f"corrupt zip archive ({damaged} fails its checksum)"
    return None


def load_backend(source: str | Path | Sequence[str | Path], *, num_threads: int | None = None) -> Backend:
    """The back-end for a model file or URI (see ``Predictor.load``); several: an ensemble of them."""
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            return load_backend(source[0], num_threads=num_threads)
        return EnsembleBackend([load_backend(s, num_threads=num_threads) for s in source])
    text = str(source)
    suffix = Path(text).suffix.lower()
    if suffix in RUNTIME_SUFFIXES and "://" not in text and not text.startswith(("runs:/", "models:/")):
        if not Path(text).is_file():
            raise FileNotFoundError(f"model {text} does not exist")
        try:
            return TFLiteBackend(text, num_threads) if suffix == ".tflite" else OnnxBackend(text, num_threads)
        except Exception as exc:  # runtimes raise RuntimeError/ValueError/their own types for a bad file
            raise ModelLoadError(f"{text} is not a loadable {suffix[1:]} model ({type(exc).__name__}: {str(exc)[:200]})") from None
    return KerasBackend(load_keras_model(text))


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One image's segmentation, at the image's original size."""

    probability: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # uint8 (H, W) in {0, 255}: probability > threshold
    tumour_present: bool  # any mask pixel
    area_px: int  # tumour pixels in the mask
    area_pct: float  # 100 * area_px / (H * W)
    mean_confidence: float  # mean probability over the mask's pixels; 0.0 when the mask is empty

    def summary(self) -> dict[str, Any]:
        return {
            "tumour_present": self.tumour_present,
            "area_px": self.area_px,
            "area_pct": self.area_pct,
            "mean_confidence": self.mean_confidence,
        }


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop 8-connected foreground blobs smaller than ``min_pixels`` (isolated false positives)."""
    if min_pixels <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def summarise(probability: np.ndarray, threshold: float, min_component_px: int = 0) -> Prediction:
    """Threshold a probability map, drop blobs under ``min_component_px`` and measure the tumour."""
    probability = np.clip(probability.astype(np.float32, copy=False), 0.0, 1.0)
    tumour = remove_small_components(probability > threshold, min_component_px)
    area = int(np.count_nonzero(tumour))
    return Prediction(
        probability=probability,
        mask=tumour.astype(np.uint8) * 255,
        tumour_present=area > 0,
        area_px=area,
        area_pct=100.0 * area / probability.size,
        mean_confidence=float(probability[tumour].mean()) if area else 0.0,
    )


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """Area interpolation when shrinking (no aliasing), linear when enlarging - as in prepare."""
    if image.shape == (size, size):
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class Predictor:
    """Segment images of any size with one model (Keras, MLflow, TFLite or ONNX).

    ``threshold``: a pixel is tumour where the probability is > threshold. ``tta``: average the
    probabilities of the image and its horizontal mirror (mirrored back), which makes the
    prediction exactly equivariant to horizontal flips. ``batch_size``: images per model call.
    ``min_component_px``: drop predicted blobs smaller than this (at the image's own size).
    A TFLite back-end is not thread-safe: give each thread its own Predictor (or hold a lock).
    """

    def __init__(self, model, *, threshold: float = 0.5, tta: bool = False, batch_size: int = 8, min_component_px: int = 0) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if min_component_px < 0:
            raise ValueError(f"min_component_px must be at least 0, got {min_component_px}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend: Backend = model if isinstance(model, (TFLiteBackend, OnnxBackend, KerasBackend, EnsembleBackend)) else KerasBackend(model)
        self.threshold = float(threshold)
        self.tta = bool(tta)
        self.batch_size = int(batch_size)
        self.min_component_px = int(min_component_px)

    @classmethod
    def load(cls, source: str | Path | Sequence[str | Path], *, num_threads: int | None = None, **kwargs) -> Predictor:
        """From a ``.keras`` file, an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``),
        or an exported ``.tflite`` / ``.onnx`` file; several of them: their mean (an ensemble)."""
        return cls(load_backend(source, num_threads=num_threads), **kwargs)

    @property
    def model(self):
        """The Keras model (``None`` for an exported .tflite/.onnx file or an ensemble)."""
        return getattr(self.backend, "model", None)

    @property
    def input_size(self) -> int:
        return self.backend.input_size

    def predict_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Model-size probabilities ``(N, S, S)`` for a float32 ``(N, S, S, 1)`` raw-pixel batch."""
        if not self.tta:
            return self.backend(batch)[..., 0]
        both = self.backend(np.concatenate([batch, batch[:, :, ::-1]], axis=0))[..., 0]
        plain, mirrored = both[: len(batch)], both[len(batch) :, :, ::-1]
        return (plain + mirrored) / 2.0  # a + b == b + a exactly: flip-equivariant to the last bit

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Segment uint8 grayscale ``(H, W)`` images of any sizes; results at each image's size."""
        results: list[Prediction] = []
        size = self.input_size
        for start in range(0, len(images), self.batch_size):
            chunk = [_as_gray(image, start + i) for i, image in enumerate(images[start : start + self.batch_size])]
            batch = np.stack([resize_to_input(image, size) for image in chunk]).astype(np.float32)[..., None]
            probabilities = self.predict_probabilities(batch)
            for image, probability in zip(chunk, probabilities):
                height, width = image.shape
                if probability.shape != (height, width):
                    probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
                results.append(summarise(probability, self.threshold, self.min_component_px))
        return results


def _as_gray(image: np.ndarray, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2 or image.dtype != np.uint8:
        if image.ndim in (2, 3):
            return to_gray_uint8(image)
        raise ValueError(f"image {index}: expected a (H, W) grayscale array, got shape {image.shape}")
    if min(image.shape) < 1:
        raise ValueError(f"image {index}: empty array of shape {image.shape}")
    return image


# --------------------------------------------------------------------------------------------
# Batch jobs on files: images, folders and zip archives in, masks, overlays and a CSV out
# --------------------------------------------------------------------------------------------

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
    sources: list[InputSource] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (input, reason): could not even be listed
    ignored: int = 0  # files in folders/zips without an image extension


def list_inputs(paths: Iterable[str | Path]) -> InputListing:
    """Expand image files, folders (recursive, image extensions only, hidden files skipped) and
    ``.zip`` archives (their image members) into a sorted, duplicate-free list of sources.

    A file named explicitly is always tried (a wrong format is reported, not skipped silently).
    """
    listing = InputListing()
    seen: set[InputSource] = set()

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
                else:
                    listing.ignored += 1
        elif path.is_file() and path.suffix.lower() == ".zip":
            _list_zip(path, listing, add)
        elif path.is_file():
            add(InputSource(path))
        else:
            listing.problems.append((str(path), "no such file or folder"))
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


class _Reader:
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
                raise InputImageError(f"{source.display}: member is too large ({info.file_size / 2**20:.0f} MiB uncompressed; the limit is {MAX_FILE_BYTES // 2**20} MiB)", TOO_LARGE)
            return archive.read(info)
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
            # RuntimeError: encrypted member; NotImplementedError: unsupported compression
            raise InputImageError(f"{source.display}: cannot extract from the zip archive ({exc})") from None

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()


def unique_stems(sources: Sequence[InputSource]) -> list[str]:
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
    progress: bool = True,
) -> PredictReport:
    """Segment every image in ``inputs`` (files, folders, zips) into ``out_dir``.

    Per image: ``<stem>_mask.png`` (0/255 at the original size) and ``<stem>_overlay.png`` (the
    image with the predicted outline); ``predictions.csv`` lists every input with its status, and
    the reason when it could not be read. Bad inputs never stop the run. Every file is written
    atomically.
    """
    from tqdm import tqdm

    from tumorseg.data.augment import overlay_outline
    from tumorseg.io import atomic_write_png, atomic_write_text, check_separate

    out_dir = Path(out_dir)
    if isinstance(inputs, InputListing):
        listing = inputs
    else:
        inputs = list(inputs)
        check_separate(out_dir, inputs, what="the output folder")  # masks written among the inputs could overwrite them
        listing = list_inputs(inputs)
    rows: list[dict[str, Any]] = [_row(name, "failed", reason) for name, reason in listing.problems]
    pending: list[tuple[InputSource, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        for (source, stem, image), result in zip(pending, predictor.predict([item[2] for item in pending])):
            mask_name, overlay_name = f"{stem}_mask.png", f"{stem}_overlay.png"
            atomic_write_png(out_dir / mask_name, result.mask)
            atomic_write_png(out_dir / overlay_name, overlay_outline(image, result.mask))
            rows.append(_row(source.display, "ok", "", result, mask_name, overlay_name))
        pending.clear()

    reader = _Reader()
    try:
        bar = tqdm(zip(listing.sources, unique_stems(listing.sources)), total=len(listing.sources), desc="predict", unit="image", disable=not progress)
        for source, stem in bar:
            try:
                image = decode_image(reader.read(source), source.display, max_pixels=max_pixels)
            except InputImageError as exc:
                rows.append(_row(source.display, "failed", str(exc)))
                continue
            pending.append((source, stem, image))
            if len(pending) >= predictor.batch_size:
                flush()
        flush()
    finally:
        reader.close()
    order = {source.display: index for index, source in enumerate(listing.sources)}
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
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
