"""tumorseg's benchmark suite: ours vs a reference, side by side, in the same run.

    python benchmarks/run.py                      # everything (~20 min on 2 quiet CPU cores)
    python benchmarks/run.py --quick              # smaller sizes, fewer steps (~6 min): a smoke run
    python benchmarks/run.py --only prepare augment

Benchmarks (each writes ``benchmarks/results/<name>.json``; all of them are summarised, with every
ratio and the machine's description, in ``benchmarks/results/SUMMARY.md``):

  train_step      training ms/step, batch 8 at 128² and 256², both our models (default config,
                  compiled as ``train_model`` compiles them) vs segmentation-models'
                  ``Unet('mobilenetv2')``, run from a separate venv (benchmarks/.venv-peer)
  inference       images/s at batch 1 and 8: a compiled forward pass vs a per-image ``model.predict``
                  loop; achieved GFLOP/s vs this machine's measured float32 matmul GFLOP/s
  inference_latency  ms/image at 256², batch 1 and 8: Keras vs TFLite (float32/float16/dynamic) vs
                  ONNX Runtime, both models (also inference_latency.md: the README's table)
  prepare         prepare-stage pairs/s (512² -> 256²) vs a naive cv2 read/resize/write loop
  augment         augment-stage pairs/s vs the same albumentations Compose in a naive loop
  pipeline        ``dvc repro`` no-op time in a tiny project copy; peak RSS of every stage
  input_pipeline  a training epoch fed by the real tf.data pipeline (with and without on-the-fly
                  augmentation) vs the same steps on an in-memory tensor; intra-op threads 1 vs 2

Each benchmark runs in its own process (TensorFlow's thread pools are fixed at start-up). Timings
are only meaningful on a quiet machine: every result records the load average at its start and
end, and ``quiet_machine: false`` (with a note) when something else was running.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, ForeignCpu, env_for_subprocess, is_quiet, load_average, log, machine_info, quiet_environment, result_payload  # noqa: E402

# name -> (module in benchmarks/, function(quick=...) -> result body)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "prepare": ("bench_data", "prepare_benchmark"),
    "augment": ("bench_data", "augment_benchmark"),
    "input_pipeline": ("bench_input_pipeline", "input_pipeline_benchmark"),
    "train_step": ("bench_train_step", "train_step_benchmark"),
    "inference": ("bench_inference", "inference_benchmark"),
    "inference_latency": ("inference_latency", "latency_benchmark"),
    "pipeline": ("bench_pipeline", "pipeline_benchmark"),
}


def run_child(name: str, quick: bool, results: Path) -> Path:
    """Run one benchmark in this process and write its JSON (called in a fresh child process)."""
    from tumorseg.io import atomic_write_json

    module_name, function_name = BENCHMARKS[name]
    load_start = load_average()
    started = time.perf_counter()
    function = getattr(importlib.import_module(module_name), function_name)
    extra = {"results": results} if "results" in inspect.signature(function).parameters else {}
    with ForeignCpu() as foreign:
        body = function(quick=quick, **extra)
    payload = result_payload(name, quick=quick, started=started, load_start=load_start, body=body, foreign=foreign)
    path = atomic_write_json(results / f"{name}.json", payload)
    module = importlib.import_module(module_name)
    if hasattr(module, "write_extra"):  # e.g. a markdown table beside the JSON
        module.write_extra(payload, results)
    return path


# --------------------------------------------------------------------------------------------
# SUMMARY.md
# --------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,d}"
    return "" if value is None else str(value)


def _other_cpu(result: dict[str, Any]) -> str:
    """CPU share other processes used while the benchmark ran (or the 1-minute load, for old files)."""
    if result.get("foreign_cpu_fraction") is not None:
        return f"{100 * result['foreign_cpu_fraction']:.0f}%"
    return f"load {result.get('load_avg_1m')}"


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def write_summary(results: Path, machine: dict[str, Any]) -> Path:
    """Every ratio of every result file in ``results``, the machine, and per-benchmark tables."""
    from tumorseg.io import atomic_write_text

    found = []
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    git = machine["git"]
    lines = [
        "# Benchmark summary",
        "",
        "Written by `python benchmarks/run.py` (see its docstring for what each benchmark measures);",
        "one JSON per benchmark beside this file holds every number.",
        "",
        "## Machine",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", f"{machine['cpu_model']} ({machine['machine']})"],
                ["cores", machine["cores"]],
                ["RAM", f"{machine['ram_gib']} GiB"],
                ["OS", machine["os"]],
                ["Python", machine["python"]],
                ["versions", versions],
                ["load average at start (1, 5, 15 min)", ", ".join(str(x) for x in machine["load_avg_start"])],
                ["date", machine["date"]],
                ["git commit", f"{git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}"],
            ],
        ),
        "",
    ]
    noisy = [r["benchmark"] for r in found if not r.get("quiet_machine", False)]
    if noisy:
        lines += [
            f"> **Not valid timings:** {', '.join(noisy)} ran while other processes used the CPU (see `foreign_cpu_fraction`); re-run on a quiet machine.",
            "",
        ]
    quick = [r["benchmark"] for r in found if r.get("quick")]
    if quick:
        lines += [f"> {', '.join(quick)}: `--quick` run (smaller sizes, fewer repetitions).", ""]
    lines += ["## Ratios", ""]
    rows = []
    for r in found:
        if r.get("error"):
            rows.append([r["benchmark"], f"FAILED: {r['error']}", None, None, None, _other_cpu(r), r.get("date")])
        for item in r.get("ratios", []):
            rows.append([r["benchmark"], item["what"], item["value"], item.get("target"), item.get("meets_target"), _other_cpu(r), r["machine"]["date"][:16]])
    lines += _table(["benchmark", "ratio", "value", "target", "met", "other CPU use", "measured"], rows) + [""]
    for r in found:
        lines += [f"## {r['benchmark']}", ""]
        if r.get("reference"):
            lines += [f"Reference: {r['reference']}.", ""]
        for key in ("table", "table_latency"):
            if r.get(key):
                lines += _table(r[key]["columns"], r[key]["rows"]) + [""]
        for note in r.get("notes", []):
            lines.append(f"- {note}")
        lines += ["", f"Took {r.get('seconds', 0):.0f} s{' (--quick)' if r.get('quick') else ''}; details in `{r['benchmark']}.json`.", ""]
    return atomic_write_text(results / "SUMMARY.md", "\n".join(lines))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (a smoke run, ~6 min)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    parser.add_argument("--child", choices=list(BENCHMARKS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.quick, args.results)
        return 0

    args.results.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    if not is_quiet(machine["load_avg_start"][0]):
        log(f"warning: load average {machine['load_avg_start'][0]} on {machine['cores']} cores: timings will not be valid")
    failed = []
    started = time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        log(f"{name}: starting")
        t0 = time.perf_counter()
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--results", str(args.results)] + (["--quick"] if args.quick else [])
        code = subprocess.run(command, env=env_for_subprocess(), cwd=Path(__file__).resolve().parents[1]).returncode
        if code != 0:
            failed.append(name)
            log(f"{name}: FAILED (exit code {code})")
        else:
            log(f"{name}: done in {time.perf_counter() - t0:.0f} s -> {args.results / (name + '.json')}")
    summary = write_summary(args.results, machine)
    log(f"all done in {(time.perf_counter() - started) / 60:.1f} min; summary: {summary}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    quiet_environment()
    sys.exit(main())
