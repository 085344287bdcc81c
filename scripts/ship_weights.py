"""Copy a trained model into ``weights/`` for shipping: optimizer state stripped (a third of the
size) as training publishes ``models/``, loaded back and checked to predict identically, then
``weights/SHA256SUMS`` rewritten.

    python scripts/ship_weights.py models/umobilenetv2.keras weights/umobilenetv2-figshare.keras

With ``--workspace DIR`` (the pipeline workspace that trained and scored the model) it also writes
the machine-readable card ``weights/<name>.card.json``: sequences, data source and hash, licence,
test metrics, and the inference settings chosen on validation (threshold, blob filter, TTA, and
``missing_sequences: fill`` for a model trained to cope with a missing sequence), which
``tumorseg predict/explain/serve`` then use by default:

    python scripts/ship_weights.py models/umobilenetv2.keras weights/umobilenetv2-lgg.keras \
        --workspace . --licence "CC BY-NC-SA 4.0" --attribution "Buda et al. 2019; TCGA-LGG, TCIA"

The prose card (weights/MODEL_CARD.md) is written by hand from metrics/evaluate_<model>.json.
Replace shipped files only when test Dice improves by >= 0.01 (keeps the git history small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

MAX_BYTES = 25 * 1024 * 1024


def write_checksums(folder: Path) -> Path:
    from tumorseg.io import atomic_write_text, sha256_file

    lines = [f"{sha256_file(path)}  {path.name}\n" for path in sorted(folder.glob("*.keras"))]
    target = folder / "SHA256SUMS"
    atomic_write_text(target, "".join(lines))
    return target


def ship(source: Path, target: Path) -> None:
    from tumorseg.inference import open_keras_model
    from tumorseg.io import atomic_write_bytes
    from tumorseg.models import inference_model
    from tumorseg.resume import publish_without_optimizer

    model = inference_model(open_keras_model(source))  # what the shipped file must reproduce
    with tempfile.TemporaryDirectory() as scratch:
        stripped = Path(scratch) / target.name
        publish_without_optimizer(source, stripped)  # as training publishes models/: no optimizer state, no deep-supervision heads
        reloaded = open_keras_model(stripped)
        size, channels = model.input_shape[1], model.input_shape[-1]
        probe = np.random.default_rng(0).integers(0, 256, (2, size, size, channels)).astype("float32")
        difference = float(np.abs(model.predict(probe, verbose=0) - reloaded.predict(probe, verbose=0)).max())
        if difference > 1e-6:
            raise SystemExit(f"reloaded model differs from {source} by {difference}")
        if stripped.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{target.name} would be {stripped.stat().st_size / 2**20:.1f} MB (> 25 MB)")
        atomic_write_bytes(target, stripped.read_bytes())
    print(f"{source} -> {target} ({target.stat().st_size / 2**20:.1f} MB, {model.count_params():,} params)")


# Test metrics copied into the card (evaluate_<model>.json keys that exist for the data scored).
CARD_METRICS = (
    "patient_dice", "n_patients", "dice", "iou", "hd95", "global_dice", "false_positive_rate", "detection_sensitivity",
    "n_images", "n_tumour_slices", "n_tumour_free_slices", "val_dice_tuned", "resolution", "aggregation",
)


def build_card(target: Path, workspace: Path, licence: str, attribution: str) -> dict:
    """The machine-readable card of a shipped file, from the workspace that trained and scored it."""
    import json

    from tumorseg.config import MODEL_NAMES, load_config
    from tumorseg.inference import Predictor
    from tumorseg.inference.cards import CARD_SCHEMA, InferenceSettings
    from tumorseg.io import read_metrics, sha256_file

    cfg = load_config(workspace / "params.yaml")
    predictor = Predictor.load(target)
    model = predictor.model
    name = next((n for n in MODEL_NAMES if target.stem.startswith(n)), None)
    if name is None:
        raise SystemExit(f"{target.name}: the file name must start with a model name ({', '.join(MODEL_NAMES)})")
    scores = read_metrics(workspace / "metrics" / f"evaluate_{name}.json")  # numbers + their .info.json
    source = json.loads((workspace / "data" / "raw" / "SOURCE.json").read_text())
    if scores.get("data_hash") != source.get("data_hash"):
        raise SystemExit(f"{workspace}: metrics/evaluate_{name}.json was scored on other data than data/raw/SOURCE.json describes")
    copes = cfg.prepare.missing_sequences == "fill" or cfg.train.sequence_dropout > 0
    settings = InferenceSettings(
        threshold=float(scores["threshold"]), min_component_px=int(scores.get("min_component_px", 0)), tta=bool(scores["tta"]),
        missing_sequences="fill" if copes and len(cfg.data.sequences) > 1 else "skip",
    )
    return {
        "schema": CARD_SCHEMA,
        "file": target.name,
        "sha256": sha256_file(target),
        "model": name,
        "parameters": int(model.count_params()),
        "input": {"size": int(model.input_shape[1]), "sequences": list(predictor.sequences) or None, "channels": int(model.input_shape[-1])},
        "inference": dict(settings.__dict__),
        "selection": {"inference_settings_chosen_on": scores.get("tuned_on", "val"), "best_epoch_chosen_on": "val"},
        "data": {
            "kind": source["kind"], "origin": Path(source["origin"]).name, "data_hash": source["data_hash"], "images": source.get("n_images"),
            "licence": licence, "attribution": attribution,
            "split": {"group_by": cfg.prepare.group_by, "val_fraction": cfg.prepare.val_fraction, "test_fraction": cfg.prepare.test_fraction, "seed": cfg.seed},
        },
        "test": {key: scores[key] for key in CARD_METRICS if key in scores},
        "intended_use": "research and teaching only; not a medical device",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="trained .keras file (e.g. models/umobilenetv2.keras)")
    parser.add_argument("target", type=Path, help="weights/<name>.keras")
    parser.add_argument("--workspace", type=Path, default=None, help="pipeline workspace that trained and scored SOURCE: write weights/<name>.card.json")
    parser.add_argument("--licence", default="", help="the training data's licence, for the card")
    parser.add_argument("--attribution", default="", help="the training data's citation, for the card")
    args = parser.parse_args()
    ship(args.source, args.target)  # the atomic write makes the target's folder
    if args.workspace:
        import json

        from tumorseg.inference.cards import card_path
        from tumorseg.io import atomic_write_text

        card = build_card(args.target, args.workspace, args.licence, args.attribution)
        atomic_write_text(card_path(args.target), json.dumps(card, indent=2) + "\n")
        print(f"model card -> {card_path(args.target)} (inference: {card['inference']})")
    print(f"checksums -> {write_checksums(args.target.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
