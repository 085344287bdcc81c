"""Helpers shared by the benchmark suite: machine description, timing statistics, result files.

Every result file carries the machine it was measured on and the load average when it started, so
a number taken on a busy machine can never pass for a quiet-machine result.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
# A 1-minute load average above this fraction of the cores means something else was running
# (checked before a benchmark starts; during the run, :class:`ForeignCpu` decides).
QUIET_LOAD_FRACTION = 0.5
# Other processes using more than this fraction of all cores during a benchmark make it invalid.
QUIET_FOREIGN_FRACTION = 0.10
# Environment every benchmark process and child gets unless the caller set it: no TensorFlow info
# logs, no albumentations update check, no DVC/MLflow telemetry.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
# ``python -c TUMORSEG_CLI ARGS...`` runs ``tumorseg ARGS...`` with this interpreter (no console script needed).
TUMORSEG_CLI = "import sys; from tumorseg.cli import main; sys.exit(main(sys.argv[1:]))"
# The U-Net of the tests and benchmarks that exercise training itself (resume, faults, chaos,
# distillation, the team server), not the architecture: 4 filters, depth 2, plain blocks. HAC's
# parallel branches make the training graph ~5x larger (286 weights against 56), and tracing that
# graph, not the few steps, is where such a short run spends its time. The HAC and CASPP blocks
# keep their own tests (tests/test_models.py), and the pipeline end to end trains them
# (tests/test_pipeline_e2e.py, `make run`).
TINY_UNET = {"base_filters": 4, "depth": 2, "use_hac": False, "use_caspp": False}


def cores() -> int:
    from tumorseg.processes import default_workers  # one definition of "the CPUs we may use"

    return default_workers()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def is_quiet(load_1m: float) -> bool:
    return load_1m < QUIET_LOAD_FRACTION * cores()


class ForeignCpu:
    """CPU time that *other* processes used while a benchmark ran, as a fraction of all cores.

    Machine-wide busy time (``/proc/stat``) minus this process's own CPU time and that of its
    reaped children. Unlike the load average, it does not lag a minute behind and does not count
    the benchmark itself (which keeps every core busy), so it tells a quiet run from a contended one.
    """

    def __enter__(self) -> ForeignCpu:
        self.fraction: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return  # not on Linux: unknown
        wall = end[0] - self._start[0]
        machine = end[1] - self._start[1]
        own = end[2] - self._start[2]
        if wall > 0:
            self.fraction = round(max(0.0, machine - own) / (wall * cores()), 3)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(x) for x in fields]
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user nice system [idle iowait] irq softirq steal
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        hz = os.sysconf("SC_CLK_TCK")
        return time.monotonic(), busy / hz, own + _live_descendants_ticks() / hz

    @property
    def quiet(self) -> bool:
        return self.fraction is not None and self.fraction < QUIET_FOREIGN_FRACTION


def _live_descendants_ticks() -> int:
    """CPU ticks of our live descendants and of the children they reaped: worker pools started by
    forkserver are the forkserver's children, not ours, and ``os.times`` never sees them."""
    parents: dict[int, int] = {}
    spent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        parents[int(entry.name)] = int(fields[1])
        spent[int(entry.name)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    return sum(spent[pid] for pid in mine)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a number: CPU, cores, RAM, versions, load, date, commit."""
    load = load_average()
    packages = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "opencv-python-headless", "albumentations", "dvc")
    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cores": cores(),
        "ram_gib": ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: v for name in packages if (v := _version(name))},
        "load_avg_start": load,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
    }


def sample_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times: each timed call's milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(1000.0 * (time.perf_counter() - started))
    return samples


def timings_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> dict[str, float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; per-call milliseconds."""
    return summarise_ms(sample_ms(fn, warmup=warmup, repeats=repeats), warmup)


def summarise_ms(samples: list[float], warmup: int = 0) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples), 3),
        "min_ms": round(min(samples), 3),
        "max_ms": round(max(samples), 3),
        "n": len(samples),
        "warmup": warmup,
    }


def ratio(what: str, value: float, *, target: float | None = None, higher_is_better: bool = True) -> dict[str, Any]:
    """One headline ratio of a benchmark (listed in SUMMARY.md)."""
    row: dict[str, Any] = {"what": what, "value": round(float(value), 3)}
    if target is not None:
        row["target"] = target
        row["meets_target"] = bool(value >= target) if higher_is_better else bool(value <= target)
    return row


def result_payload(
    name: str,
    *,
    quick: bool,
    started: float,
    load_start: list[float],
    body: dict[str, Any],
    foreign: ForeignCpu | None = None,
) -> dict[str, Any]:
    """The result file's content. Quiet = nothing else ran: by :class:`ForeignCpu` when given
    (precise), else by the load average at the start and end (lags, and counts the benchmark)."""
    load_end = load_average()
    measured = foreign is not None and foreign.fraction is not None
    payload = {
        "benchmark": name,
        "quick": quick,
        "load_avg_1m": load_start[0],
        "load_avg_1m_end": load_end[0],
        "foreign_cpu_fraction": foreign.fraction if measured else None,
        "quiet_machine": foreign.quiet if measured else is_quiet(load_start[0]) and is_quiet(load_end[0]),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info() | {"load_avg_start": load_start, "load_avg_end": load_end},
    }
    payload.update(body)
    payload.setdefault("ratios", [])
    payload.setdefault("notes", [])
    if not payload["quiet_machine"]:
        payload["notes"].append(not_quiet_note(load_start[0], load_end[0], foreign))
    return payload


def not_quiet_note(load_start: float, load_end: float, foreign: ForeignCpu | None) -> str:
    if foreign is not None and foreign.fraction is not None:
        why = f"other processes used {100 * foreign.fraction:.0f}% of the {cores()} cores while it ran"
    else:
        why = f"the 1-minute load average was {load_start} at the start and {load_end} at the end on {cores()} cores"
    return f"NOT a valid timing: {why} (something else was running). Re-run on a quiet machine."


def env_for_subprocess(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in QUIET_ENV.items():
        env.setdefault(key, value)
    env.update(extra)
    return env


def quiet_environment() -> None:
    """:data:`QUIET_ENV` for this process (call before TensorFlow or albumentations is imported)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def cli_command(*args: str) -> list[str]:
    """``tumorseg ARGS...`` as a command line for this interpreter."""
    return [sys.executable, "-c", TUMORSEG_CLI, *args]


def copy_pipeline(root: Path, quick_profile: dict[str, Any]) -> Path:
    """Copy the pipeline (dvc.yaml, params.yaml, .gitignore, stages/, src/) into a new folder
    ``root``, set to synthetic data under the quick profile replaced by ``quick_profile``; no git
    or DVC repository yet (the caller initialises them with its own environment). The one copy
    of the toy project for benchmarks and tests (tests/helpers.py re-exports it)."""
    import shutil

    import yaml

    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    for folder in ("stages", "src"):
        shutil.copytree(PROJECT_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profile"] = "quick"
    params["data"]["source"] = "synthetic"
    params["profiles"]["quick"] = quick_profile
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def untrained_params(name: str, overrides: dict[str, Any] | None = None, *, cfg: Any = None) -> dict[str, Any]:
    """``name``'s model parameters from ``cfg`` (default: ``Config()``) for an untrained benchmark
    model: UMobileNetV2 without its ImageNet encoder (nothing downloaded; speed does not depend on
    the weights), then ``overrides`` (tests use tiny models)."""
    if cfg is None:
        from tumorseg.config import Config

        cfg = Config()
    untrained = {"encoder_weights": "none"} if name == "umobilenetv2" else {}
    return getattr(cfg.models, name).model_dump() | untrained | (overrides or {})


def save_model_in_subprocess(path: Path, name: str, size: int, params: dict[str, Any] | None = None, *, env: dict[str, str] | None = None) -> Path:
    """Build ``name`` at ``size`` x ``size`` (untrained) and save it to ``path`` in a fresh process,
    so that TensorFlow is never imported into the measuring one."""
    script = (
        "import json, sys; from tumorseg.models import build_model; "
        "build_model(sys.argv[2], (int(sys.argv[3]), int(sys.argv[3]), 1), **json.loads(sys.argv[4])).save(sys.argv[1])"
    )
    command = [sys.executable, "-c", script, str(path), name, str(size), json.dumps(params or {})]
    subprocess.run(command, env=env or env_for_subprocess(), check=True, capture_output=True, timeout=600)
    return path


def log(message: str, *, who: str = "bench") -> None:
    print(f"[{who} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
