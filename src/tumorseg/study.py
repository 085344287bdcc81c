"""A study across experiments: every tracked run's validation curve on one chart, and an ablation
table that shows only the settings that differ between runs, beside the scores they reached.

Reads the MLflow store (via :func:`tumorseg.tracking.study_runs`), so it covers `dvc exp run`
experiments, queued runs and resumed runs alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tumorseg.io import atomic_write_figure, atomic_write_text
from tumorseg.reporting import format_number

# Columns of the ablation table: (MLflow metric, header).
SCORE_COLUMNS = [
    ("best_val_dice", "val Dice"),
    ("test_dice", "test Dice"),
    ("test_dice_by_class_glioma", "glioma"),
    ("test_dice_by_size_small", "small third"),
    ("ms_per_step", "ms/step"),
    ("test_threshold", "test threshold"),  # how the test columns were scored (the latest evaluation)
    ("test_min_component_px", "test min blob px"),
]
COUNT_COLUMNS = {"test_min_component_px"}  # MLflow keeps every metric as a float; these are counts
# Params that differ between runs for bookkeeping reasons, not as levers, or that the table shows
# anyway (the model is in the run's label, the epochs in their own column).
IGNORED_PARAMS = {"profile", "data.local_path", "model", "epochs"}
# Scoring settings are not training levers: a run's test columns are its latest evaluation's,
# whatever these said when it was trained.
IGNORED_PREFIXES = ("evaluate.",)
# Settings that do not change what is trained (threads) or are the seed itself: runs that differ
# only in these are repeats of one configuration, summarised as mean ± std.
SEED_PARAMS = {"seed", "train.seed", "train.threads"}
SEED_SCORES = [("best_val_dice", "val Dice"), ("test_dice", "test Dice"), ("test_dice_by_class_glioma", "glioma"), ("test_dice_by_size_small", "small third")]


def owner_model(key: str) -> str | None:
    """The model a param belongs to (``models.<name>.*``, ``train.init_from.<name>``), or None."""
    parts = key.split(".")
    if parts[0] == "models" and len(parts) > 2:
        return parts[1]
    if parts[:2] == ["train", "init_from"] and len(parts) == 3:
        return parts[2]
    return None


def select_runs(runs: list[dict[str, Any]], *, data_source: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """Finished training runs (those with a best val Dice), optionally of one data kind / model."""
    chosen = []
    for run in runs:
        tags = run["tags"]
        if "best_val_dice" not in run["metrics"]:
            continue
        if data_source and tags.get("data_source") != data_source:
            continue
        if model and tags.get("model") != model:
            continue
        chosen.append(run)
    return chosen


def run_label(run: dict[str, Any]) -> str:
    tags = run["tags"]
    return f"{tags.get('model', '?')} · {tags.get('dvc_experiment') or run['run_name']}"


def varying_params(runs: list[dict[str, Any]]) -> list[str]:
    """Param keys whose value differs between runs (the levers of the study). A model's own key
    (``models.<name>.*``, ``train.init_from.<name>``) counts only when it differs between runs of
    that model. Runs logged before a setting existed lack its key: they do not make it differ from
    the one value every later run logged (unless only one run logged it: nothing to compare)."""
    keys = sorted(k for k in {k for run in runs for k in run["params"]} - IGNORED_PARAMS if not k.startswith(IGNORED_PREFIXES))
    levers = []
    for key in keys:
        pool = runs
        owner = owner_model(key)
        if owner:
            pool = [run for run in runs if run["tags"].get("model") == owner]
        logged = [run["params"][key] for run in pool if key in run["params"]]
        if len(set(logged)) > 1 or (len(logged) == 1 and len(pool) > 1):
            levers.append(key)
    return levers


def ablation_markdown(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "No finished training runs matched.\n"
    levers = varying_params(runs)
    header = ["run", *levers, "epochs", *(title for _, title in SCORE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for run in runs:
        metrics = run["metrics"]
        model = run["tags"].get("model")
        cells = [run_label(run), *("—" if owner_model(k) not in (None, model) else run["params"].get(k, "—") for k in levers), str(len(run["history"]))]
        cells += [format_number(_as_count(metrics.get(key)) if key in COUNT_COLUMNS else metrics.get(key)) for key, _ in SCORE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _as_count(value: Any) -> Any:
    return int(value) if isinstance(value, float) and math.isfinite(value) and value.is_integer() else value


def run_seed(run: dict[str, Any]) -> str:
    """The seed that trained a run (``train_seed`` tag; older runs: the top-level ``seed``)."""
    tags = run["tags"]
    return tags.get("train_seed") or tags.get("seed") or "?"


def _same_configuration(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same model, data and settings apart from seeds. A key only one run logged (a setting added
    to params.yaml after the other run) does not tell them apart."""
    if any(a["tags"].get(tag) != b["tags"].get(tag) for tag in ("model", "data_source", "data_hash")):
        return False
    ignored = SEED_PARAMS | {"profile", "data.local_path", "model"}
    shared = (a["params"].keys() & b["params"].keys()) - ignored
    return all(a["params"][key] == b["params"][key] for key in shared if not key.startswith(IGNORED_PREFIXES))


def seed_groups(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs of one configuration with different seeds (groups of two or more, in run order)."""
    groups: list[list[dict[str, Any]]] = []
    for run in runs:
        for group in groups:
            if _same_configuration(group[0], run) and run_seed(run) not in {run_seed(member) for member in group}:
                group.append(run)
                break
        else:
            groups.append([run])
    return [group for group in groups if len(group) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1): the spread a new seed would show."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")


def seeds_markdown(groups: list[list[dict[str, Any]]]) -> str:
    header = ["configuration", "seeds", *(title for _, title in SEED_SCORES)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for group in groups:
        cells = [run_label(group[0]), ", ".join(run_seed(run) for run in group)]
        for key, _ in SEED_SCORES:
            values = [run["metrics"][key] for run in group if isinstance(run["metrics"].get(key), float | int) and math.isfinite(run["metrics"][key])]
            if len(values) < 2:
                cells.append("—")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.4f} ± {std:.4f}" + ("" if len(values) == len(group) else f" (n={len(values)})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_chart(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation Dice per epoch, one line per run (PNG: viewable offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for index, run in enumerate(runs):
        if run["history"]:
            epochs, values = zip(*run["history"])
            ax.plot(epochs, values, "-", color=f"C{index % 10}", label=run_label(run), linewidth=1.2)
    ax.set(xlabel="epoch", ylabel="validation Dice (per-image mean)", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write_figure(path, fig)


def write_study(runs: list[dict[str, Any]], out_dir: Path, *, title: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    chart, table = out_dir / "val_dice_curves.png", out_dir / "ablation.md"
    curves_chart(runs, chart, title)
    text = f"# {title}\n\n![validation Dice per epoch]({chart.name})\n\n" + ablation_markdown(runs)
    groups = seed_groups(runs)
    if groups:
        text += "\n## Seeds\n\nRuns of one configuration that differ only in their seed: mean ± sample std.\n\n" + seeds_markdown(groups)
    atomic_write_text(table, text)
    return chart, table
