"""Machine-readable model cards: ``<model>.card.json`` beside a shipped model file.

A card records what a model was trained on (sequences, data source and hash, licence), how it
scored, and the inference settings chosen on its validation split (threshold, smallest kept blob,
flip TTA, what to do with a missing sequence). ``tumorseg predict / explain / serve --model
weights/<name>.keras`` start from those settings, so the plain command runs the model the way it
was scored (as nnU-Net keeps its post-processing beside the checkpoint and a MONAI bundle its
inference config); a flag given on the command line always wins.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from tumorseg.errors import ModelCardError

CARD_SUFFIX = ".card.json"
CARD_SCHEMA = "tumorseg.model-card/1"


@dataclass(frozen=True)
class InferenceSettings:
    """How to turn a model's probabilities into masks (the defaults: no card)."""

    threshold: float = 0.5
    min_component_px: int = 0
    tta: bool = False
    missing_sequences: Literal["skip", "fill"] = "skip"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if int(self.min_component_px) < 0:
            raise ValueError(f"min_component_px must be at least 0, got {self.min_component_px}")
        if self.missing_sequences not in ("skip", "fill"):
            raise ValueError(f"missing_sequences must be skip or fill, got {self.missing_sequences!r}")

    def describe(self) -> str:
        parts = [f"threshold {self.threshold:g}", "flip TTA" if self.tta else "no TTA"]
        if self.min_component_px:
            parts.append(f"blobs < {self.min_component_px} px dropped")
        if self.missing_sequences == "fill":
            parts.append("a missing sequence filled with zeros")
        return ", ".join(parts)


def card_path(model_path: str | Path) -> Path:
    """``weights/x.keras`` -> ``weights/x.card.json`` (also for ``.tflite`` / ``.onnx`` exports)."""
    path = Path(model_path)
    return path.with_name(path.stem + CARD_SUFFIX)


def read_card(model_path: str | Path) -> dict | None:
    """The card beside a local model file, or None when there is none (MLflow URIs have none)."""
    text = str(model_path)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        return None
    path = card_path(text)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: not a readable model card ({exc})") from exc
    if not isinstance(card, dict) or card.get("schema") != CARD_SCHEMA:
        raise ModelCardError(f"{path}: not a tumorseg model card (expected \"schema\": \"{CARD_SCHEMA}\")")
    return card


def card_settings(card: dict, where: str | Path = "model card") -> InferenceSettings:
    known = {f.name for f in fields(InferenceSettings)}
    section = card.get("inference", {})
    unknown = sorted(set(section) - known)
    if unknown:
        raise ModelCardError(f"{where}: unknown inference setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return InferenceSettings(**section)
    except (TypeError, ValueError) as exc:
        raise ModelCardError(f"{where}: inference: {exc}") from exc


def settings_for(models: Sequence[str | Path]) -> tuple[InferenceSettings, str]:
    """The inference settings the models' cards give, and a line saying where they came from.

    An ensemble takes its members' settings only when every member has a card and they agree;
    otherwise (or without cards) the defaults, said so."""
    settings = []
    for model in models:
        card = read_card(model)
        settings.append(None if card is None else card_settings(card, card_path(model)))
    if not any(settings):
        return InferenceSettings(), ""
    if None in settings or len(set(settings)) > 1:
        return InferenceSettings(), "the models' cards give different inference settings: defaults used (pass them as flags)"
    named = ", ".join(str(card_path(m)) for m in models)
    return settings[0], f"settings from {named}: {settings[0].describe()}"


def merge(card: InferenceSettings, **given) -> InferenceSettings:
    """The card's settings with every setting given explicitly (not None) put over them."""
    return InferenceSettings(**(asdict(card) | {key: value for key, value in given.items() if value is not None}))
