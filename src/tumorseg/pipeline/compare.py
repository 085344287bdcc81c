"""The compare stage: the models' test metrics side by side, with charts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tumorseg.io import atomic_write_json, atomic_write_text, read_metrics
from tumorseg.reporting import ENSEMBLE, compare_models, comparison_chart, learning_curves_chart


def compare_step(names: list[str], *, metrics_dir: Path, reports_dir: Path) -> dict:
    results, training = {}, {}
    for name in names:
        training[name] = train = read_metrics(metrics_dir / f"train_{name}.json")
        facts = {k: train[k] for k in ("params_total", "ms_per_step", "best_val_dice", "best_epoch")}
        results[name] = read_metrics(metrics_dir / f"evaluate_{name}.json") | facts
    ensemble_path = metrics_dir / f"evaluate_{ENSEMBLE}.json"
    if len(names) >= 2 and ensemble_path.is_file():
        ensemble = read_metrics(ensemble_path)
        if ensemble.get("members") == list(names):  # not a stale file from another set of models
            results[ENSEMBLE] = ensemble | {"params_total": sum(results[n]["params_total"] for n in names)}
    sources = {r["data_source"] for r in results.values()}
    label = "SYNTHETIC phantoms" if sources == {"synthetic"} else ("real MRI" if sources == {"real"} else f"mixed ({', '.join(sorted(sources))})")
    first = next(iter(results.values()))
    # The models compared may come from different runs (another size, length or learning rate than
    # the workspace's params.yaml now): the report states each one's own, from its train JSON.
    facts = f"Test split: {first['n_images']} images, scored at {first.get('resolution', 'original')} resolution (how each model was trained: the table below)."
    markdown, summary = compare_models(results, label, facts, training)
    atomic_write_text(reports_dir / "comparison.md", markdown)
    atomic_write_json(reports_dir / "comparison.json", summary)
    comparison_chart(results, reports_dir / "comparison.png", f"Test metrics on {label}")
    histories = {n: pd.read_csv(metrics_dir / f"history_{n}.csv") for n in names if (metrics_dir / f"history_{n}.csv").exists()}
    learning_curves_chart(histories, reports_dir / "learning_curves.png", f"Learning curves on {label}")
    return summary
