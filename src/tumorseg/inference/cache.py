"""Each model's probability maps of a set of images, computed once.

The evaluate stage scores every model and then their ensemble, and tunes post-processing on the
validation split; ``scripts/ensemble_weights.py`` scores many weightings of the same members. All
of them read a model's maps from one :class:`PredictionCache`; an ensemble's maps are the mean of
its members' (:func:`~tumorseg.inference.predictor.average_maps`, exactly what a multi-model
:class:`~tumorseg.inference.predictor.Predictor` computes), so no model runs twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.inference.predictor import Predictor, average_maps
from tumorseg.io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class PredictedSplit:
    """A model's probability maps of named images, each at its image's size."""

    names: list[str]
    probabilities: list[np.ndarray]  # float32 (H, W) per image
    ms_per_image: float  # prediction time (for an ensemble: the sum of its members')


def predict_timed(predictor: Predictor, names: Sequence[str], images: Sequence[np.ndarray]) -> PredictedSplit:
    """``predictor``'s probability maps of ``images``, timed after one warm-up image (graph tracing)."""
    if len(images):
        predictor.probability_maps(images[:1])
    started = time.perf_counter()
    maps = predictor.probability_maps(images)
    ms = 1000.0 * (time.perf_counter() - started) / max(1, len(images))
    return PredictedSplit(list(names), maps, ms)


def mean_of(members: Sequence[PredictedSplit]) -> PredictedSplit:
    """An ensemble's maps from its members' maps of the same images."""
    first = members[0]
    for other in members[1:]:
        if other.names != first.names:
            raise ValueError("ensemble members were predicted on different images")
    return PredictedSplit(first.names, average_maps([m.probabilities for m in members]), sum(m.ms_per_image for m in members))


class PredictionCache:
    """Maps by (model identity, prediction settings, image names); with ``folder``, also on disk
    (``.npz``, float32, the exact values) so that a script run again skips the models. The key
    includes everything that changes a map, so a stale entry is never found, only recomputed."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, PredictedSplit] = {}

    @staticmethod
    def fingerprint(model_identity: str, predictor: Predictor, names: Sequence[str]) -> str:
        settings = f"tta={predictor.tta};batch={predictor.batch_size};sizes={[m.input_size for m in predictor.members]}"
        return hashlib.sha256("\n".join([model_identity, settings, *names]).encode()).hexdigest()[:24]

    def get(self, model_identity: str, predictor: Predictor, names: Sequence[str], images: Sequence[np.ndarray], *, label: str = "") -> PredictedSplit:
        """``predictor``'s maps of ``images``: from the cache, or predicted now and kept.
        ``model_identity`` names the weights (e.g. the model file's sha256)."""
        key = self.fingerprint(model_identity, predictor, names)
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{label + '-' if label else ''}{key}.npz" if self.folder is not None else None
        if path is not None and path.is_file():
            with np.load(path) as stored:
                count = int(stored["count"])
                entry = PredictedSplit(list(names), [stored[f"p{i}"] for i in range(count)], float(stored["ms_per_image"]))
            log.info("%s: %d probability maps from %s", label or key, count, path)
        else:
            entry = predict_timed(predictor, names, images)
            if path is not None:
                import io

                buffer = io.BytesIO()
                np.savez_compressed(
                    buffer,
                    count=len(entry.probabilities),
                    ms_per_image=entry.ms_per_image,
                    **{f"p{i}": p for i, p in enumerate(entry.probabilities)},
                )
                atomic_write_bytes(path, buffer.getvalue())
        self._memory[key] = entry
        return entry
