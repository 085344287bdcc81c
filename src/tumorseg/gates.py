"""The metric gate: evaluate metrics vs thresholds in params.yaml (`ci:`) and an optional baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tumorseg.io import read_metrics

GATED_METRICS = ("dice", "iou")  # higher is better; compared against the baseline


@dataclass
class Check:
    model: str
    check: str
    value: float | None
    limit: float | None
    passed: bool
    note: str = ""


def check_metrics(
    metrics_dir: Path,
    *,
    models: list[str],
    profile: str,
    min_dice: dict[str, dict[str, float]],
    baseline_dir: Path | None,
    max_regression: float,
) -> list[Check]:
    checks: list[Check] = []
    thresholds = min_dice.get(profile, {})
    for model in models:
        path = metrics_dir / f"evaluate_{model}.json"
        if not path.exists():
            checks.append(Check(model, "metrics file", None, None, False, f"{path} missing: run `dvc repro evaluate`"))
            continue
        current = read_metrics(path)
        dice = current.get("dice")
        if model in thresholds:
            ok = isinstance(dice, (int, float)) and math.isfinite(dice) and dice >= thresholds[model]
            checks.append(Check(model, f"dice >= min_dice.{profile}", dice, thresholds[model], ok, f"data: {current.get('data_source', '?')}"))
        else:
            checks.append(Check(model, "dice threshold", dice, None, True, f"no ci.min_dice.{profile}.{model} set"))
        if baseline_dir is not None:
            base_path = Path(baseline_dir) / f"evaluate_{model}.json"
            if not base_path.exists():
                checks.append(Check(model, "baseline", None, None, False, f"{base_path} missing"))
                continue
            baseline = read_metrics(base_path)
            for key in GATED_METRICS:
                value, reference = current.get(key), baseline.get(key)
                if not isinstance(reference, (int, float)):
                    continue
                limit = reference - max_regression
                ok = isinstance(value, (int, float)) and value >= limit
                checks.append(Check(model, f"{key} >= baseline - {max_regression:g}", value, limit, ok, f"baseline {reference:.4f}"))
    return checks


def format_checks(checks: list[Check]) -> str:
    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    rows = [("model", "check", "value", "limit", "result", "note")]
    rows += [(c.model, c.check, fmt(c.value), fmt(c.limit), "PASS" if c.passed else "FAIL", c.note) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
