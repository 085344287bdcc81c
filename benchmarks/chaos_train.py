"""Chaos test of the train stage: SIGKILL it at random points, re-run until it completes, check everything.

    python benchmarks/chaos_train.py [--kills 5] [--seed 0] [--epochs 8] [--size 32] [--count 48]
                                     [--workdir DIR] [--out benchmarks/results/chaos_train.json]

Builds a scratch copy of a tiny project (synthetic phantoms, a 4-filter depth-2 U-Net at 32 px,
its own ``params.yaml`` and ``mlflow.db``), then runs ``stages/train.py --model unet`` there and
kills it with SIGKILL ``--kills`` times, re-running after each kill exactly as a user (or
``dvc repro``) would. Kill points are drawn with ``--seed`` from three kinds, so every phase gets
hit: ``startup`` (imports, MLflow set-up, data loading, before the first epoch of that attempt),
``mid_epoch`` (a random fraction into an epoch) and ``epoch_end`` (a few milliseconds after the
epoch's checkpoint starts being written: inside the checkpoint -> commit -> publish -> MLflow
window, the one place where a kill could tear a file or repeat an epoch).

After every kill, and again at the end, it checks:

- every checkpoint / model / metrics / history file that exists is complete and parseable (the
  ``.keras`` zips pass a CRC test, JSON parses, every CSV row has every column and numbers only);
- epochs are never repeated and never lost: the history CSV holds epochs 1..m exactly once each and
  agrees with ``models/.state/unet/state.json`` (m is the committed count, or one less when the kill
  came between the commit and the CSV publish); no attempt re-ran an epoch already committed;
- MLflow (queried through mlflow's client on the scratch sqlite store) holds at most ONE run for the
  model, with at most one value per epoch and metric;

and at the end: the run completed (exit 0), the final model loads in Keras and predicts, the state
folder is gone, no temporary file is left, MLflow holds exactly one FINISHED run whose per-epoch
metrics have exactly one value for each epoch 1..E, and the run is *the same run* as an
uninterrupted one of the same project (trained first, in a sibling folder): the same per-epoch
history (every column but the timings) and the same published weights. The project trains the
way real runs do — op determinism, dropout, on-the-fly augmentation, ReduceLROnPlateau (patience 1,
so the learning rate falls often) and early stopping (waiting, with patience E so the run is not cut
short) — so a kill can land right after a learning-rate cut or while early stopping waits. The
summary (kills, the phase each hit, epochs redone, every check) goes to ``--out`` as JSON; the exit
code is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, RESULTS_DIR, TINY_UNET, env_for_subprocess  # noqa: E402

MODEL = "unet"
EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+)")
PER_EPOCH_METRICS = ("loss", "dice", "val_loss", "val_dice", "lr", "epoch_seconds")


# --------------------------------------------------------------------------------------------
# The scratch project
# --------------------------------------------------------------------------------------------


def _read_metrics(path: Path) -> dict:
    from tumorseg.io import read_metrics  # run ids live in the metric file's .info.json sibling

    return read_metrics(path)


def make_project(root: Path, *, epochs: int, size: int, count: int) -> None:
    """Synthetic data, prepared splits and a params.yaml for a tiny, fast U-Net."""
    from tumorseg.config import load_config
    from tumorseg.data.synthetic import write_synthetic_dataset
    from tumorseg.pipeline.prepare import prepare_step

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(profile="full", epochs=epochs, image_size=size, batch_size=8, lr=1e-3)
    params["models"]["unet"].update(TINY_UNET, dropout=0.1)
    params["train"].update(
        deterministic=True, threads=1, early_stopping_patience=epochs, reduce_lr_patience=1, reduce_lr_factor=0.5,
        online_augment=True, use_augmented=False, lr_scale=1, lr_schedule="plateau",
    )
    params["prepare"].update(group_by="none", workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_synthetic_dataset(root / "raw", count=count, size=size, seed=0, progress=False)
    record = {"data_source": "synthetic", "data_origin": "chaos_train", "data_hash": "0" * 64}
    prepare_step(
        load_config(root / "params.yaml"),
        root / "raw" / "images",
        root / "raw" / "masks",
        root / "data" / "prepared",
        progress=False,
        report_extra=record,
    )


def train_command(root: Path) -> list[str]:
    return [
        sys.executable,
        str(PROJECT_ROOT / "stages" / "train.py"),
        "--model", MODEL,
        "--params", str(root / "params.yaml"),
        "--prepared", str(root / "data" / "prepared"),
        "--augmented", str(root / "no-augmented"),
    ]  # fmt: skip


def train_env(root: Path) -> dict[str, str]:
    return env_for_subprocess(
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        CI="true",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        TUMORSEG_PROGRESS="0",
    )


# --------------------------------------------------------------------------------------------
# One attempt: start the stage, maybe kill it at a chosen point
# --------------------------------------------------------------------------------------------


class Attempt:
    """A running ``stages/train.py`` whose stdout is watched for ``Epoch k/E`` lines."""

    def __init__(self, root: Path, log_path: Path):
        self.root, self.started = root, time.monotonic()
        self.epoch_started: dict[int, float] = {}
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            train_command(root), cwd=root, env=train_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)
            match = EPOCH_LINE.match(line.strip())
            if match:
                self.epoch_started.setdefault(int(match.group(1)), time.monotonic())

    def alive(self) -> bool:
        return self.process.poll() is None

    def sleep(self, seconds: float) -> bool:
        """Sleep while the process runs; False if it ended meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        return self.alive()

    def wait_for(self, condition, timeout: float, poll: float = 0.005) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if not self.alive():
                return False
            time.sleep(poll)
        return False

    def kill(self) -> float:
        self.process.send_signal(signal.SIGKILL)
        return time.monotonic() - self.started

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.reader.join(timeout=10)
            self.log.close()
        return code


def state_dir(root: Path) -> Path:
    return root / "models" / ".state" / MODEL


def read_state(root: Path) -> dict:
    path = state_dir(root) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def committed(root: Path) -> int:
    state = read_state(root)
    return int(state.get("epochs_done", len(state.get("history", {}))))


def checkpoint_started(root: Path, epoch: int) -> bool:
    """The checkpoint of ``epoch`` is being (or has been) written: the end-of-epoch window opened."""
    folder = state_dir(root)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return False
    tag = f"epoch-{epoch:04d}"
    return any(tag in name for name in names)


def choose_target(rng: random.Random, done: int, epochs: int) -> dict:
    kind = rng.choices(["startup", "mid_epoch", "epoch_end"], weights=[0.2, 0.4, 0.4])[0]
    if kind == "epoch_end" and done + 1 > epochs - 1:
        kind = "mid_epoch"  # always leave work after the kill
    if kind == "startup":
        return {"kind": kind, "fraction": rng.uniform(0.05, 0.95)}
    if kind == "mid_epoch":
        return {"kind": kind, "epoch": rng.randint(done + 1, min(epochs, done + 2)), "fraction": rng.uniform(0.05, 0.95)}
    return {"kind": kind, "epoch": rng.randint(done + 1, min(epochs - 1, done + 2)), "delay_s": rng.uniform(0.0, 0.08)}


def run_to_kill(attempt: Attempt, target: dict, timing: dict) -> bool:
    """Wait for the target point, then SIGKILL; False if the stage finished first."""
    root = attempt.root
    if target["kind"] == "startup":
        return attempt.sleep(target["fraction"] * timing["startup_s"]) and (attempt.kill() or True)
    epoch = target["epoch"]
    if not attempt.wait_for(lambda: epoch in attempt.epoch_started, timeout=600, poll=0.01):
        return False
    if target["kind"] == "mid_epoch":
        return attempt.sleep(target["fraction"] * timing["epoch_s"]) and (attempt.kill() or True)
    if not attempt.wait_for(lambda: checkpoint_started(root, epoch), timeout=600, poll=0.002):
        return False
    return attempt.sleep(target["delay_s"]) and (attempt.kill() or True)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def keras_zip_ok(path: Path) -> str | None:
    """None if ``path`` is a complete .keras archive; else what is wrong."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{path.name}: not a complete .keras archive ({exc})"
    if bad:
        return f"{path.name}: CRC error in {bad}"
    if not {"config.json", "model.weights.h5"} <= names:
        return f"{path.name}: missing members ({sorted(names)})"
    return None


def history_epochs(path: Path) -> tuple[list[int], list[str]]:
    """Epoch column of the history CSV, and any problem with its rows."""
    problems: list[str] = []
    if not path.exists():
        return [], problems
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][:1] != ["epoch"]:
        return [], [f"{path.name}: no header"]
    epochs = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]):
            problems.append(f"{path.name} line {number}: {len(row)} fields, header has {len(rows[0])}")
            continue
        try:
            epochs.append(int(row[0]))
            [float(value) for value in row[1:]]
        except ValueError:
            problems.append(f"{path.name} line {number}: not numbers: {row}")
    return epochs, problems


def mlflow_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    db = root / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tumorseg")
    if experiment is None:
        return []
    return [(client, run) for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.model = '{MODEL}'")]


def check_project(root: Path, *, final: bool, epochs: int) -> dict[str, object]:
    """Every invariant that must hold after a kill (``final``: after the completed run)."""
    failures: list[str] = []
    state = read_state(root)
    done = int(state.get("epochs_done", len(state.get("history", {}))))
    folder = state_dir(root)

    # Complete, parseable files
    for path in sorted((root / "models").glob("*.keras")) + (sorted(folder.glob("epoch-*.keras")) if folder.is_dir() else []):
        problem = keras_zip_ok(path)
        if problem:
            failures.append(problem)
    for key in ("checkpoint", "best_checkpoint"):
        if state.get(key) and not (folder / state[key]).exists():
            failures.append(f"state.json refers to {state[key]}, which is missing")
    for path in sorted((root / "metrics").glob("*.json")) if (root / "metrics").is_dir() else []:
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            failures.append(f"{path.name}: not valid JSON ({exc})")
    csv_epochs, problems = history_epochs(root / "metrics" / f"history_{MODEL}.csv")
    failures += problems

    # Epochs: each exactly once, consistent with the committed state
    state_epochs = sorted(int(k) for k in state.get("history", {}))
    if state_epochs != list(range(1, done + 1)):
        failures.append(f"state.json history epochs {state_epochs} != 1..{done}")
    if csv_epochs != list(range(1, len(csv_epochs) + 1)):
        failures.append(f"history CSV epochs {csv_epochs} are not 1..n exactly once")
    if folder.is_dir() and not done - 1 <= len(csv_epochs) <= done:
        failures.append(f"history CSV has {len(csv_epochs)} epochs but {done} are committed")

    # MLflow: one run, at most one value per epoch and metric
    runs = mlflow_runs(root)
    if len(runs) > 1:
        failures.append(f"MLflow holds {len(runs)} runs for {MODEL} (expected one)")
    steps_by_metric = {}
    for client, run in runs[:1]:
        for key in PER_EPOCH_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            steps_by_metric[key] = steps
            if len(steps) != len(set(steps)):
                failures.append(f"MLflow metric {key} has repeated epochs: {steps}")
            if final and steps != list(range(1, epochs + 1)):
                failures.append(f"MLflow metric {key} has steps {steps}, expected 1..{epochs} once each")
        if state.get("run_id") and state["run_id"] != run.info.run_id:
            failures.append(f"state.json remembers run {state['run_id']} but MLflow's run is {run.info.run_id}")

    result: dict[str, object] = {"epochs_committed": done, "history_csv_epochs": len(csv_epochs), "mlflow_runs": len(runs)}
    if final:
        if len(runs) != 1:
            failures.append(f"MLflow holds {len(runs)} runs for {MODEL}, expected exactly one")
        elif runs[0][1].info.status != "FINISHED":
            failures.append(f"the MLflow run is {runs[0][1].info.status}, expected FINISHED")
        if csv_epochs != list(range(1, epochs + 1)):
            failures.append(f"final history CSV epochs {csv_epochs} != 1..{epochs}")
        if folder.exists():
            failures.append(f"the resume state {folder} was left after the run completed")
        leftovers = [str(p.relative_to(root)) for d in ("models", "metrics") if (root / d).is_dir() for p in (root / d).rglob(".*") if p.is_file()]
        if leftovers:
            failures.append(f"temporary files left: {leftovers}")
        summary_path = root / "metrics" / f"train_{MODEL}.json"
        if not summary_path.exists():
            failures.append(f"{summary_path.name} is missing")
        elif runs and _read_metrics(summary_path).get("mlflow_run_id") != runs[0][1].info.run_id:
            failures.append(f"{summary_path.name} names another MLflow run than the one in the store")
        failures += final_model_loads(root / "models" / f"{MODEL}.keras")
        result["mlflow_steps"] = {k: len(v) for k, v in steps_by_metric.items()}
    result["failures"] = failures
    result["passed"] = not failures
    return result


def uninterrupted_reference(root: Path, *, timeout: float) -> Path:
    """The same project trained once without interruption, in a sibling folder."""
    import shutil

    reference = root.parent / f"{root.name}-uninterrupted"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    shutil.copy(root / "params.yaml", reference / "params.yaml")
    shutil.copytree(root / "data", reference / "data")
    result = subprocess.run(train_command(reference), cwd=reference, env=train_env(reference), capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"the uninterrupted reference run failed: {result.stderr[-2000:]}")
    return reference


def history_values(root: Path) -> dict[int, dict[str, float]]:
    with open(root / "metrics" / f"history_{MODEL}.csv", newline="") as handle:
        return {
            int(row["epoch"]): {k: float(v) for k, v in row.items() if k not in ("epoch", "epoch_seconds", "ms_per_step")}
            for row in csv.DictReader(handle)
        }


def compare_with_reference(root: Path, reference: Path) -> dict[str, object]:
    """How far the killed-and-resumed run is from the uninterrupted one (0.0 = identical)."""
    import keras
    import numpy as np

    import tumorseg.models  # noqa: F401 - registers the custom layers

    ours, theirs = history_values(root), history_values(reference)
    result: dict[str, object] = {"epochs": len(ours), "reference_epochs": len(theirs)}
    if sorted(ours) != sorted(theirs):
        return result | {"identical": False, "failure": f"epochs {sorted(ours)} != the uninterrupted run's {sorted(theirs)}"}
    history_diff = max(abs(ours[e][k] - theirs[e][k]) for e in theirs for k in theirs[e])
    first = next((e for e in sorted(theirs) if any(abs(ours[e][k] - theirs[e][k]) > 1e-6 for k in theirs[e])), None)
    weights = [keras.models.load_model(folder / "models" / f"{MODEL}.keras", compile=False).get_weights() for folder in (root, reference)]
    weight_diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(*weights, strict=True))
    lr = [theirs[e]["lr"] for e in sorted(theirs)]
    result |= {
        "max_abs_diff_history": history_diff,
        "first_differing_epoch": first,
        "max_abs_diff_weights": weight_diff,
        "lr_cuts_after_epochs": [e for e, (a, b) in enumerate(zip(lr, lr[1:]), start=1) if b < a],
        "identical": history_diff <= 1e-6 and weight_diff <= 1e-6,
    }
    return result


def final_model_loads(path: Path) -> list[str]:
    if not path.exists():
        return [f"final model {path.name} does not exist"]
    import numpy as np

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    import tumorseg.models  # noqa: F401 - registers the custom layers

    try:
        model = keras.models.load_model(path)
        shape = model.input_shape
        output = model.predict(np.zeros((1, *shape[1:]), np.float32), verbose=0)
    except Exception as exc:  # any failure to load is what this check reports
        return [f"final model {path.name} does not load: {type(exc).__name__}: {exc}"]
    if output.shape != (1, *shape[1:]) or not np.isfinite(output).all():
        return [f"final model {path.name} predicts {output.shape} / non-finite values"]
    return []


# --------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------


def chaos(root: Path, *, kills: int, seed: int, epochs: int, attempt_timeout: float, reference: Path | None = None) -> dict:
    rng = random.Random(seed)
    timing = {"startup_s": 8.0, "epoch_s": 2.0}  # refined from what the attempts show
    attempts, kill_records = [], []
    log_path = root / "train.log"
    started = time.monotonic()
    epochs_redone, completed = 0, False
    for number in range(1, kills + 50):
        done_before = committed(root)
        target = choose_target(rng, done_before, epochs) if len(kill_records) < kills else None
        attempt = Attempt(root, log_path)
        killed = run_to_kill(attempt, target, timing) if target else False
        code = attempt.wait(timeout=attempt_timeout)
        wall = time.monotonic() - attempt.started
        seen = sorted(attempt.epoch_started)
        redone = [k for k in seen if k <= done_before]
        epochs_redone += len(redone)
        if seen:  # learn the timings for the next targets
            timing["startup_s"] = max(1.0, attempt.epoch_started[seen[0]] - attempt.started)
            gaps = [attempt.epoch_started[b] - attempt.epoch_started[a] for a, b in zip(seen, seen[1:])]
            if gaps:
                timing["epoch_s"] = max(0.2, sorted(gaps)[len(gaps) // 2])
        record = {
            "attempt": number,
            "target": target,
            "killed": killed,
            "exit_code": code,
            "wall_s": round(wall, 2),
            "epochs_committed_before": done_before,
            "epochs_started": seen,
            "epochs_redone": redone,
        }
        if killed:
            check = check_project(root, final=False, epochs=epochs)
            after = check["epochs_committed"]
            record["phase"] = describe_phase(target, done_before, after, seen)
            record["epochs_committed_after"] = after
            record["checks"] = check
            kill_records.append(record)
            attempts.append(record)
            print(
                f"kill {len(kill_records)}/{kills}: {record['phase']} at {wall:.1f} s; committed {done_before} -> {after}; "
                f"checks {'passed' if check['passed'] else 'FAILED: ' + '; '.join(check['failures'])}",
                flush=True,
            )
            if not state_dir(root).exists() and (root / "metrics" / f"train_{MODEL}.json").exists():
                record["phase"] = "after the stage finished its work (outputs complete)"
                completed = True
                break
            continue
        attempts.append(record)
        if code != 0:
            print(f"attempt {number} failed with exit code {code}; see {log_path}", flush=True)
            break
        print(f"attempt {number}: completed (exit 0) in {wall:.1f} s", flush=True)
        completed = True
        break
    final = check_project(root, final=True, epochs=epochs)
    if reference is not None:
        final["resume_equality"] = compare_with_reference(root, reference)
        if not final["resume_equality"]["identical"]:
            final["failures"].append(f"the resumed run differs from the uninterrupted one: {final['resume_equality']}")
            final["passed"] = False
    if not completed:
        final["failures"].append(f"the stage did not complete: the last attempt exited with code {attempts[-1]['exit_code']} (log: {log_path})")
        final["passed"] = False
    if epochs_redone:
        final["failures"].append(f"{epochs_redone} committed epoch(s) were trained again")
        final["passed"] = False
    checks_passed = all(r["checks"]["passed"] for r in kill_records) and final["passed"]
    return {
        "benchmark": "chaos_train",
        "what": f"SIGKILL stages/train.py --model {MODEL} at random points, re-run until complete",
        "seed": seed,
        "kills_requested": kills,
        "kills_done": len(kill_records),
        "epochs": epochs,
        "attempts": len(attempts),
        "epochs_redone": epochs_redone,
        "kills": kill_records,
        "final": final,
        "checks_passed": checks_passed and len(kill_records) == kills,
        "wall_s": round(time.monotonic() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def describe_phase(target: dict, before: int, after: int, seen: list[int]) -> str:
    if not seen:
        return "startup (imports / MLflow / data, before any epoch began)"
    current = seen[-1]
    if after > before and after == current:
        return f"end of epoch {current}, after its commit (publishing / MLflow)"
    if target["kind"] == "epoch_end":
        return f"end of epoch {current}, checkpoint written but not committed"
    return f"during epoch {current} (before its commit)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs before the run may complete (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side (divisible by 32)")
    parser.add_argument("--count", type=int, default=48, help="synthetic pairs")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--attempt-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "chaos_train.json")
    args = parser.parse_args()
    if args.kills < 0 or args.epochs < 2 or args.size % 32:
        parser.error("--kills must be >= 0, --epochs >= 2, --size divisible by 32")

    from tumorseg.io import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="chaos-train-") as scratch:
        root = args.workdir or Path(scratch) / "project"  # the uninterrupted reference goes beside it
        root.mkdir(parents=True, exist_ok=True)
        make_project(root, epochs=args.epochs, size=args.size, count=args.count)
        reference = uninterrupted_reference(root, timeout=args.attempt_timeout)
        summary = chaos(root, kills=args.kills, seed=args.seed, epochs=args.epochs, attempt_timeout=args.attempt_timeout, reference=reference)
        summary["workdir"] = str(root) if args.workdir else "(temporary)"
    atomic_write_json(args.out, summary)
    failures = [f for r in summary["kills"] for f in r["checks"]["failures"]] + summary["final"]["failures"]
    print(json.dumps({k: summary[k] for k in ("kills_done", "attempts", "epochs_redone", "checks_passed", "wall_s")}))
    if failures or not summary["checks_passed"]:
        failures = failures or [f"kills done {summary['kills_done']} of {summary['kills_requested']}, epochs redone {summary['epochs_redone']}"]
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"passed: {summary['kills_done']} kills, {summary['attempts']} attempts, 0 epochs redone -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
