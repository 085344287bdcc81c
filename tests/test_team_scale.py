"""Team scale, for real: training against the PostgreSQL-backed MLflow server while it is killed,
queued DVC experiments running in parallel against it, and multi-worker training across processes.

Every test runs real processes (PostgreSQL, ``mlflow server``, the training stage, ``dvc queue``,
two TensorFlow workers); nothing is mocked. The server tests share one stack (test_server.py's
``stack`` fixture pattern: a fresh state folder, always stopped).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import PROJECT_ROOT, TINY_PIPELINE, TINY_UNET, blob_pair, copy_pipeline, missing_postgres, train_stage_command, write_pair
from tumorseg import server

EPOCHS = 10


MISSING = missing_postgres()
needs_postgres = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))


def _prepared_project(root: Path, **train) -> Path:
    """A workspace with params.yaml (a small U-Net on 32x32 discs) and data/prepared, no DVC."""
    from tumorseg.config import load_config
    from tumorseg.pipeline.prepare import prepare_step

    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(profile="full", epochs=EPOCHS, image_size=32, batch_size=8, lr=3e-3)
    params["models"]["unet"].update(TINY_UNET, base_filters=8, dropout=0.0)
    params["models"]["umobilenetv2"].update(alpha=0.35, encoder_weights="none", decoder_filters=[16, 8, 8, 8, 8])
    params["train"].update(deterministic=False, threads=1, use_augmented=False, early_stopping_patience=0, **train)
    params["prepare"].update(group_by="none", workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for index in range(1, 49):
        write_pair(root / "raw", f"{index}.png", *blob_pair(32, index))
    record = {"data_source": "synthetic", "data_origin": "test", "data_hash": "0" * 64}
    raw = root / "raw"
    prepare_step(load_config(root / "params.yaml"), raw / "images", raw / "masks", root / "data" / "prepared", progress=False, report_extra=record)
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_", "TF_CONFIG"))}
    return env | {"CI": "true", "TF_CPP_MIN_LOG_LEVEL": "3", "TUMORSEG_PROGRESS": "0", "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def _state(root: Path, model: str = "unet") -> dict:
    try:
        return json.loads((root / "models" / ".state" / model / "state.json").read_text())
    except (OSError, ValueError):
        return {}


# --- the tracking server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack():
    """One started stack for the module, in a /tmp folder the ``postgres`` user can enter; always stopped."""
    if MISSING is not None:
        pytest.fail(f"CI must run the server tests: {MISSING}")
    root = Path(tempfile.mkdtemp(prefix="tumorseg-team-"))
    root.chmod(0o755)
    state_dir = root / "state"
    started: list[server.Started] = []
    try:
        started.append(server.start(state_dir, workers=2, timeout=150))
        yield state_dir, started
    finally:
        with contextlib.suppress(Exception):
            server.stop(state_dir)
        for begun in started:
            with contextlib.suppress(OSError):
                os.killpg(begun.status.mlflow_pid or 0, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.server
@needs_postgres
def test_training_survives_a_killed_server_and_resumes_into_one_run(stack, tmp_path: Path):
    """The stage trains against the server; the server is SIGKILLed mid-training; the stage stops
    with one line; the server is started again and the stage rerun: one complete run, each epoch
    logged once, one logged model, which downloads and predicts and registers."""
    state_dir, started = stack
    uri = started[0].uri
    root = _prepared_project(tmp_path / "project")
    env = _env(MLFLOW_TRACKING_URI=uri)
    process = subprocess.Popen(train_stage_command(root), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while _state(root).get("epochs_done", 0) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"training ended (rc {process.returncode}) before the kill point: {process.stderr.read()[-2000:]}"
        os.killpg(server.status(state_dir).mlflow_pid, signal.SIGKILL)  # the server dies as in a crash
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    lines = stderr.strip().splitlines()
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    refused = r"failed \(no answer(?:: connection refused)?\)"  # refused, or cut off mid-request
    one_line = rf"error: MLflow tracking store {re.escape(uri)} {refused}; training stopped with (\d+) of {EPOCHS} epochs saved; .+"
    stopped = re.fullmatch(one_line, lines[-1])
    assert stopped, lines[-1]
    saved = int(stopped.group(1))
    assert 2 <= saved < EPOCHS and _state(root)["epochs_done"] == saved

    again = server.start(state_dir, workers=2, timeout=150)  # recovers from the dead server, same database
    started.append(again)
    assert again.uri == uri
    resumed = subprocess.run(train_stage_command(root), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training" in resumed.stderr

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI another test set
    experiment = client.get_experiment_by_name("tumorseg")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.model = 'unet'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["data_source"] == "synthetic"
    for key in ("val_dice", "loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)  # every epoch once, the lost one repaired
    assert "best_val_dice" in run.data.metrics
    contexts = sorted(d.dataset.name + "/" + next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs)
    assert len(contexts) == len(set(contexts)) == 2, contexts  # train and val, not logged twice
    (logged,) = client.search_logged_models(experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert str(logged.status).endswith("READY")

    # the logged model comes back from the server's artifact store and predicts
    from tumorseg.tracking import load_keras_model

    model = load_keras_model(f"models:/{logged.model_id}", uri)
    image, _ = blob_pair(32, 1000)
    assert model.predict(image[None, ..., None].astype("float32"), verbose=0).shape == (1, 32, 32, 1)
    registered = subprocess.run(
        [sys.executable, "-m", "tumorseg.cli", "register", "--model-id", logged.model_id, "--name", "team-unet", "--alias", "candidate", "--tracking-uri", uri],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr[-3000:]
    version = client.get_model_version_by_alias("team-unet", "candidate")
    assert version.run_id == run.info.run_id and version.status == "READY"


QUEUED_PIPELINE = TINY_PIPELINE | {  # two at once on 2 cores
    "epochs": 3,
    "models": {**TINY_PIPELINE["models"], "unet": TINY_UNET},
    "train": {**TINY_PIPELINE["train"], "threads": 1},
}


def _dvc_project(root: Path, env: dict) -> Path:
    """A git + DVC copy of the project running the quick profile at toy size."""
    copy_pipeline(root, QUEUED_PIPELINE)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    return root


@pytest.mark.slow
@pytest.mark.server
@needs_postgres
def test_queued_experiments_run_two_at_a_time_against_the_server(stack, tmp_path: Path):
    """`dvc exp run --queue` x2 + `dvc queue start -j 2` with MLFLOW_TRACKING_URI on the server:
    both experiments complete, each with its three runs (two trained models, the ensemble) tagged
    with its DVC experiment name and every epoch's metrics; `dvc exp show` lists both."""
    state_dir, started = stack
    started.append(server.start(state_dir, workers=2, timeout=150))  # running, whatever the test before did to it
    uri = started[-1].uri
    env = _env(
        MLFLOW_TRACKING_URI=uri,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost",
    )  # fmt: skip
    root = _dvc_project(tmp_path / "project", env)
    dvc = [sys.executable, "-m", "dvc"]
    names = ["lr-1e-3", "lr-3e-3"]
    for name, lr in zip(names, ("1e-3", "3e-3")):
        queued = subprocess.run([*dvc, "exp", "run", "--queue", "-n", name, "-S", f"lr={lr}"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert queued.returncode == 0, queued.stderr[-3000:]
    began = time.monotonic()
    # the queue's workers are detached children that inherit stdout/stderr: a pipe would stay open
    # until they finish, so `start` writes to a file
    with open(tmp_path / "queue-start.log", "w+") as log:
        start = subprocess.run([*dvc, "queue", "start", "-j", "2"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
        log.seek(0)
        assert start.returncode == 0, log.read()[-3000:]
    status = ""
    while time.monotonic() - began < 1500:
        status = subprocess.run([*dvc, "queue", "status"], cwd=root, env=env, capture_output=True, text=True, timeout=300).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)
    seconds = time.monotonic() - began
    with contextlib.suppress(subprocess.SubprocessError):  # the workers end when idle; make sure
        subprocess.run([*dvc, "queue", "stop"], cwd=root, env=env, capture_output=True, timeout=120)
    logs = {name: subprocess.run([*dvc, "queue", "logs", name], cwd=root, env=env, capture_output=True, text=True, timeout=300).stdout for name in names}
    assert status.count("Success") == 2, f"{status}\n" + "\n".join(f"--- {n}\n{log[-3000:]}" for n, log in logs.items())
    shown = subprocess.run([*dvc, "exp", "show", "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in names:
        assert f'"{name}"' in shown.stdout, f"dvc exp show lacks {name}"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI another test set
    experiment = client.get_experiment_by_name("tumorseg")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_experiment != ''")
    by_experiment: dict[str, list] = {}
    for run in runs:
        by_experiment.setdefault(run.data.tags["dvc_experiment"], []).append(run)
    assert sorted(by_experiment) == names, sorted(by_experiment)
    for name, found in by_experiment.items():
        assert sorted(r.data.tags["model"] for r in found) == ["ensemble", "umobilenetv2", "unet"], name
        pipelines = {r.data.tags["pipeline"] for r in found}
        assert len(pipelines) == 1, f"{name}: runs of one experiment share its pipeline tag"
        for run in found:
            assert run.info.status == "FINISHED" and "test_dice" in run.data.metrics, (name, run.data.tags["model"])
            if run.data.tags["model"] != "ensemble":
                assert run.data.params["lr"] == {"lr-1e-3": "0.001", "lr-3e-3": "0.003"}[name]
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice"))
                assert steps == list(range(1, QUEUED_PIPELINE["epochs"] + 1)), (name, run.data.tags["model"], steps)
    measured = {
        "what": "dvc exp run --queue x2, dvc queue start -j 2, against tumorseg server (PostgreSQL + MLflow)",
        "command": "pytest -s -m server tests/test_team_scale.py -k queue (TUMORSEG_RESULTS_DIR=docs/results writes this file)",
        "data_source": "synthetic phantoms, quick profile at toy size (40 images, 32x32, 3 epochs; TINY_UNET plain U-Net, tiny UMobileNetV2)",
        "machine": f"{os.cpu_count()} CPUs",
        "experiments": len(names),
        "jobs": 2,
        "seconds": round(seconds, 1),
        "runs": len(runs),
        "failed": status.count("Failed"),
    }
    print(f"dvc queue against the server: {measured}")
    if os.environ.get("TUMORSEG_RESULTS_DIR"):  # how the README's numbers were made (see docs/results/team-queue.json)
        Path(os.environ["TUMORSEG_RESULTS_DIR"], "team-queue.json").write_text(json.dumps(measured, indent=2) + "\n")


# --- multi-worker training ---------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _last_val_dice(log: str) -> str:
    found = re.findall(r"val_dice: ([0-9.]+)", log)
    assert found, log[-2000:]
    return found[-1]


@pytest.mark.slow
def test_two_workers_train_in_step_and_only_the_chief_writes(tmp_path: Path):
    """Two processes with TF_CONFIG on loopback (``train.distribute: multi_worker``): both finish
    every epoch with the same numbers (one synchronised model), and only the chief (worker 0)
    writes the model, the metric files and the MLflow run; the other worker leaves nothing."""
    root = _prepared_project(tmp_path / "project", distribute="multi_worker")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = _env(TF_CONFIG=tf_config, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        workers.append(subprocess.Popen(train_stage_command(root), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=600)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(log[-3000:] for log in logs)
    assert len(re.findall(r"Epoch \d+/3", logs[1])) == 3 and "worker1 finished 3 epochs with the chief" in logs[1]
    assert _last_val_dice(logs[0]) == _last_val_dice(logs[1]), "the workers' models differ: not one synchronised run"
    assert (root / "models" / "unet.keras").is_file() and (root / "metrics" / "train_unet.json").is_file()
    assert not (root / "models" / ".state" / "unet-worker1").exists(), "the non-chief worker left its scratch folder"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tumorseg").experiment_id])
    assert len(runs) == 1, "only the chief opens an MLflow run"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")] == [1, 2, 3]
    history = np.genfromtxt(root / "metrics" / "history_unet.csv", delimiter=",", names=True)
    assert f"{history['val_dice'][-1]:.4f}" == _last_val_dice(logs[0])


def test_a_malformed_tf_config_is_one_line():
    from tumorseg.errors import UsageError
    from tumorseg.runtime import worker_role

    assert worker_role("") == ("chief", 0, True)
    assert worker_role('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}') == ("worker", 1, False)
    assert worker_role('{"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}')[2] is False
    assert worker_role('{"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "chief", "index": 0}}')[2] is True
    with pytest.raises(UsageError, match="TF_CONFIG is not a multi-worker spec"):
        worker_role("{not json")
