"""The DVC pipeline at tiny scale: first ``dvc repro``, no-op ``dvc repro``, peak RSS of each stage.

A copy of the project (dvc.yaml, params.yaml, stages/, src/) in a temporary git + DVC repository,
with a tiny synthetic configuration (like tests/test_pipeline_e2e.py). Every stage command in the
copy's dvc.yaml is prefixed with a small wrapper that records the peak resident set size of the
stage's whole process tree (``os.wait4``'s ``ru_maxrss``, which includes the worker processes it
waited for). The no-op time is what every ``dvc repro`` / ``dvc exp run`` pays before running
anything: hashing the workspace against dvc.lock.

The reference: a stage's peak RSS is compared with the bare cost of its imports (the process floor
that no configuration can lower), measured the same way.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from common import PROJECT_ROOT, copy_pipeline, log, ratio

TINY = {
    "epochs": 2,
    "image_size": 32,
    "data": {"synthetic_count": 40, "synthetic_size": 64},
    "augment": {"copies_per_image": 1, "preview_pairs": 2},
    "prepare": {"group_by": "none"},
    "models": {
        "unet": {"base_filters": 4, "depth": 2, "caspp_rates": [1, 2]},
        "umobilenetv2": {"alpha": 0.35, "encoder_weights": "none", "decoder_filters": [16, 8, 8, 8, 8]},
    },
    "train": {"deterministic": False, "early_stopping_patience": 0},
}

WRAPPER = '''"""Run a command; append its process tree's peak RSS (MiB) to rss.jsonl (benchmarks/bench_pipeline.py)."""
import json, os, subprocess, sys, time
name, command = sys.argv[1], sys.argv[3:]
started = time.perf_counter()
child = subprocess.Popen(command)
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open("rss.jsonl", "a") as handle:
    seconds = round(time.perf_counter() - started, 2)
    handle.write(json.dumps({"stage": name, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": seconds, "exit_code": child.returncode}) + "\\n")
sys.exit(child.returncode)
'''

FLOOR = "import {modules}; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        CI="true",
        TF_CPP_MIN_LOG_LEVEL="2",
        NO_ALBUMENTATIONS_UPDATE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost",
    )  # fmt: skip
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def make_project(root: Path, profile: dict[str, Any], env: dict[str, str]) -> None:
    """A git + DVC repository holding a copy of the pipeline, every stage wrapped for RSS."""
    copy_pipeline(root, profile)
    pipeline = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    for name, stage in pipeline["stages"].items():
        body = stage["do"] if "foreach" in stage else stage
        label = f"{name}@${{item}}" if "foreach" in stage else name
        body["cmd"] = f"python rss_wrap.py {label} -- {body['cmd']}"
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / "rss_wrap.py").write_text(WRAPPER)
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "\n/rss.jsonl\n")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        _run(command, root, env)


def import_floor_mib(modules: str, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", FLOOR.format(modules=modules)], env=env, capture_output=True, text=True, check=True).stdout
    return round(int(out.strip().splitlines()[-1]) / 1024, 1)


def pipeline_benchmark(*, quick: bool, noop_repeats: int | None = None, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    noop_repeats = noop_repeats or (2 if quick else 3)
    profile = profile or TINY
    env = _env()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        root = Path(scratch) / "project"
        make_project(root, profile, env)
        log("pipeline: first dvc repro of the tiny project (every stage runs)")
        first_s, _ = _run([sys.executable, "-m", "dvc", "repro"], root, env)
        stages = [json.loads(line) for line in (root / "rss.jsonl").read_text().splitlines()]
        noop = []
        for _ in range(noop_repeats):
            seconds, output = _run([sys.executable, "-m", "dvc", "repro"], root, env)
            if "Running stage" in output:
                raise RuntimeError(f"the second dvc repro was not a no-op:\n{output[-2000:]}")
            noop.append(seconds)
        status_s, _ = _run([sys.executable, "-m", "dvc", "status"], root, env)
        files = sum(1 for p in root.rglob("*") if p.is_file() and ".dvc" not in p.parts and ".git" not in p.parts)
    log(f"pipeline: first repro {first_s:.0f} s, no-op {statistics.median(noop):.1f} s")
    floors = {"python + numpy + cv2": import_floor_mib("numpy, cv2", env), "python + tensorflow + keras": import_floor_mib("tensorflow, keras", env)}
    peak = max(stages, key=lambda s: s["peak_rss_mib"])
    noop_s = statistics.median(noop)
    return {
        "reference": "the import floor: peak RSS of a process that only imports the stage's libraries",
        "profile": profile,
        "first_repro_seconds": round(first_s, 1),
        "noop_repro_seconds": [round(x, 2) for x in noop],
        "noop_repro_seconds_median": round(noop_s, 2),
        "dvc_status_seconds": round(status_s, 2),
        "workspace_files": files,
        "stages": stages,
        "import_floor_mib": floors,
        "table": {"columns": ["stage", "peak RSS (MiB)", "seconds"], "rows": [[s["stage"], s["peak_rss_mib"], s["seconds"]] for s in stages]},
        "ratios": [
            ratio("dvc repro no-op / first repro (tiny project), time", noop_s / first_s, higher_is_better=False),
            ratio(
                f"largest stage peak RSS ({peak['stage']}) / TensorFlow import floor",
                peak["peak_rss_mib"] / floors["python + tensorflow + keras"],
                higher_is_better=False,
            ),
        ],
        "notes": [
            f"no-op `dvc repro`: {noop_s:.1f} s median of {noop_repeats} ({files} workspace files); first repro {first_s:.0f} s",
            "peak RSS measured on a TINY configuration (32² images, 40 pairs): it is mostly the libraries' own footprint; "
            "a real run adds the in-memory training set (N x S² x 2 bytes: 2,572 slices at 256² = 340 MB) and the activations of a batch",
        ],
    }
