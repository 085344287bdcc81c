"""``tumorseg results``: DVC experiments as one readable table.

``dvc exp show`` lists every param and metric (hundreds of columns); ``--only-changed`` drops a
model's metrics whenever they happen to be equal across rows. This table keeps what decides
between experiments: the experiment, the params that differ between the rows shown, each model's
test Dice / IoU / HD95 (and per-patient Dice where scored), and the data the numbers are on
(real / synthetic, from each experiment's own ``metrics/evaluate_<model>.info.json``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tumorseg.errors import UsageError

SCORES = ("dice", "patient_dice", "iou", "hd95")  # per model, in this order, where present
PARAMS_FILE = "params.yaml"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def _data_source(root: Path, rev: str, model: str) -> str:
    """The ``data_source`` an experiment's evaluation recorded (its info file, at that commit)."""
    path = f"metrics/evaluate_{model}.info.json"
    try:
        if rev == "workspace":
            text = (root / path).read_text(encoding="utf-8")
        else:
            text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, timeout=30, check=True).stdout
        return str(json.loads(text).get("data_source", "?"))
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return "?"


def _row(root: Path, entry: dict, label: str, models: Sequence[str]) -> dict[str, Any] | None:
    data = entry.get("data")
    if not data or entry.get("error"):
        return None
    params = _flatten((data.get("params") or {}).get(PARAMS_FILE, {}).get("data") or {})
    scores: dict[str, Any] = {}
    sources = set()
    for model in models:
        numbers = ((data.get("metrics") or {}).get(f"metrics/evaluate_{model}.json") or {}).get("data") or {}
        for key in SCORES:
            if key in numbers:
                scores[f"{model} {key}"] = numbers[key]
        if numbers:
            sources.add(_data_source(root, entry["rev"], model))
    return {"experiment": label, "rev": entry["rev"], "params": params, "scores": scores, "data": "+".join(sorted(sources)) or "—"}


def experiment_rows(root: Path, models: Sequence[str], *, include_all: bool = False) -> list[dict[str, Any]]:
    """One row per workspace / baseline commit and per experiment, from ``dvc exp show --json``."""
    if not Path(root).is_dir():
        raise UsageError(f"--repo {root}: no such folder")
    command = ["exp", "show", "--json", *(["--all-commits"] if include_all else [])]
    # this interpreter's DVC (the project's environment), whether or not it is activated
    done = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=root, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"`dvc {' '.join(command)}` failed in {root}: {message}")
    rows = []
    for entry in json.loads(done.stdout or "[]"):
        label = entry.get("name") or ("workspace" if entry["rev"] == "workspace" else entry["rev"][:7])
        baseline = _row(root, entry, label, models)
        if baseline:
            rows.append(baseline)
        for experiment in entry.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                row = _row(root, revision, f"  {experiment.get('name') or revision['rev'][:7]}", models)
                if row:
                    rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], *, max_param_width: int = 24) -> str:
    """A Markdown table: experiment, the params that differ between rows, the scores, the data."""
    if not rows:
        return "no experiments: run `dvc exp run` (or `make run`) first"
    keys = sorted({key for row in rows for key in row["params"]})
    changed = [key for key in keys if len({json.dumps(row["params"].get(key), sort_keys=True) for row in rows}) > 1]
    scores = list(dict.fromkeys(key for row in rows for key in row["scores"]))

    def show(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1.5 else f"{value:.1f}"  # Dice/IoU to 4 places, HD95 (px) to 1
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return text if len(text) <= max_param_width else text[: max_param_width - 1] + "…"

    header = ["experiment", *changed, *scores, "data"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * (1 + len(changed)) + ["---:"] * len(scores) + ["---"]) + " |"]
    for row in rows:
        cells = [row["experiment"], *(show(row["params"].get(k)) for k in changed), *(show(row["scores"].get(k)) for k in scores), row["data"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
