"""Inference: segment any user image with a saved model, masks back at the image's own size.

- :mod:`~tumorseg.inference.backends`: Keras / MLflow / TFLite / ONNX models behind one call.
- :mod:`~tumorseg.inference.predictor`: the one prediction path (resize, flip TTA, resize back,
  threshold, blob filter) that predict, serve, explain, export checks and evaluation share.
- :mod:`~tumorseg.inference.cache`: each model's probability maps of a split, computed once.
- :mod:`~tumorseg.inference.batch`: files, folders and zips in; masks, overlays and a CSV out.
- :mod:`~tumorseg.inference.scans`: per-sequence folders and NIfTI volumes for multi-sequence models.

Untrusted bytes are decoded by :mod:`tumorseg.images` (re-exported names below for callers that
predate it).
"""

from tumorseg.images import (
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
from tumorseg.inference.backends import (
    RUNTIME_SUFFIXES,
    Backend,
    KerasBackend,
    ModelLoadError,
    OnnxBackend,
    TFLiteBackend,
    load_backend,
    model_file_problem,
    open_keras_model,
    tflite_interpreter,
)
from tumorseg.inference.batch import (
    CSV_COLUMNS,
    ImageReader,
    InputListing,
    InputSource,
    PredictReport,
    list_inputs,
    predict_files,
    unique_stems,
)
from tumorseg.inference.cache import PredictedSplit, PredictionCache
from tumorseg.inference.predictor import (
    PostProcessing,
    Prediction,
    Predictor,
    average_maps,
    remove_small_components,
    resize_probability,
    resize_to_input,
    summarise,
)
from tumorseg.inference.scans import SliceInput, VolumeInput, list_scan_inputs, read_slice

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "MAX_DECODE_BYTES",
    "MAX_FILE_BYTES",
    "RUNTIME_SUFFIXES",
    "SUPPORTED_FORMATS",
    "TOO_LARGE",
    "Backend",
    "ImageReader",
    "InputImageError",
    "InputListing",
    "InputSource",
    "KerasBackend",
    "ModelLoadError",
    "OnnxBackend",
    "PostProcessing",
    "PredictReport",
    "PredictedSplit",
    "Prediction",
    "PredictionCache",
    "Predictor",
    "TFLiteBackend",
    "SliceInput",
    "VolumeInput",
    "average_maps",
    "decode_image",
    "list_inputs",
    "list_scan_inputs",
    "load_backend",
    "model_file_problem",
    "open_keras_model",
    "predict_files",
    "read_file_bytes",
    "read_image",
    "read_slice",
    "remove_small_components",
    "resize_probability",
    "resize_to_input",
    "summarise",
    "tflite_interpreter",
    "to_gray_uint8",
    "unique_stems",
]
