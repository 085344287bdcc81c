"""The LGG sequence study (issue 22): collect each run's results into ``docs/results/`` and make
the README's table from them, per patient, per institution and on the patients every run saw.

    # after a run's train + evaluate stages in WORKSPACE (a pipeline workspace):
    python scripts/lgg_study.py collect /work/lgg-study/flair umobilenetv2 docs/results/lgg-umobilenetv2-flair
    # the table (Markdown to stdout, JSON beside it):
    python scripts/lgg_study.py table --cases ../shared/data/lgg-256/cases.csv \\
        --out docs/results/lgg-study.json docs/results/lgg-*/
    # one run's patients: Dice, false-positive slices, sequences, and the means without the worst one
    python scripts/lgg_study.py patients --cases ../shared/data/lgg-256/cases.csv \\
        --out docs/results/lgg-umobilenetv2-t1-flair-t1ce/patients.json docs/results/lgg-umobilenetv2-t1-flair-t1ce

Only JSON, CSV and params are copied (no slice images: they are copies of ../shared data).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

# per run folder: what to copy from the workspace (source path, name in the results folder)
FILES = (
    ("params.yaml", "params.yaml"),
    ("metrics/train_{m}.json", "train_{m}.json"),
    ("metrics/train_{m}.info.json", "train_{m}.info.json"),
    ("metrics/evaluate_{m}.json", "evaluate_{m}.json"),
    ("metrics/evaluate_{m}.info.json", "evaluate_{m}.info.json"),
    ("metrics/history_{m}.csv", "history_{m}.csv"),
    ("reports/evaluate_{m}/per_image.csv", "per_image.csv"),
    ("data/prepared/report.json", "prepare_report.json"),
)


def collect(workspace: Path, model: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for source, target in FILES:
        path = workspace / source.format(m=model)
        if path.exists():
            shutil.copyfile(path, out / target.format(m=model))
            copied.append(target.format(m=model))
    print(f"{workspace} -> {out}: {', '.join(copied)}")


def _run(folder: Path) -> dict | None:
    found = sorted(folder.glob("evaluate_*.json"))
    numbers = [p for p in found if not p.name.endswith(".info.json")]
    if not numbers:
        return None
    path = numbers[0]
    model = path.stem.removeprefix("evaluate_")
    scores = json.loads(path.read_text())
    info = path.with_name(f"evaluate_{model}.info.json")
    if info.exists():
        scores |= json.loads(info.read_text())
    train = {}
    for name in (f"train_{model}.json", f"train_{model}.info.json"):
        if (folder / name).exists():
            train |= json.loads((folder / name).read_text())
    import yaml

    params = yaml.safe_load((folder / "params.yaml").read_text()) if (folder / "params.yaml").exists() else {}
    return {"folder": folder.as_posix(), "model": model, "scores": scores, "train": train, "params": params}


def table(folders: list[Path], cases_csv: Path | None, out: Path | None) -> str:
    runs = [run for run in (_run(folder) for folder in folders) if run]
    sites = {}
    if cases_csv and cases_csv.exists():
        with open(cases_csv, newline="") as handle:
            sites = {row["case"]: row["institution"] for row in csv.DictReader(handle)}
    common = set.intersection(*(set(run["scores"].get("patient_dice_by_patient", {})) for run in runs)) if runs else set()
    rows, records = [], []
    for run in runs:
        s, params = run["scores"], run["params"]
        by_patient = s.get("patient_dice_by_patient", {})
        by_site: dict[str, list[float]] = {}
        for patient, value in by_patient.items():
            by_site.setdefault(sites.get(patient, "?"), []).append(value)
        members = s.get("members") or []  # an ensemble: no training of its own, scored as it is
        record = {
            "folder": run["folder"],
            "model": run["model"] if not members else f"ensemble of {' + '.join(members)}",
            "sequences": (params.get("data") or {}).get("sequences") or [],
            "image_size": params.get("image_size"),
            "epochs": run["train"].get("epochs_run"),
            "best_epoch": run["train"].get("best_epoch"),
            "val_dice": run["train"].get("best_val_dice", s.get("val_dice_tuned") if members else None),
            "n_patients": s.get("n_patients"),
            "patient_dice": s.get("patient_dice"),
            "patient_dice_common": float(np.mean([by_patient[p] for p in sorted(common)])) if common else None,
            "n_common_patients": len(common),
            "dice_tumour_slices": s.get("dice"),
            "detection_sensitivity": s.get("detection_sensitivity"),
            "false_positive_rate": s.get("false_positive_rate"),
            "hd95": s.get("hd95"),
            "patient_dice_by_institution": {site: {"patients": len(v), "patient_dice": float(np.mean(v))} for site, v in sorted(by_site.items())},
            "data_source": s.get("data_source"),
        }
        records.append(record)

        def f(value, digits=3):
            return "—" if value is None else f"{value:.{digits}f}"

        institutions = ", ".join(f"{k} {v['patient_dice']:.2f} ({v['patients']})" for k, v in record["patient_dice_by_institution"].items())
        trained = f"{record['epochs']} (best {record['best_epoch']})" if not members else "the members' runs above"
        cells = [
            record["model"],
            ", ".join(record["sequences"]).upper() or "image",
            f"{record['image_size']}², {trained}",
            f(record["val_dice"]),
            str(record["n_patients"]),
            f"**{f(record['patient_dice'])}**",
            f(record["patient_dice_common"]),
            f(record["dice_tumour_slices"]),
            f(record["detection_sensitivity"]),
            f(record["false_positive_rate"]),
            f(record["hd95"], 1),
            institutions,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    header = (
        "| model | sequences | input, epochs | val Dice | test patients | **per-patient Dice** "
        f"| per-patient Dice, the {len(common)} patients all runs saw | Dice, tumour slices | detection "
        "| false-positive rate | HD95 (px) | per institution (patients) |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    text = header + "\n" + "\n".join(rows)
    if out:
        out.write_text(json.dumps({"common_patients": sorted(common), "runs": records}, indent=2) + "\n")
    return text


def patients(folder: Path, cases_csv: Path | None, out: Path | None) -> str:
    """Per patient of one run: its per-patient Dice as evaluate scored it, pixel errors and
    tumour-free slices flagged (from per_image.csv), the sequences the patient has; and the run's
    two goal numbers with and without its worst patient, so one atypical scan is told apart from a
    general shortfall."""
    run = _run(folder)
    if run is None or "patient_dice_by_patient" not in run["scores"]:
        raise SystemExit(f"{folder}: no evaluate_<model>.json with patient_dice_by_patient (a patient-grouped run's scores)")
    cases = {}
    if cases_csv and cases_csv.exists():
        with open(cases_csv, newline="") as handle:
            cases = {row["case"]: row for row in csv.DictReader(handle)}
    with open(folder / "per_image.csv", newline="") as handle:
        slices = list(csv.DictReader(handle))
    rows: dict[str, dict] = {}
    for s in slices:
        row = rows.setdefault(s["patient"], {"tp": 0, "fp": 0, "fn": 0, "tumour_free": 0, "tumour_free_flagged": 0})
        for key in ("tp", "fp", "fn"):
            row[key] += int(s[key])
        if int(s["truth_pixels"]) == 0:
            row["tumour_free"] += 1
            row["tumour_free_flagged"] += int(s["pred_pixels"]) > 0
    for patient, row in rows.items():
        row["dice"] = run["scores"]["patient_dice_by_patient"][patient]
        row["sequences"] = cases.get(patient, {}).get("sequences", "?")
        row["institution"] = cases.get(patient, {}).get("institution", "?")

    def goal_numbers(keep: list[str]) -> dict:
        free = sum(rows[p]["tumour_free"] for p in keep)
        return {
            "patients": len(keep),
            "patient_dice": float(np.mean([rows[p]["dice"] for p in keep])),
            "false_positive_rate": sum(rows[p]["tumour_free_flagged"] for p in keep) / free if free else None,
        }

    ordered = sorted(rows, key=lambda p: rows[p]["dice"])
    summary = {"all": goal_numbers(ordered), "without_worst": {"patient": ordered[0], **goal_numbers(ordered[1:])}}
    if out:
        out.write_text(json.dumps({"run": folder.as_posix(), **summary, "patients": {p: rows[p] for p in ordered}}, indent=2) + "\n")
    lines = [
        "| patient | institution | sequences | per-patient Dice | FP px | FN px | tumour-free slices flagged |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for p in ordered:
        r = rows[p]
        flagged = f"{r['tumour_free_flagged']} / {r['tumour_free']}"
        lines.append(f"| {p} | {r['institution']} | {r['sequences']} | {r['dice']:.3f} | {r['fp']} | {r['fn']} | {flagged} |")
    for label, numbers in summary.items():
        lines.append(f"{label}: {numbers}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect")
    p.add_argument("workspace", type=Path)
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p = sub.add_parser("table")
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--cases", type=Path, default=None, help="lgg-256's cases.csv (institution per case)")
    p.add_argument("--out", type=Path, default=None, help="JSON of the table")
    p = sub.add_parser("patients")
    p.add_argument("folder", type=Path)
    p.add_argument("--cases", type=Path, default=None, help="lgg-256's cases.csv (sequences, institution per case)")
    p.add_argument("--out", type=Path, default=None, help="JSON of the table")
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.workspace, args.model, args.out)
    elif args.command == "patients":
        print(patients(args.folder, args.cases, args.out))
    else:
        print(table(args.folders, args.cases, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
