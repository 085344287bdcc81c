"""Model back-ends: a Keras model, a TFLite or an ONNX file behind one call.

A back-end maps a float32 ``(N, S, S, C)`` raw-pixel batch at its own input size ``S`` to
``(N, S, S, 1)`` probabilities; everything around that call (resizing, test-time augmentation,
thresholding) is the predictor's, so every back-end is post-processed by the same code. ``C`` is 1
for a grayscale model, or one channel per MRI sequence, which the back-end reads from its input's
name (:mod:`tumorseg.models.inputs`) as ``sequences``.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tumorseg.errors import ModelLoadError  # noqa: F401 - raised here, defined with the other user errors
from tumorseg.models.inputs import INPUT_NAME, sequences_in

RUNTIME_SUFFIXES = (".tflite", ".onnx")
MODEL_HINT = "give a .keras file, runs:/<run id>/model or models:/<name>/<version>"


class Backend(Protocol):
    """Runs a float32 ``(N, S, S, C)`` raw-pixel batch to ``(N, S, S, 1)`` probabilities."""

    input_size: int
    name: str
    sequences: tuple[str, ...]  # the MRI sequence of each input channel; () = one grayscale channel

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def _square_side(shape: Sequence[Any], where: str) -> int:
    height, width = shape[1], shape[2]
    if height is None or width is None or height != width or int(height) <= 0:
        raise ValueError(f"{where}: expected a fixed square input (N, S, S, C), got {tuple(shape)}")
    return int(height)


def _declared_sequences(input_name: str, shape: Sequence[Any], where: str) -> tuple[str, ...]:
    """The input's sequences, checked against its channel count."""
    sequences = sequences_in(input_name)
    channels = shape[3] if len(shape) == 4 else None
    if channels is not None and int(channels) != max(1, len(sequences)):
        if sequences:
            raise ModelLoadError(f"{where}: its input names {len(sequences)} sequences ({', '.join(sequences)}) but has {int(channels)} channels")
        raise ModelLoadError(f"{where}: its input has {int(channels)} channels but does not name their MRI sequences (input {input_name!r})")
    return sequences


def _keras_input_name(model) -> str:
    """The name of a Keras model's (first) input; ``image`` for a model-like object without one."""
    try:
        return str(model.inputs[0].name)
    except (AttributeError, IndexError, TypeError):
        return INPUT_NAME


class KerasBackend:
    name = "keras"

    def __init__(self, model) -> None:
        self.model = model
        self.input_size = _square_side(model.input_shape, "model")
        self.sequences = _declared_sequences(_keras_input_name(model), model.input_shape, "model")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # predict_on_batch runs a compiled graph function: no per-call Python overhead of model.predict.
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


def tflite_interpreter(path: str | Path, num_threads: int | None = None):
    """A TFLite interpreter for ``path`` (``ai_edge_litert`` when installed, else ``tf.lite``)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice (it still works in TF 2.21)
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


class TFLiteBackend:
    name = "tflite"

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        self.path = Path(path)
        self.interpreter = tflite_interpreter(self.path, num_threads=num_threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.input_size = _square_side(self._input["shape"], str(path))
        self.sequences = _declared_sequences(self._input["name"], list(self._input["shape"]), str(path))
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
        self.sequences = _declared_sequences(self._input.name, self._input.shape, str(path))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self._input.name: batch})[0], dtype=np.float32)


def is_uri(source: str | Path) -> bool:
    text = str(source)
    return "://" in text or text.startswith(("runs:/", "models:/"))


def open_keras_model(source: str | Path):
    """A Keras model from a ``.keras``/``.h5`` file or an MLflow URI (``runs:/``, ``models:/``),
    with every problem said in one line naming the file. A U-Net saved before issue 23 (custom
    HAC/CASPP layer classes) comes back as the stock-layer graph with the same weights."""
    if is_uri(source):
        from tumorseg import tracking
        from tumorseg.models import to_portable

        return to_portable(tracking.load_keras_model(str(source)))  # a model logged before issue 23: the stock-layer graph
    path = Path(source)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file ({MODEL_HINT})")
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist ({MODEL_HINT})")
    problem = model_file_problem(path)
    if problem:
        raise ModelLoadError(f"{path}: {problem}")

    import keras

    from tumorseg.models import to_portable  # the import registers the legacy layers of older files

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError/OSError/zipfile errors for a bad file
        detail = " ".join(str(exc).split())[:200]
        raise ModelLoadError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {detail})") from None
    return to_portable(model)  # a U-Net saved before issue 23 (HACBlock/CASPPBlock layers): the same model as stock layers


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
        return (
            "truncated or corrupt zip archive (its directory at the end is missing)"
            if head.startswith(b"PK")
            else "not a Keras model archive (not a zip file)"
        )
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


def load_backend(source: str | Path, *, num_threads: int | None = None) -> Backend:
    """The back-end for one model: a ``.keras`` file or MLflow URI, or an exported ``.tflite`` /
    ``.onnx`` file."""
    text = str(source)
    suffix = Path(text).suffix.lower()
    if suffix in RUNTIME_SUFFIXES and not is_uri(text):
        if not Path(text).is_file():
            raise FileNotFoundError(f"model {text} does not exist")
        try:
            return TFLiteBackend(text, num_threads) if suffix == ".tflite" else OnnxBackend(text, num_threads)
        except Exception as exc:  # runtimes raise RuntimeError/ValueError/their own types for a bad file
            raise ModelLoadError(f"{text} is not a loadable {suffix[1:]} model ({type(exc).__name__}: {str(exc)[:200]})") from None
    return KerasBackend(open_keras_model(text))


def as_backend(model) -> Backend:
    """A back-end as is; a Keras model wrapped in one."""
    if callable(model) and hasattr(model, "input_size") and hasattr(model, "name") and not hasattr(model, "predict_on_batch"):
        return model
    return KerasBackend(model)
