"""Inference: read any user image safely, segment it with a saved model, and give masks back at the
image's own size.

``Predictor`` wraps a segmentation model behind one ``predict(images)`` call: images of any size
are resized to the model's square input (area interpolation when shrinking, linear when
enlarging), run in batches, optionally with flip test-time augmentation, and the probability map
is resized back (linear) before thresholding, so masks line up with the original pixels. The model
can be a Keras model, a ``.keras`` file, an MLflow model URI (``runs:/...``, ``models:/...``), or an
exported ``.tflite`` / ``.onnx`` file (:mod:`tumorseg.export`); all run behind the same interface.

``decode_image`` is the one gate for untrusted bytes (uploads, files, zip members): it identifies
the format and reads the dimensions from the header *before* decoding, so a decompression bomb
or a non-image is refused with a reason instead of exhausting memory.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "DIB": "BMP", "TIFF": "TIFF"}
DEFAULT_MAX_PIXELS = 40_000_000
RUNTIME_SUFFIXES = (".tflite", ".onnx")


class InputImageError(ValueError):
    """An input is not a usable image; the message names the input and the reason."""


# --------------------------------------------------------------------------------------------
# Reading untrusted images
# --------------------------------------------------------------------------------------------


def _identify(data: bytes, name: str, max_pixels: int) -> tuple[str, int, int]:
    """Format and (width, height) from the header only (Pillow opens lazily: no pixel decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as handle:
                fmt, (width, height) = handle.format or "unknown", handle.size
    except Image.DecompressionBombError:
        raise InputImageError(f"{name}: image dimensions are too large (more than {max_pixels:,} pixels)") from None
    except UnidentifiedImageError:
        raise InputImageError(f"{name}: not an image (unrecognised file format; use PNG, JPEG, BMP or TIFF)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow reports bad headers with these
        raise InputImageError(f"{name}: corrupt image header ({exc})") from None
    if fmt not in SUPPORTED_FORMATS:
        raise InputImageError(f"{name}: unsupported image format {fmt} (use PNG, JPEG, BMP or TIFF)")
    if width <= 0 or height <= 0:
        raise InputImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputImageError(f"{name}: image dimensions are too large ({width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,})")
    return SUPPORTED_FORMATS[fmt], width, height


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """Any decoded image (gray/BGR/BGRA, 8/16-bit/float) -> 8-bit single channel.

    16-bit and float images are stretched min..max to 0..255 (MRI intensities have no fixed
    scale; the models were trained on 8-bit slices that use the full range).
    """
    from tumorseg.data.prepare import to_gray_uint8 as convert  # one conversion for training data and user images

    return convert(image)


def decode_image(data: bytes, name: str = "upload", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode untrusted bytes to a uint8 ``(H, W)`` grayscale image.

    Accepts PNG, JPEG, BMP and TIFF, 8 or 16 bit, gray, RGB or RGBA (JPEG EXIF orientation is
    applied). Raises :class:`InputImageError` naming ``name`` and the reason: empty, not an image,
    unsupported format, too large (checked from the header before decoding), corrupt or truncated.
    """
    if not data:
        raise InputImageError(f"{name}: empty file (0 bytes)")
    fmt, width, height = _identify(data, name, max_pixels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        # ANYDEPTH keeps 16-bit; ANYCOLOR keeps gray as gray; unlike IMREAD_UNCHANGED it applies EXIF orientation.
        image = cv2.imdecode(buffer, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as exc:
        raise InputImageError(f"{name}: corrupt {fmt} image ({str(exc).strip().splitlines()[-1][:200]})") from None
    if image is None or image.size == 0:
        raise InputImageError(f"{name}: corrupt or truncated {fmt} image (the header says {width}x{height} but the pixels cannot be decoded)")
    if image.shape[0] * image.shape[1] > max_pixels:  # header and data disagree: trust the data
        raise InputImageError(f"{name}: image dimensions are too large ({image.shape[1]}x{image.shape[0]}; the limit is {max_pixels:,} pixels)")
    return to_gray_uint8(image)


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_image` on a file's bytes; a missing or unreadable file is an InputImageError too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise InputImageError(f"{path}: is a folder, not an image file") from None
    except OSError as exc:
        raise InputImageError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return decode_image(data, str(path), max_pixels=max_pixels)


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


def load_keras_model(source: str | Path):
    """A Keras model from a ``.keras``/``.h5`` file or an MLflow URI (``runs:/``, ``models:/``)."""
    import keras

    import tumorseg.models  # noqa: F401 - registers the custom layers, losses and metrics

    text = str(source)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        from tumorseg import tracking

        return tracking.load_keras_model(text)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist (give a .keras file, runs:/<run id>/model or models:/<name>/<version>)")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError/OSError/zipfile errors for a bad file
        raise ValueError(f"{path} is not a loadable Keras model ({type(exc).__name__}: {str(exc)[:200]})") from None


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


def summarise(probability: np.ndarray, threshold: float) -> Prediction:
    """Threshold a probability map and measure the predicted tumour."""
    probability = np.clip(probability.astype(np.float32, copy=False), 0.0, 1.0)
    tumour = probability > threshold
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
    """

    def __init__(self, model, *, threshold: float = 0.5, tta: bool = False, batch_size: int = 8) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend: Backend = model if isinstance(model, (TFLiteBackend, OnnxBackend, KerasBackend)) else KerasBackend(model)
        self.threshold = float(threshold)
        self.tta = bool(tta)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, source: str | Path, *, num_threads: int | None = None, **kwargs) -> Predictor:
        """From a ``.keras`` file, an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``),
        or an exported ``.tflite`` / ``.onnx`` file."""
        text = str(source)
        suffix = Path(text).suffix.lower()
        if suffix in RUNTIME_SUFFIXES and "://" not in text and not text.startswith(("runs:/", "models:/")):
            if not Path(text).is_file():
                raise FileNotFoundError(f"model {text} does not exist")
            backend = TFLiteBackend(text, num_threads) if suffix == ".tflite" else OnnxBackend(text, num_threads)
            return cls(backend, **kwargs)
        return cls(load_keras_model(text), **kwargs)

    @property
    def model(self):
        """The Keras model (``None`` when running an exported .tflite/.onnx file)."""
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
                results.append(summarise(probability, self.threshold))
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
