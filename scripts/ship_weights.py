"""Copy a trained model into ``weights/`` for shipping: optimizer state stripped (a third of the
size) as training publishes ``models/``, loaded back and checked to predict identically, also in a
separate Python that cannot import tumorseg (plain ``keras.models.load_model``: the file must load
anywhere), then ``weights/SHA256SUMS`` rewritten.

    python scripts/ship_weights.py models/umobilenetv2.keras weights/umobilenetv2-figshare.keras

A U-Net saved before issue 23 (legacy HACBlock/CASPPBlock layers) is shipped as the stock-layer
graph with the same weights (``tumorseg.models.to_portable``; it must predict within 1e-5 of the
source), so re-shipping a file in place converts it without retraining:

    python scripts/ship_weights.py weights/unet-figshare.keras weights/unet-figshare.keras

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
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MAX_BYTES = 25 * 1024 * 1024
SAME = 1e-6  # the stripped file against its source: the same graph and weights
CONVERTED = 1e-5  # a legacy source against its stock-layer conversion (eager: float rounding only; 0 on unet-figshare)

# Run by a separate `python -I` in an empty folder, where importing tumorseg fails even when it is
# installed (an import hook refuses it): nothing but Keras can load the file.
STANDALONE_CHECK = """
import importlib.abc, sys

class NoTumorseg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tumorseg":
            raise ModuleNotFoundError(f"No module named {name!r} (this check runs without tumorseg)", name=name)

sys.meta_path.insert(0, NoTumorseg())
try:
    import tumorseg
except ImportError:
    pass
else:
    raise SystemExit("tumorseg is importable here, so this check proves nothing")
import numpy as np, keras
model = keras.models.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
"""


def write_checksums(folder: Path) -> Path:
    from tumorseg.io import atomic_write_text, sha256_file

    lines = [f"{sha256_file(path)}  {path.name}\n" for path in sorted(folder.glob("*.keras"))]
    target = folder / "SHA256SUMS"
    atomic_write_text(target, "".join(lines))
    return target


def standalone_predictions(path: Path, probe: np.ndarray, scratch: Path) -> np.ndarray:
    """``path``'s predictions on ``probe`` in a separate ``python -I`` where tumorseg cannot be
    imported (safe mode, no custom objects): what a user without this project gets."""
    inputs, outputs = scratch / "probe.npy", scratch / "predictions.npy"
    np.save(inputs, probe)
    result = subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE_CHECK, str(path.resolve()), str(inputs), str(outputs)],
        cwd=scratch, capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"{path.name} does not load with plain keras.models.load_model outside tumorseg:\n{result.stderr[-2000:]}")
    return np.load(outputs)


def ship(source: Path, target: Path) -> dict:
    """Ship ``source`` as ``target``; returns the measured differences (``max_abs_difference``:
    target against the source as saved, ``standalone_max_abs_difference``: in a Python without tumorseg)."""
    import keras

    from tumorseg.inference import open_keras_model
    from tumorseg.io import atomic_write_bytes
    from tumorseg.models import inference_model, is_legacy
    from tumorseg.resume import publish_without_optimizer

    open_keras_model(source)  # every problem with the file in one line, before Keras' own messages
    model = inference_model(keras.models.load_model(source, compile=False))  # as saved: what the shipped file must reproduce
    converted = is_legacy(model)
    with tempfile.TemporaryDirectory() as scratch:
        stripped = Path(scratch) / target.name
        publish_without_optimizer(source, stripped)  # as training publishes models/: no optimizer state, no deep-supervision heads, stock layers only
        reloaded = open_keras_model(stripped)
        if is_legacy(reloaded):
            raise SystemExit(f"{target.name} would still hold legacy layers")
        size, channels = model.input_shape[1], model.input_shape[-1]
        probe = np.random.default_rng(0).integers(0, 256, (2, size, size, channels)).astype("float32")
        # eager calls: predict()'s compiled graph rounds differently per graph (~1e-5 on the U-Net,
        # the same between two runs of one legacy model), eager execution is the same arithmetic
        expected = np.asarray(model(probe, training=False))
        difference = float(np.abs(expected - np.asarray(reloaded(probe, training=False))).max())
        if difference > (CONVERTED if converted else SAME):
            raise SystemExit(f"reloaded model differs from {source} by {difference}")
        standalone = float(np.abs(reloaded.predict(probe, verbose=0) - standalone_predictions(stripped, probe, Path(scratch))).max())
        if standalone > SAME:
            raise SystemExit(f"{target.name} predicts {standalone} differently without tumorseg")
        if stripped.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{target.name} would be {stripped.stat().st_size / 2**20:.1f} MB (> 25 MB)")
        atomic_write_bytes(target, stripped.read_bytes())
    note = ", converted from the legacy HAC/CASPP layers" if converted else ""
    print(
        f"{source} -> {target} ({target.stat().st_size / 2**20:.1f} MB, {model.count_params():,} params{note}; "
        f"max |difference| {difference:.2g}, without tumorseg {standalone:.2g})"
    )
    return {"converted": converted, "max_abs_difference": difference, "standalone_max_abs_difference": standalone}


# Test metrics copied into the card (evaluate_<model>.json keys that exist for the data scored).
CARD_METRICS = (
    "patient_dice", "n_patients", "dice", "iou", "hd95", "global_dice", "false_positive_rate", "detection_sensitivity",
    "n_images", "n_tumour_slices", "n_tumour_free_slices", "val_dice_tuned", "resolution", "aggregation",
)


def build_card(target: Path, workspace: Path, licence: str, attribution: str) -> dict:
    """The machine-readable card of a shipped file, from the workspace that trained and scored it."""
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


def refresh_card_checksum(target: Path) -> None:
    """A re-shipped file (e.g. converted to stock layers) keeps its card; the card's ``sha256`` must name the new bytes."""
    from tumorseg.inference.cards import card_path
    from tumorseg.io import atomic_write_text, sha256_file

    path = card_path(target)
    if path.exists():
        card = json.loads(path.read_text())
        if card.get("sha256") != sha256_file(target):
            card["sha256"] = sha256_file(target)
            atomic_write_text(path, json.dumps(card, indent=2) + "\n")
            print(f"model card -> {path} (sha256 updated)")


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
        from tumorseg.inference.cards import card_path
        from tumorseg.io import atomic_write_text

        card = build_card(args.target, args.workspace, args.licence, args.attribution)
        atomic_write_text(card_path(args.target), json.dumps(card, indent=2) + "\n")
        print(f"model card -> {card_path(args.target)} (inference: {card['inference']})")
    else:
        refresh_card_checksum(args.target)
    print(f"checksums -> {write_checksums(args.target.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
