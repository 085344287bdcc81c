"""Logged models that work outside tumorseg: an MLflow logged U-Net (HAC + CASPP + attention
gates) lists only TensorFlow and Keras as requirements, loads as a pyfunc in a Python that cannot
import tumorseg, and `mlflow models serve` answers /invocations with the model's predictions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import _WITHOUT_TUMORSEG_PREAMBLE

pytestmark = pytest.mark.slow  # logs a model, starts a model server


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny U-Net with every custom block, logged as an MLflow LoggedModel in a fresh store."""
    import mlflow

    from tumorseg import tracking
    from tumorseg.models import build_model

    root = tmp_path_factory.mktemp("mlflow-models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.check_tracking(uri)
    model = build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_hac=True, use_caspp=True, attention_gates=True)
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    old = os.getcwd()
    os.chdir(root)  # the run's artifacts land beside the store
    try:
        with tracking.run(uri, run_id=None, run_name="portable", tags={}):
            model_id = tracking.log_keras_model(model, batch[:1])
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(root / "downloaded")))
    finally:
        os.chdir(old)
    return {"root": root, "uri": uri, "model_id": model_id, "local": local, "batch": batch, "expected": model.predict(batch, verbose=0)}


def test_requirements_are_installable_without_tumorseg(logged):
    requirements = (logged["local"] / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.startswith("tumorseg")], requirements
    assert any(r.startswith("tensorflow==") for r in requirements) and any(r.startswith("keras==") for r in requirements)


def test_pyfunc_loads_and_predicts_where_tumorseg_cannot_be_imported(logged, tmp_path: Path):
    np.save(tmp_path / "in.npy", logged["batch"])
    script = _WITHOUT_TUMORSEG_PREAMBLE + (
        "import mlflow, numpy as np\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], np.asarray(model.predict(np.load(sys.argv[2]))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, str(logged["local"]), str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), logged["expected"], atol=1e-5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(logged, tmp_path: Path):
    import requests

    port = _free_port()
    # the environment's scripts first, as in an activated venv: mlflow execs `uvicorn` by name
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = os.environ | {"MLFLOW_TRACKING_URI": logged["uri"], "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{logged['model_id']}", "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port)]
    log = open(tmp_path / "serve.log", "w")  # closed with the server below
    server = subprocess.Popen(command, cwd=logged["root"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not answer /ping in 240 s: " + (tmp_path / "serve.log").read_text()[-2000:])
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": logged["batch"].tolist()}, timeout=120)
        assert answer.status_code == 200, answer.text[:1000]
        predictions = np.asarray(json.loads(answer.text)["predictions"], dtype=np.float32)
        np.testing.assert_allclose(predictions, logged["expected"], atol=1e-5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # the whole group: mlflow and its uvicorn
        server.wait(timeout=30)
        log.close()
