"""``tumorseg server``: PostgreSQL and an MLflow tracking server as real processes, no mocks.

Needs PostgreSQL's binaries (Debian: ``apt-get install postgresql``; ``.ci/run`` installs it): the
tests that run it skip with the reason when they are absent, except under CI (``CI`` set), where
their absence is a failure. One stack serves the module (started once, ~15-30 s on 2 busy cores)
and is always stopped at the end, also when a test fails; its state folder is a fresh folder in
/tmp open to other users (o+x), because as root PostgreSQL runs as the ``postgres`` user, who
cannot enter pytest's private (0700) tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from helpers import missing_postgres
from tumorseg import server
from tumorseg.errors import ServerError

pytestmark = pytest.mark.server
HAVE_PROC = Path("/proc/self/stat").exists()


MISSING = missing_postgres()
needs_postgres = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tumorseg.cli", "server", *args], capture_output=True, text=True, timeout=timeout)


def _our_processes(state_dir: Path, groups: set[int]) -> list[str]:
    """Live processes that belong to the stack, found independently of tumorseg.server: any whose
    command line names the state folder (postgres -D ..., mlflow --artifacts-destination ...) or
    that sits in one of ``groups`` (the MLflow server's process groups: uvicorn, its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state not in ("Z", "X") and (str(state_dir) in command or int(pgrp) in groups):
            found.append(f"{entry.name}: {command.strip()[:120]}")
    return found


@pytest.fixture(scope="module")
def stack():
    """A state folder with the stack started; stopped (and any survivor SIGKILLed) at the end."""
    if MISSING is not None:
        pytest.fail(f"CI must run the server tests: {MISSING}")
    root = Path(tempfile.mkdtemp(prefix="tumorseg-server-"))
    root.chmod(0o755)
    state_dir = root / "state"
    groups: set[int] = set()
    try:
        yield state_dir, groups
    finally:
        with contextlib.suppress(Exception):
            server.stop(state_dir)
        state = server.read_state(server.layout(state_dir))
        for pgid in groups | {state.get("mlflow_pid") or 0}:
            if pgid:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
        database = server.postmaster(server.layout(state_dir))
        if database:
            with contextlib.suppress(OSError):
                os.kill(database.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _start(state_dir: Path, groups: set[int]) -> server.Started:
    started = server.start(state_dir, workers=1, timeout=150)
    groups.add(started.status.mlflow_pid or 0)
    return started


CLIENT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from tumorseg.tracking import _mlflow

    mlflow = _mlflow()  # the project's client settings: no retries, 10 s timeout
    assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_experiment("server-test")
    with mlflow.start_run(run_name="a") as run:
        mlflow.log_param("lr", 0.001)
        for step in range(5):
            mlflow.log_metric("val_dice", 0.5 + step / 10, step=step)
        mlflow.set_tag("data_source", "synthetic")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "notes.txt")
            open(path, "w").write("served artifact")
            mlflow.log_artifact(path, artifact_path="notes")
    client = mlflow.MlflowClient()
    client.create_registered_model("server-test-model")
    version = client.create_model_version("server-test-model", f"{run.info.artifact_uri}/notes", run_id=run.info.run_id)
    print(json.dumps({"run_id": run.info.run_id, "version": version.version}))
    """
)


@needs_postgres
@pytest.mark.slow
def test_runs_artifacts_and_registry_through_the_server(stack):
    state_dir, groups = stack
    began = time.monotonic()
    started = _start(state_dir, groups)
    print(f"first start (initdb, migrations): {time.monotonic() - began:.1f} s")
    assert started.uri.startswith("http://127.0.0.1:") and server.healthy(started.uri)
    where = server.layout(state_dir)
    assert (where.pgdata / "PG_VERSION").is_file() and where.artifacts.is_dir()
    state = json.loads(where.state.read_text())
    assert state["uri"] == started.uri and state["backend_store_uri"].startswith("postgresql+psycopg://mlflow@127.0.0.1:")

    # a client that knows only MLFLOW_TRACKING_URI, in a process of its own
    env = {**os.environ, "MLFLOW_TRACKING_URI": started.uri}
    result = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = json.loads(result.stdout.strip().splitlines()[-1])

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=started.uri)
    run = client.get_run(ids["run_id"])
    assert run.data.params == {"lr": "0.001"} and run.data.tags["data_source"] == "synthetic"
    assert [(m.step, round(m.value, 3)) for m in client.get_metric_history(run.info.run_id, "val_dice")] == [(s, round(0.5 + s / 10, 3)) for s in range(5)]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served: clients upload through the server
    downloaded = Path(client.download_artifacts(run.info.run_id, "notes/notes.txt", str(state_dir.parent)))
    assert downloaded.read_text() == "served artifact"
    assert list(where.artifacts.rglob("notes.txt")), "the artifact is not in the server's --artifacts-destination"
    version = client.get_model_version("server-test-model", ids["version"])
    assert version.run_id == run.info.run_id and version.status == "READY"

    # a second start finds it running: no second server
    again = _cli("start", "--dir", str(state_dir))
    assert again.returncode == 0 and again.stdout.strip() == f"export MLFLOW_TRACKING_URI={started.uri}", again.stderr
    assert "already running" in again.stderr
    assert server.status(state_dir).mlflow_pid == started.status.mlflow_pid


@needs_postgres
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PROC, reason="finds processes through /proc (Linux)")
def test_stop_leaves_no_process_and_data_survives_a_restart(stack):
    state_dir, groups = stack
    started = _start(state_dir, groups)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=started.uri)
    experiment = client.get_experiment_by_name("restart") or client.get_experiment(client.create_experiment("restart"))
    run = client.create_run(experiment.experiment_id, run_name="before-restart")
    client.log_param(run.info.run_id, "epochs", "3")
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    client.log_text(run.info.run_id, "kept", "notes/kept.txt")
    client.set_terminated(run.info.run_id)
    assert _our_processes(state_dir, groups), "the running stack should be visible to the process scan"

    began = time.monotonic()
    stopped = _cli("stop", "--dir", str(state_dir))
    print(f"stop: {time.monotonic() - began:.1f} s (CLI included)")
    assert stopped.returncode == 0, stopped.stderr
    assert "MLflow server" in stopped.stdout and "PostgreSQL" in stopped.stdout
    assert _our_processes(state_dir, groups) == []
    assert not server.status(state_dir).running and not server.healthy(started.uri)
    assert _cli("status", "--dir", str(state_dir)).returncode == 3

    # Start again over the leftovers a reboot leaves: state naming pids of the previous boot, and a
    # postmaster.pid whose pid now belongs to another process (a sleeper here, which must survive).
    where = server.layout(state_dir)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        state = server.read_state(where) | {"mlflow_pid": sleeper.pid, "mlflow_started": server.start_time(sleeper.pid), "boot_id": "a-previous-boot"}
        where.state.write_text(json.dumps(state))
        (where.pgdata / "postmaster.pid").write_text(f"{sleeper.pid}\n{where.pgdata}\n0\n{state['postgres_port']}\n\n127.0.0.1\n0 0\nready   \n")
        assert not server.status(state_dir).running
        began = time.monotonic()
        restarted = _start(state_dir, groups)
        print(f"restart: {time.monotonic() - began:.1f} s")
        assert sleeper.poll() is None, "start signalled a process of the stale state"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert any("cleaned up" in note for note in restarted.notes)
    assert restarted.uri == started.uri  # the previous port, free again: exported URIs stay valid
    client = MlflowClient(tracking_uri=restarted.uri)
    kept = client.get_run(run.info.run_id)
    assert kept.data.params == {"epochs": "3"} and kept.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert Path(client.download_artifacts(run.info.run_id, "notes/kept.txt", str(state_dir.parent))).read_text() == "kept"


@needs_postgres
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PROC, reason="finds processes through /proc (Linux)")
def test_a_killed_server_fails_the_client_fast_and_start_recovers(stack):
    state_dir, groups = stack
    started = _start(state_dir, groups)
    from mlflow import MlflowClient

    from tumorseg.tracking import _mlflow

    _mlflow()  # the project's settings: MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, MLFLOW_HTTP_REQUEST_TIMEOUT=10
    client = MlflowClient(tracking_uri=started.uri)
    experiment = client.get_experiment_by_name("crash") or client.get_experiment(client.create_experiment("crash"))
    run_id = client.create_run(experiment.experiment_id, run_name="logging-when-killed").info.run_id
    logged: list[int] = []
    outcome: dict = {}

    def log_in_a_loop() -> None:
        try:
            for step in range(100_000):
                client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
                logged.append(step)
                time.sleep(0.02)
        except Exception as exc:  # what a training run's MLflow callback would see
            outcome["error"], outcome["at"] = exc, time.monotonic()

    logger = threading.Thread(target=log_in_a_loop, daemon=True)
    logger.start()
    deadline = time.monotonic() + 60
    while len(logged) < 5 and logger.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(logged) >= 5, f"the client did not log: {outcome}"

    # SIGKILL the MLflow server, every process of it (launcher, uvicorn), as a crash or the OOM
    # killer would; PostgreSQL keeps running. (SIGKILL of the launcher alone leaves uvicorn
    # serving: test_stop_ends_the_orphans_of_a_dead_launcher.)
    pgid = started.status.mlflow_pid
    postgres_pid = started.status.postgres_pid
    killed_at = time.monotonic()
    os.killpg(pgid, signal.SIGKILL)
    logger.join(timeout=30)
    assert not logger.is_alive(), "the client kept waiting on a dead server"
    assert "error" in outcome
    waited = outcome["at"] - killed_at
    print(f"client error {waited:.2f} s after the kill: {type(outcome['error']).__name__}")
    assert waited < 12, f"the client took {waited:.1f} s to fail"

    found = server.status(state_dir)
    assert not found.running and found.postgres_pid == postgres_pid, found.problems

    began = time.monotonic()
    recovered = _cli("start", "--dir", str(state_dir), "--workers", "1")
    print(f"start after the kill: {time.monotonic() - began:.1f} s (CLI included)")
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert recovered.stdout.strip() == f"export MLFLOW_TRACKING_URI={started.uri}"
    assert "cleaned up after a server that was not running properly" in recovered.stderr
    now = server.status(state_dir)
    groups.add(now.mlflow_pid or 0)
    assert now.running and now.mlflow_pid != pgid and now.postgres_pid == postgres_pid  # same database, new MLflow server
    client = MlflowClient(tracking_uri=now.uri)
    history = client.get_metric_history(run_id, "loss")
    assert {m.step for m in history} >= set(logged)  # every metric the server acknowledged is there
    client.log_metric(run_id, "loss", 0.0, step=len(history))
    client.set_terminated(run_id)


@pytest.mark.skipif(not HAVE_PROC, reason="finds processes through /proc (Linux)")
def test_stop_ends_the_orphans_of_a_dead_launcher(tmp_path):
    """SIGKILL of ``mlflow server`` (the launcher) leaves its uvicorn and job workers running in its
    process group, one of them with a child in a session of its own (as MLflow's jobs are): status
    reports them and stop ends them all. Real processes, no PostgreSQL needed."""
    worker = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); time.sleep(120)"
    launcher_code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); print('up', flush=True); time.sleep(120)"
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "up"
        started = server.start_time(launcher.pid)
        deadline = time.monotonic() + 30
        while len(server.family(launcher.pid, started)) < 3 and time.monotonic() < deadline:  # launcher, worker, worker's job
            time.sleep(0.1)
        assert len(server.family(launcher.pid, started)) == 3
        where = server.layout(tmp_path / "state")
        where.root.mkdir()
        where.state.write_text(json.dumps({"uri": "http://127.0.0.1:9", "host": "127.0.0.1", "mlflow_port": 9, "mlflow_pid": launcher.pid,
                                           "mlflow_started": started, "boot_id": server.boot_id()}))  # fmt: skip
        launcher.kill()
        launcher.wait()
        orphans = server.family(launcher.pid, started)
        assert len(orphans) == 2  # the worker (same process group) and its job (a descendant of the worker)
        found = server.status(where.root)
        assert not found.running and any("orphaned" in problem for problem in found.problems)
        stopped = server.stop(where.root, grace=5)
        assert stopped.stopped == [f"MLflow server (pid {launcher.pid}, 2 process(es))"]
        assert not any(server.alive(pid, start) for pid, start in orphans.items())
        assert server.read_state(where).get("mlflow_pid") is None and server.read_state(where)["mlflow_port"] == 9
    finally:
        with contextlib.suppress(OSError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()


def test_missing_postgresql_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    monkeypatch.setattr(server.glob, "glob", lambda pattern: [])
    with pytest.raises(ServerError, match=r"apt-get install postgresql"):
        server.postgres_bindir(Path("/nonexistent"))


def test_exposed_host_warns_loopback_does_not():
    assert server.exposure_warning("127.0.0.1") is None and server.exposure_warning("localhost") is None
    assert "NO authentication" in server.exposure_warning("0.0.0.0")
    assert server.tracking_uri_for("0.0.0.0", 5000) == "http://127.0.0.1:5000"
