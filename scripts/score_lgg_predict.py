"""Score a model on LGG patients exactly as an outside scorer would: build
``ROOT/{t1,flair,t1ce}/<case>_<slice>.png`` for the chosen patients (links into the data set; a
patient without a sequence simply has no files there), run ``tumorseg predict ROOT --model M --out
OUT`` with no other flag (the model card's settings apply), then read ``OUT/**/<case>_<slice>_mask.png``
and compute per-patient Dice, per-slice Dice on tumour slices, the false-positive rate on
tumour-free slices and detection sensitivity, overall and per institution.

    python scripts/score_lgg_predict.py --data ../shared/data/lgg-256 \\
        --cases weights/lgg_test_cases.txt --model weights/umobilenetv2-lgg.keras \\
        --out docs/results/lgg-umobilenetv2-t1-flair-t1ce/shipped-predict.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

SEQUENCES = ("t1", "flair", "t1ce")


def link_cases(data: Path, cases: list[str], root: Path) -> list[str]:
    """``root/<sequence>/`` and ``root/masks/`` as links to the cases' files; the slice names."""
    names = sorted(p.stem for case in cases for p in (data / "masks").glob(f"{case}_*.png"))
    if not names:
        raise SystemExit(f"no masks of the listed cases in {data / 'masks'}")
    for folder in (*SEQUENCES, "masks"):
        (root / folder).mkdir(parents=True)
        for name in names:
            source = data / folder / f"{name}.png"
            if source.exists():
                (root / folder / f"{name}.png").symlink_to(source.resolve())
    return names


def score(predicted: Path, truth_dir: Path, names: list[str], sites: dict[str, str]) -> dict:
    """Metrics of the masks under ``predicted`` (searched recursively) against ``truth_dir``."""
    from tumorseg.evaluation import patient_metrics, scan_metrics
    from tumorseg.metrics import dice

    found = {p.name.removesuffix("_mask.png"): p for p in predicted.rglob("*_mask.png")}
    missing = [name for name in names if name not in found]
    truths, masks, patients = [], [], []
    for name in names:
        truth = cv2.imread(str(truth_dir / f"{name}.png"), cv2.IMREAD_GRAYSCALE) > 0
        mask = cv2.imread(str(found[name]), cv2.IMREAD_GRAYSCALE) > 0 if name in found else np.zeros_like(truth)  # unsegmented = nothing found
        truths.append(truth)
        masks.append(mask)
        patients.append(name.rsplit("_", 1)[0])
    tumour_dice = [dice(t, m) for t, m in zip(truths, masks) if t.any()]
    by_patient = patient_metrics(truths, masks, patients)
    per_site: dict[str, list[float]] = {}
    for patient, value in by_patient["patient_dice_by_patient"].items():
        per_site.setdefault(sites.get(patient, "?"), []).append(value)
    return {
        "slices": len(names),
        "slices_without_a_mask_file": missing,
        "dice_tumour_slices": float(np.mean(tumour_dice)),
        **scan_metrics(truths, masks),
        **by_patient,
        "patient_dice_by_institution": {site: {"patients": len(v), "patient_dice": float(np.mean(v))} for site, v in sorted(per_site.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="lgg-256 folder: t1/ flair/ t1ce/ masks/ cases.csv")
    parser.add_argument("--cases", type=Path, required=True, help="text file: one case id per line")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args(argv)

    cases = args.cases.read_text().split()
    sites = {}
    if (args.data / "cases.csv").exists():
        import csv

        with open(args.data / "cases.csv", newline="") as handle:
            sites = {row["case"]: row["institution"] for row in csv.DictReader(handle)}
    with tempfile.TemporaryDirectory() as scratch:
        root, out = Path(scratch) / "scans", Path(scratch) / "predicted"
        names = link_cases(args.data, cases, root)
        command = [sys.executable, "-m", "tumorseg.cli", "predict", str(root), "--model", args.model, "--out", str(out)]
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        print(finished.stdout.strip(), finished.stderr.strip()[-2000:], sep="\n", file=sys.stderr)
        results = score(out, args.data / "masks", names, sites)
    results = {
        "command": f"tumorseg predict ROOT --model {args.model} --out OUT",
        "exit_code": finished.returncode,
        "model": args.model,
        "cases": cases,
        "data": args.data.name,
        "data_kind": "real",
        "seconds": round(seconds, 1),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{len(cases)} patients, {results['slices']} slices ({len(results['slices_without_a_mask_file'])} without a mask file): "
        f"patient Dice {results['patient_dice']:.4f}, tumour-slice Dice {results['dice_tumour_slices']:.4f}, "
        f"FP rate {results['false_positive_rate']:.3f}, detection {results['detection_sensitivity']:.3f} -> {args.out}"
    )
    return 0 if finished.returncode == 0 and not results["slices_without_a_mask_file"] else 1


if __name__ == "__main__":
    sys.exit(main())
