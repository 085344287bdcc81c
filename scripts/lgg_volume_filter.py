"""Would a per-patient 3-D connected-component filter help on LGG? (A measured lever, not adopted.)

Stacks each patient's predicted masks in slice order (the ``<case>_<slice>`` numbers), labels the
26-connected 3-D components (SciPy) and keeps the largest, those of at least a fraction of the
largest, or those of at least N voxels - the usual post-processing of volume segmentation - on top
of each threshold and 2-D blob filter of the grid. Validation chooses; test is only read. The maps
come from the shipped prediction path (``Predictor``, flip TTA) at the original resolution, as
evaluate scores them.

    python scripts/lgg_volume_filter.py --workspace WS --model weights/umobilenetv2-lgg.keras \\
        --out docs/results/lgg-umobilenetv2-t1-flair-t1ce/volume-filter.json

``WS``: a pipeline workspace prepared with the LGG three-sequence recipe (its data/prepared and
data/raw).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

GRID = {"threshold": (0.3, 0.4, 0.5), "min_component_px": (0, 25, 100)}
FILTERS = [("none", None), ("largest", None)] + [("fraction", f) for f in (0.05, 0.1, 0.2, 0.3, 0.5)] + [("min_voxels", n) for n in (100, 200, 400, 800, 1500)]


def slice_number(name: str) -> int:
    return int(re.search(r"_(\d+)\.png$", name).group(1))


def volume_filter(masks: list[np.ndarray], names: list[str], patients: list[str], kind: str, value) -> list[np.ndarray]:
    """Each patient's masks with the 3-D components that ``kind``/``value`` rejects removed."""
    import scipy.ndimage as ndi

    if kind == "none":
        return masks
    out = list(masks)
    by_patient: dict[str, list[int]] = {}
    for index, patient in enumerate(patients):
        by_patient.setdefault(patient, []).append(index)
    for indices in by_patient.values():
        indices = sorted(indices, key=lambda i: slice_number(names[i]))
        volume = np.stack([masks[i] for i in indices])
        if not volume.any():
            continue
        labels, count = ndi.label(volume, structure=np.ones((3, 3, 3)))
        sizes = np.asarray(ndi.sum(volume, labels, range(1, count + 1)))
        keep = {"largest": sizes >= sizes.max(), "fraction": sizes >= (value or 0) * sizes.max(), "min_voxels": sizes >= (value or 0)}[kind]
        kept = np.concatenate([[False], keep])[labels]
        for position, index in enumerate(indices):
            out[index] = kept[position]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from tumorseg.evaluation import load_scoring_split, patient_metrics, scan_metrics
    from tumorseg.inference import PostProcessing, Predictor

    predictor = Predictor.load(args.model, tta=True)
    prepared = args.workspace / "data" / "prepared"
    splits = {}
    for split in ("val", "test"):
        scored = load_scoring_split(prepared / split, "original", manifest_path=prepared / "manifest.csv", raw_dir=args.workspace / "data" / "raw",
                                    channels=predictor.sequences)
        splits[split] = (scored, predictor.probability_maps(scored.images))

    rows = []
    for kind, value in FILTERS:
        for threshold in GRID["threshold"]:
            for min_px in GRID["min_component_px"]:
                row = {"filter": kind, "value": value, "threshold": threshold, "min_component_px": min_px}
                for split, (scored, maps) in splits.items():
                    post = PostProcessing(threshold, min_px)
                    masks = volume_filter([post.mask(m) for m in maps], scored.names, scored.patients, kind, value)
                    tumour = [(t, m) for t, m in zip(scored.truths, masks) if t.any()]
                    row[split] = {
                        "patient_dice": patient_metrics(scored.truths, masks, scored.patients)["patient_dice"],
                        "false_positive_rate": scan_metrics(scored.truths, masks)["false_positive_rate"],
                        "dice_tumour_slices": float(np.mean([2 * np.logical_and(t, m).sum() / (t.sum() + m.sum()) for t, m in tumour])),
                    }
                rows.append(row)
    # validation chooses: the best per-patient Dice, then the lowest false-positive rate
    best = {}
    for kind in dict(FILTERS):
        own = [r for r in rows if r["filter"] == kind]
        best[kind] = max(own, key=lambda r: (round(r["val"]["patient_dice"], 4), -r["val"]["false_positive_rate"]))
    result = {"model": str(args.model), "data_source": "real", "data": "lgg-256, the project's patient split", "chosen_on": "val"}
    result |= {"best_per_filter": best, "grid": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for kind, row in best.items():
        print(f"{kind:10} {str(row['value']):5} thr {row['threshold']} blob {row['min_component_px']:3}  val: patient {row['val']['patient_dice']:.3f} "
              f"FP {row['val']['false_positive_rate']:.3f} | test: patient {row['test']['patient_dice']:.3f} FP {row['test']['false_positive_rate']:.3f} "
              f"slices {row['test']['dice_tumour_slices']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
