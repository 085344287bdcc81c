"""Score weighted ensembles of trained models: is equal weighting leaving Dice on the table?

Each member predicts the validation and test splits once through the shipped prediction path
(``tumorseg.inference.Predictor`` with flip TTA, batch size from ``params.yaml``), kept in
``--cache`` by the same :class:`~tumorseg.inference.PredictionCache` the evaluate stage uses;
every combination then picks its threshold / blob filter on validation and is scored on test by
``tumorseg.evaluation.evaluate_split``, as ``evaluate`` scores the ensemble (its equal-weight row
reproduces ``metrics/evaluate_ensemble.json``). Choose weights by the ``val`` column only.

Run in a prepared workspace (``data/prepared``, ``data/raw``, ``params.yaml``)::

    python scripts/ensemble_weights.py --member unet=weights/unet-figshare.keras \\
        --member umnv2=weights/umobilenetv2-figshare.keras \\
        --combo unet:0.5+umnv2:0.5 --combo unet:0.4+umnv2:0.6 --out weights.jsonl

``--member s160=weights/umobilenetv2-figshare.keras@160`` is the same model run at 160² inputs
(multi-scale test-time augmentation: combine it with the model at its own size).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_combo(text: str) -> dict[str, float]:
    try:
        weights = {tag: float(weight) for tag, weight in (part.split(":") for part in text.split("+"))}
    except ValueError:
        raise SystemExit(f"--combo {text!r}: expected tag:weight+tag:weight, e.g. unet:0.5+umnv2:0.5") from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise SystemExit(f"--combo {text!r}: weights must be >= 0 with a positive sum")
    return weights


def parse_member(text: str) -> tuple[str, str, int | None]:
    """``TAG=MODEL`` or ``TAG=MODEL@SIZE`` -> (tag, model file, input size or None)."""
    tag, _, source = text.partition("=")
    path, at, size = source.rpartition("@")
    if not at:
        return tag, source, None
    if not size.isdigit() or int(size) % 32:
        raise SystemExit(f"--member {text!r}: the size after @ must be a multiple of 32, e.g. unet=model.keras@160")
    return tag, path, int(size)


def at_input_size(model, size: int):
    """The same weights in the same model built for size x size inputs: a multi-scale test-time
    member (both architectures are fully convolutional; every input's batch_shape is rewritten)."""

    def resize(node):
        if isinstance(node, dict):
            return {k: [None, size, size, v[-1]] if k == "batch_shape" and isinstance(v, (list, tuple)) and len(v) == 4 else resize(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(resize(v) for v in node)
        return node

    rebuilt = model.__class__.from_config(resize(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="TAG=MODEL[@SIZE]",
        help="a model file and the tag combos name it by; @SIZE runs it at SIZE² inputs instead of its own",
    )
    parser.add_argument("--combo", action="append", required=True, metavar="TAG:W+TAG:W", help="member weights (normalised to sum 1)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cache", type=Path, default=Path("reports/ensemble_weights_cache"), help="folder for the members' probability maps")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per combo")
    args = parser.parse_args()

    from tumorseg.config import load_config
    from tumorseg.data.sources import read_labels
    from tumorseg.evaluation import evaluate_split, load_scoring_split
    from tumorseg.inference import KerasBackend, PostProcessing, PredictedSplit, PredictionCache, Predictor, average_maps, open_keras_model
    from tumorseg.io import atomic_write_text, sha256_file
    from tumorseg.losses import combined_loss

    members = {tag: (path, size) for tag, path, size in map(parse_member, args.member)}
    combos = [parse_combo(c) for c in args.combo]
    for weights in combos:
        unknown = set(weights) - set(members)
        if unknown:
            raise SystemExit(f"--combo names {sorted(unknown)}, not among --member tags {sorted(members)}")
    cfg = load_config(args.params)
    prepared, raw = Path("data/prepared"), Path("data/raw")
    cache = PredictionCache(args.cache)
    predictors: dict[str, Predictor] = {}

    def member_maps(tag: str, split) -> PredictedSplit:
        source, size = members[tag]
        if tag not in predictors:
            model = open_keras_model(source)
            predictors[tag] = Predictor(KerasBackend(at_input_size(model, size) if size is not None else model), tta=True, batch_size=cfg.batch_size)
        identity = f"{sha256_file(source)}@{size or 'own'}"
        return cache.get(identity, predictors[tag], split.names, split.images, label=f"{tag}-{split.split}")

    def predictor(weights: dict[str, float]):
        used = [tag for tag, w in weights.items() if w > 0]

        def predict(split) -> PredictedSplit:
            maps = [member_maps(tag, split) for tag in used]
            return PredictedSplit(split.names, average_maps([m.probabilities for m in maps], [weights[t] for t in used]), sum(m.ms_per_image for m in maps))

        return predict

    def load(split: str):
        return load_scoring_split(
            prepared / split,
            cfg.evaluate.resolution,
            manifest_path=prepared / "manifest.csv",
            mask_threshold=cfg.prepare.mask_threshold,
            raw_dir=raw,
        )

    test, val = load("test"), load("val")
    labels = read_labels(cfg.evaluate.labels, raw)
    loss_fn = combined_loss(cfg.loss)
    rows = []
    for text, weights in zip(args.combo, combos):
        metrics = evaluate_split(predictor(weights), test, post=PostProcessing(), val=val, loss_fn=loss_fn, labels=labels, tta=True).metrics
        row = {
            "combo": text,
            "val_dice_tuned": metrics["val_dice_tuned"],
            "test_dice": metrics["dice"],
            "dice_by_class": metrics.get("dice_by_class"),
            "dice_by_size": metrics["dice_by_size"],
            "threshold": metrics["threshold"],
            "min_component_px": metrics["min_component_px"],
            "hd95": metrics["hd95"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
