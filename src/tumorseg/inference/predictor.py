"""The one prediction path: image -> model input size -> back-end (with flip TTA) -> probability
at the image's own size -> threshold -> small-blob filter.

``predict``, ``serve``, ``explain``, the export check, ``evaluate`` and the ensemble scripts all go
through :class:`Predictor`: evaluation takes its :meth:`Predictor.probability_maps` and cuts them
with the same :class:`PostProcessing`, so the number in a model card comes from exactly the code
a user runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tumorseg.errors import SequenceMismatch
from tumorseg.images import to_gray_uint8
from tumorseg.inference.backends import Backend, as_backend, load_backend


@dataclass
class Prediction:
    """One image's segmentation, at the image's original size."""

    probability: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # uint8 (H, W) in {0, 255}: probability > threshold, small blobs removed
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


@dataclass(frozen=True)
class PostProcessing:
    """Probability map -> binary mask: tumour where probability > ``threshold``, then blobs
    smaller than ``min_component_px`` (at the image's own size) dropped."""

    threshold: float = 0.5
    min_component_px: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.min_component_px < 0:
            raise ValueError(f"min_component_px must be at least 0, got {self.min_component_px}")

    def mask(self, probability: np.ndarray) -> np.ndarray:
        """Boolean tumour mask of one probability map."""
        return remove_small_components(probability > self.threshold, self.min_component_px)

    def __call__(self, probability: np.ndarray) -> Prediction:
        """The mask with its measurements (area, mean confidence)."""
        probability = np.clip(probability.astype(np.float32, copy=False), 0.0, 1.0)
        tumour = self.mask(probability)
        area = int(np.count_nonzero(tumour))
        return Prediction(
            probability=probability,
            mask=tumour.astype(np.uint8) * 255,
            tumour_present=area > 0,
            area_px=area,
            area_pct=100.0 * area / probability.size,
            mean_confidence=float(probability[tumour].mean()) if area else 0.0,
        )


def summarise(probability: np.ndarray, threshold: float, min_component_px: int = 0) -> Prediction:
    """Threshold a probability map, drop blobs under ``min_component_px`` and measure the tumour."""
    return PostProcessing(threshold, min_component_px)(probability)


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """Area interpolation when shrinking (no aliasing), linear when enlarging - as in prepare
    (a multi-sequence ``(H, W, C)`` stack plane by plane)."""
    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_probability(probability: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A model-size probability map back at an image's ``(H, W)`` (linear)."""
    if probability.shape == shape:
        return probability
    return cv2.resize(probability, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def average_maps(members: Sequence[Sequence[np.ndarray]], weights: Sequence[float] | None = None) -> list[np.ndarray]:
    """Per image, the mean of several models' probability maps at the image's size (members
    added in the order given, so the same maps always give the same bits). ``weights``: a
    weighted mean instead; equal weights give exactly the plain mean."""
    if len({len(maps) for maps in members}) != 1:
        raise ValueError("ensemble members predicted different numbers of images")
    if weights is not None and len(weights) != len(members):
        raise ValueError(f"{len(weights)} weights for {len(members)} ensemble members")
    if weights is not None and len(set(weights)) == 1:
        weights = None
    out = []
    for per_image in zip(*members):
        total = np.zeros_like(per_image[0], dtype=np.float32)
        if weights is None:
            for probability in per_image:
                total += probability
            out.append(total / np.float32(len(per_image)))
        else:
            for weight, probability in zip(weights, per_image):
                total += np.float32(weight) * probability
            out.append(total / np.float32(sum(weights)))
    return out


class Predictor:
    """Segment images of any size with one model (Keras, MLflow, TFLite or ONNX) or the mean of
    several (an ensemble).

    Each image is resized to a model's square input (area interpolation when shrinking, linear
    when enlarging; the same rule as prepare), run in batches of ``batch_size``, and its
    probability map resized back (linear) to the image's size; an ensemble averages its members'
    maps there, each member at its own input size. ``tta``: the mean of the image's and its
    mirror image's probabilities (mirrored back), exactly flip-equivariant. ``threshold`` and
    ``min_component_px``: see :class:`PostProcessing`. A TFLite back-end is not thread-safe: give
    each thread its own Predictor (or hold a lock).
    """

    def __init__(self, model, *, threshold: float = 0.5, tta: bool = False, batch_size: int = 8, min_component_px: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.post = PostProcessing(float(threshold), int(min_component_px))
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not models:
            raise ValueError("a predictor needs at least one model")
        self.members: list[Backend] = [as_backend(m) for m in models]
        declared = {tuple(getattr(member, "sequences", ())) for member in self.members}
        if len(declared) > 1:
            described = " vs ".join(", ".join(seqs) or "one grayscale image" for seqs in sorted(declared))
            raise ValueError(f"the models of an ensemble must take the same input: {described}")
        self.sequences: tuple[str, ...] = declared.pop()  # () = one grayscale image
        self.tta = bool(tta)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, source: str | Path | Sequence[str | Path], *, num_threads: int | None = None, **kwargs) -> Predictor:
        """From a ``.keras`` file, an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``),
        or an exported ``.tflite`` / ``.onnx`` file; several of them: their mean (an ensemble)."""
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        return cls([load_backend(s, num_threads=num_threads) for s in sources], **kwargs)

    @property
    def threshold(self) -> float:
        return self.post.threshold

    @property
    def min_component_px(self) -> int:
        return self.post.min_component_px

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def backend(self) -> Backend:
        """The one back-end of a single-model predictor."""
        if self.is_ensemble:
            raise ValueError(f"an ensemble of {len(self.members)} models has no single back-end: see .members")
        return self.members[0]

    @property
    def name(self) -> str:
        """``keras``, ``tflite``, ``onnx``, or ``ensemble(keras+keras)``."""
        names = [member.name for member in self.members]
        return names[0] if len(names) == 1 else "ensemble(" + "+".join(names) + ")"

    @property
    def model(self):
        """The Keras model (``None`` for an exported .tflite/.onnx file or an ensemble)."""
        return None if self.is_ensemble else getattr(self.members[0], "model", None)

    @property
    def input_size(self) -> int:
        """The model's input side; for an ensemble the largest of its members'."""
        return max(member.input_size for member in self.members)

    @property
    def channels(self) -> int:
        return max(1, len(self.sequences))

    def model_probabilities(self, backend: Backend, batch: np.ndarray) -> np.ndarray:
        """Model-size probabilities ``(N, S, S)`` of one back-end for a float32 ``(N, S, S, C)``
        raw-pixel batch at its input size, with flip TTA when asked."""
        if not self.tta:
            return backend(batch)[..., 0]
        both = backend(np.concatenate([batch, batch[:, :, ::-1]], axis=0))[..., 0]
        plain, mirrored = both[: len(batch)], both[len(batch) :, :, ::-1]
        return (plain + mirrored) / 2.0  # a + b == b + a exactly: flip-equivariant to the last bit

    def _member_maps(self, backend: Backend, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        size = backend.input_size
        batch = np.stack([resize_to_input(image, size) for image in images]).astype(np.float32)
        if batch.ndim == 3:  # one grayscale channel
            batch = batch[..., None]
        return [resize_probability(p, image.shape[:2]) for p, image in zip(self.model_probabilities(backend, batch), images)]

    def probability_maps(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Tumour probability ``(H, W)`` float32 for uint8 images of any sizes, each at its image's
        size, before thresholding: what evaluation scores and tunes on. Images are grayscale
        ``(H, W)``, or ``(H, W, C)`` with one channel per sequence of a multi-sequence model."""
        maps: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [self.as_input(image, start + i) for i, image in enumerate(images[start : start + self.batch_size])]
            per_member = [self._member_maps(member, chunk) for member in self.members]
            maps += per_member[0] if len(per_member) == 1 else average_maps(per_member)
        return maps

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Segment uint8 images of any sizes (see :meth:`probability_maps`); results at each image's size."""
        return [self.post(probability) for probability in self.probability_maps(images)]

    def as_input(self, image: np.ndarray, index: int = 0) -> np.ndarray:
        """An image as the model takes it: uint8 ``(H, W)`` for a grayscale model (colour, 16-bit
        and float converted as prepare converts them), uint8 ``(H, W, C)`` with one plane per
        sequence for a multi-sequence model."""
        if not self.sequences:
            return as_gray(image, index)
        return as_sequence_stack(image, self.sequences, index)


def as_gray(image: np.ndarray, index: int = 0) -> np.ndarray:
    """A uint8 ``(H, W)`` image, converted from colour/16-bit/float as prepare converts it."""
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


def as_sequence_stack(image: np.ndarray, sequences: Sequence[str], index: int = 0) -> np.ndarray:
    """A uint8 ``(H, W, C)`` stack with one plane per sequence (each plane converted as prepare
    converts a grayscale image); anything else is refused naming the sequences the model expects."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != len(sequences):
        got = "a single image" if image.ndim == 2 else f"shape {image.shape}"
        raise SequenceMismatch(
            f"image {index}: the model takes {len(sequences)} sequences ({', '.join(sequences)}) stacked as (H, W, {len(sequences)}), got {got}"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image {index}: empty array of shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    return np.stack([to_gray_uint8(image[:, :, channel]) for channel in range(image.shape[2])], axis=-1)
