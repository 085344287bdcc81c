"""Export a trained Keras model to TFLite or ONNX, and prove the export still segments the same.

Every export is checked against the Keras model it came from, on sample images (synthetic
phantoms by default, or the user's own): the binary masks of both must agree (Dice) above a bound
that depends on the quantisation — float exports must match (Dice >= 0.99); quantised exports
trade a little agreement for size and speed, with bounds measured on trained models (README). The
check result, the file size and ms/image are written beside the export as ``<out>.check.json``.
An export that fails its check is not put in place.

Conversions: TFLite through ``tf.lite.TFLiteConverter`` from a SavedModel exported by Keras (the
direct concrete-function route leaves unresolved resource variables in TF 2.21); ONNX through
``tf2onnx`` from a ``tf.function`` with a dynamic batch dimension, quantised with
``onnxruntime.quantization``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.errors import ExportError  # noqa: F401 - raised here, defined with the other user errors
from tumorseg.images import DEFAULT_MAX_PIXELS, InputImageError, list_image_files, read_image
from tumorseg.inference import Predictor, resize_to_input
from tumorseg.inference.scans import list_scan_inputs, read_slice
from tumorseg.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

FORMATS = ("tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
ONNX_QUANTIZATIONS = ("none", "dynamic", "int8")

# Minimum mean per-image Dice between the export's masks and the Keras model's masks.
# Float exports compute the same function up to rounding. Quantised bounds: see the README
# ("Use a trained model") for the values measured on trained models; these leave a margin.
DICE_BOUNDS = {"none": 0.99, "float16": 0.99, "dynamic": 0.95, "int8": 0.90}


# --------------------------------------------------------------------------------------------
# Sample images for calibration and checking
# --------------------------------------------------------------------------------------------


def sample_images(size: int, count: int = 16, *, seed: int = 0, folder: str | Path | None = None, sequences: Sequence[str] = ()) -> list[np.ndarray]:
    """``count`` uint8 images: synthetic MRI-like phantoms, or images read from ``folder``
    (recursively, sorted; unreadable files are skipped with a warning). A multi-sequence model
    (``sequences``) gets ``(H, W, C)`` stacks: multi-sequence phantoms, or the slices of a
    per-sequence ``folder`` (``folder/<sequence>/*.png``)."""
    if folder is None:
        if sequences:
            from tumorseg.data.synthetic import make_sequence_phantom, sequence_styles

            styles = sequence_styles(tuple(sequences))
            stacks = []
            for index in range(count):
                rng = np.random.default_rng(np.random.SeedSequence([seed, index, len(styles)]))
                stacks.append(np.stack(make_sequence_phantom(rng, max(size, 32), styles, tumour=True)[0], axis=-1))
            return stacks
        from tumorseg.data.synthetic import phantom_for_index

        return [phantom_for_index(seed, index, max(size, 32))[0] for index in range(count)]
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration folder {root} does not exist")
    images = []
    if sequences:
        for item in list_scan_inputs([root], sequences).slices:
            try:
                images.append(read_slice(item, sequences, "skip", DEFAULT_MAX_PIXELS))
            except InputImageError as exc:
                log.warning("calibration: skipped %s", exc)
            if len(images) == count:
                break
    else:
        for path in list_image_files(root, recursive=True):
            try:
                images.append(read_image(path))
            except InputImageError as exc:
                log.warning("calibration: skipped %s", exc)
            if len(images) == count:
                break
    if not images:
        wanted = f"slices in {', '.join(f'{s}/' for s in sequences)} sub-folders of" if sequences else "images (PNG, JPEG, BMP, TIFF) in"
        raise ExportError(f"no readable {wanted} calibration folder {root}")
    return images


def check_and_calibration_images(
    size: int, count: int, *, seed: int = 0, folder: str | Path | None = None, sequences: Sequence[str] = ()
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images to check an export on, and separate images to calibrate int8 on (so the check does
    not flatter the calibration): other phantoms, or the other half of ``folder``'s images (the
    same images only when the folder has fewer than 2 x 4)."""
    if folder is None:
        return sample_images(size, count, seed=seed, sequences=sequences), sample_images(size, count, seed=seed + 1, sequences=sequences)
    images = sample_images(size, 2 * count, folder=folder, sequences=sequences)
    if len(images) < 8:
        return images, images
    return images[0::2], images[1::2]


def _model_batches(images: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """Batches of one ``(1, S, S, C)`` float32 image each."""
    batches = []
    for image in images:
        resized = resize_to_input(image, size).astype(np.float32)
        batches.append(resized[None, :, :, None] if resized.ndim == 2 else resized[None])
    return batches


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _input_size(model) -> int:
    side = model.input_shape[1]
    if side is None or side != model.input_shape[2]:
        raise ExportError(f"export needs a model with a fixed square input, got {model.input_shape}")
    return int(side)


def to_tflite(model, quantize: str = "none", calibration: Sequence[np.ndarray] = ()) -> bytes:
    """TFLite flatbuffer with a dynamic batch dimension and float32 input/output.

    ``float16``: float16 weights; ``dynamic``: int8 weights, float activations; ``int8``: int8
    weights and activations calibrated on ``calibration`` images (ops without an int8 kernel stay
    float), float32 in and out so callers need not know the scales.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="tumorseg-export-") as scratch:
        saved = Path(scratch) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            if not len(calibration):
                raise ExportError("int8 quantisation needs calibration images")
            batches = _model_batches(calibration, _input_size(model))
            converter.representative_dataset = lambda: ([batch] for batch in batches)
        return converter.convert()


def to_onnx(model, quantize: str = "none", calibration: Sequence[np.ndarray] = (), opset: int = 17) -> bytes:
    """ONNX model (dynamic batch) via tf2onnx; ``dynamic``/``int8`` quantised with onnxruntime."""
    import tensorflow as tf
    import tf2onnx

    size = _input_size(model)
    input_name = model.inputs[0].name  # carries a multi-sequence model's sequences into the ONNX file
    signature = [tf.TensorSpec([None, size, size, int(model.input_shape[-1])], tf.float32, name=input_name)]

    @tf.autograph.experimental.do_not_convert
    def forward(image):
        return model(image, training=False)

    function = tf.function(forward, input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    data = proto.SerializeToString()
    if quantize == "none":
        return data
    with tempfile.TemporaryDirectory(prefix="tumorseg-export-") as scratch:
        source, target = Path(scratch) / "float.onnx", Path(scratch) / "quantized.onnx"
        source.write_bytes(data)
        _quantize_onnx(source, target, quantize, calibration, size, input_name)
        return target.read_bytes()


def _quantize_onnx(source: Path, target: Path, quantize: str, calibration: Sequence[np.ndarray], size: int, input_name: str = "image") -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    if quantize == "dynamic":
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
        return
    if not len(calibration):
        raise ExportError("int8 quantisation needs calibration images")
    batches = _model_batches(calibration, size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter({input_name: batch} for batch in batches)

        def get_next(self):
            return next(self._items, None)

    quantize_static(str(prepared), str(target), Reader(), per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


# --------------------------------------------------------------------------------------------
# Runtime helpers
# --------------------------------------------------------------------------------------------


def ms_per_image(run: Callable[[np.ndarray], Any], batches: Sequence[np.ndarray], repeats: int = 1) -> float:
    """Median over ``repeats`` of the mean ms per image of ``run`` over ``batches`` (after one warm-up)."""
    run(batches[0])
    timings = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for batch in batches:
            run(batch)
        timings.append(1000.0 * (time.perf_counter() - started) / sum(len(b) for b in batches))
    return float(np.median(timings))


# --------------------------------------------------------------------------------------------
# Check and export
# --------------------------------------------------------------------------------------------


def compare_predictors(reference: Predictor, candidate: Predictor, images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Agreement of two predictors on ``images``: mask Dice (per image and pooled), probability
    differences, and the share of images whose tumour/no-tumour call differs."""
    from tumorseg.metrics import dice

    expected, actual = reference.predict(images), candidate.predict(images)
    dices = [dice(a.mask > 0, b.mask > 0) for a, b in zip(expected, actual)]
    differences = np.concatenate([np.abs(a.probability - b.probability).ravel() for a, b in zip(expected, actual)])
    pooled = dice(np.concatenate([a.mask.ravel() for a in expected]) > 0, np.concatenate([b.mask.ravel() for b in actual]) > 0)
    return {
        "images": len(images),
        "dice_mean": float(np.mean(dices)),
        "dice_min": float(np.min(dices)),
        "dice_pooled": float(pooled),
        "max_abs_probability_difference": float(differences.max()),
        "mean_abs_probability_difference": float(differences.mean()),
        "tumour_call_disagreements": int(sum(a.tumour_present != b.tumour_present for a, b in zip(expected, actual))),
        "reference_tumour_pixels": int(sum(a.area_px for a in expected)),
    }


@dataclass
class ExportResult:
    path: Path
    check_path: Path
    check: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.check["passed"])


def export_model(
    source: str | Path,
    fmt: str,
    out: str | Path,
    *,
    quantize: str = "none",
    calibration_dir: str | Path | None = None,
    sample_count: int = 16,
    min_dice: float | None = None,
    timing_repeats: int = 3,
    seed: int = 0,
) -> ExportResult:
    """Export the Keras model at ``source`` (file or MLflow URI) to ``out`` and check it.

    The export is written beside ``out`` first, checked against the Keras model on
    ``sample_count`` images (phantoms, or ``calibration_dir``; int8 calibrates on other images),
    and moved into place only if mean Dice >= ``min_dice`` (default :data:`DICE_BOUNDS`).
    ``<out>.check.json`` is written either way. Raises :class:`ExportError` on a failed check.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    allowed = QUANTIZATIONS if fmt == "tflite" else ONNX_QUANTIZATIONS
    if quantize not in allowed:
        raise ExportError(f"--quantize {quantize} is not available for {fmt}; choose one of {', '.join(allowed)}")
    out = Path(out)
    bound = DICE_BOUNDS[quantize] if min_dice is None else float(min_dice)
    reference = Predictor.load(source)
    size = reference.input_size
    images, calibration = check_and_calibration_images(size, sample_count, seed=seed, folder=calibration_dir, sequences=reference.sequences)

    started = time.perf_counter()
    convert = to_tflite if fmt == "tflite" else to_onnx
    params = reference.model.count_params()
    log.info(
        "export: converting %s (%s parameters) to %s, quantize %s: a minute or two for a few million parameters on 2 cores ...",
        source,
        f"{params:,}",
        fmt,
        quantize,
    )
    with quiet_converter_logs():
        data = convert(reference.model, quantize, calibration)
    convert_seconds = time.perf_counter() - started
    log.info("export: converted in %.0f s (%.1f MB); checking it against the Keras model on %d images ...", convert_seconds, len(data) / 2**20, len(images))

    check_path = out.with_name(out.name + ".check.json")
    staged = atomic_write_bytes(out.with_name(f".{out.name}.staged{out.suffix}"), data)
    try:
        candidate = Predictor.load(staged)
        agreement = compare_predictors(reference, candidate, images)
        batches = _model_batches(images, size)
        check = {
            "source": str(source),
            "format": fmt,
            "quantize": quantize,
            "path": str(out),
            "size_bytes": len(data),
            "size_mb": round(len(data) / 2**20, 3),
            "input_size": size,
            "sequences": list(reference.sequences),
            "sample_images": "synthetic phantoms" if calibration_dir is None else str(calibration_dir),
            "calibration_images": len(calibration) if quantize == "int8" else 0,
            "calibration_is_check_set": quantize == "int8" and calibration is images,
            **agreement,
            "min_dice": bound,
            "passed": agreement["dice_mean"] >= bound,
            "ms_per_image_export": round(ms_per_image(candidate.backend, batches, timing_repeats), 3),
            "ms_per_image_keras": round(ms_per_image(reference.backend, batches, timing_repeats), 3),
            "timing": f"batch 1, mean over {len(batches)} images, median of {timing_repeats} repeats, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
            "convert_seconds": round(convert_seconds, 2),
        }
        atomic_write_json(check_path, check)
        if not check["passed"]:
            raise ExportError(
                f"{fmt} export ({quantize}) does not match the Keras model: mean mask Dice {agreement['dice_mean']:.4f} < {bound} "
                f"on {len(images)} images; nothing written to {out} (details in {check_path})"
            )
        os.replace(staged, out)
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
    return ExportResult(out, check_path, check)


@contextlib.contextmanager
def quiet_converter_logs() -> Iterator[None]:
    """The converters log every step at INFO (onnxruntime's quantiser on the root logger): keep
    the command's output to its one result line."""
    names = ("", "tensorflow", "tf2onnx", "absl")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(max(logging.WARNING, levels[name]))
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
