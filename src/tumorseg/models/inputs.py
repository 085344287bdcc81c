"""What a model's input carries besides pixels: the MRI sequences of its channels, in order.

A model trained on multi-sequence slices names its input ``image__t1__flair__t1ce``; a model for
one grayscale image keeps the plain name ``image``. The name is part of the Keras file (no custom
metadata that a plain ``keras.models.load_model`` would drop) and survives into the TFLite and ONNX
exports as their input tensor's name, so every backend can tell which sequences a model expects.
"""

from __future__ import annotations

from collections.abc import Sequence

INPUT_NAME = "image"
_SEPARATOR = "__"  # sequence names cannot hold it (config.SEQUENCE_NAME)


def input_name(sequences: Sequence[str] = ()) -> str:
    return _SEPARATOR.join((INPUT_NAME, *sequences))


def sequences_in(name: str) -> tuple[str, ...]:
    """The sequences an input tensor name declares (``()``: one grayscale image). Works on Keras
    names and on the names converters derive from them (``serving_default_image__t1__flair:0``)."""
    base = name.split(":")[0]
    marker = INPUT_NAME + _SEPARATOR
    at = base.rfind(marker)
    if at < 0:
        return ()
    return tuple(part for part in base[at + len(marker) :].split(_SEPARATOR) if part)
