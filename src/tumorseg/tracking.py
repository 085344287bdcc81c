"""MLflow tracking: the only module that imports mlflow.

Zero set-up: without ``MLFLOW_TRACKING_URI`` the store is ``mlflow.db`` (SQLite) at the project
root, as an absolute path resolved to the *workspace* even when DVC runs the stage in a temporary
copy (``dvc exp run --temp`` / ``--queue`` run under ``<workspace>/.dvc/tmp/exps/``), so every run
lands in the one store that ``mlflow ui`` shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tumorseg.errors import TrackingError

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "tumorseg"
STORE_FILE = "mlflow.db"


def workspace_root(start: Path | None = None) -> Path:
    """The user's project folder, also from inside a DVC temporary experiment copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for index in range(len(parts) - 3):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return here


def tracking_uri(project_root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{workspace_root(project_root) / STORE_FILE}"


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Fail in seconds, not after minutes of retries, when a server is unreachable.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


def create_sqlite_store(uri: str) -> None:
    """Create a new SQLite store in one step (built under a temporary name, then linked into place).

    MLflow builds a fresh database with ~1-2 s of schema migrations that are not one transaction;
    a run killed meanwhile would leave a half-built ``mlflow.db`` that MLflow refuses from then on
    ("table ... already exists"). Existing stores and other URIs are left alone.
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :])
    if path.exists():
        return
    _mlflow()
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.init")
    for stale in [temporary, *(Path(f"{temporary}{suffix}") for suffix in ("-journal", "-wal", "-shm"))]:
        stale.unlink(missing_ok=True)
    try:
        store = SqlAlchemyStore(f"sqlite:///{temporary}", os.environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT", "./mlruns"))
        store.engine.dispose()
        try:
            os.link(temporary, path)  # never replaces a store that another process created meanwhile
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def check_tracking(uri: str) -> None:
    """Make sure the store answers (and create the experiment) before an hour of training."""
    mlflow = _mlflow()
    try:
        create_sqlite_store(uri)
    except OSError as exc:
        raise TrackingError(
            f"cannot create the MLflow store {uri!r}: {exc.strerror or exc}; check that the project folder is writable and the disk has space"
        ) from None
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(EXPERIMENT_NAME) is None:
            try:
                mlflow.create_experiment(EXPERIMENT_NAME)
            except Exception:  # another stage created it meanwhile (parallel experiments on one server)
                if mlflow.get_experiment_by_name(EXPERIMENT_NAME) is None:
                    raise
    except Exception as exc:  # MlflowException, requests errors, sqlite errors: all "unusable"
        hint = "unset MLFLOW_TRACKING_URI to use the local mlflow.db" if os.environ.get("MLFLOW_TRACKING_URI") else "check that the project folder is writable"
        raise TrackingError(f"MLflow tracking store {uri!r} is not usable ({type(exc).__name__}: {str(exc)[:300]}); {hint}") from None


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_id(root: Path, params_text: str, data_hash: str) -> str:
    """Same for every stage of one `dvc repro`/`dvc exp run` (same code, params and data)."""
    exp = os.environ.get("DVC_EXP_NAME", "")
    digest = hashlib.sha256(f"{git_commit(root)}\n{params_text}\n{data_hash}\n{exp}".encode()).hexdigest()
    return digest[:12]


def environment_tags() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
        "gpus": str(len(tf.config.list_physical_devices("GPU"))),
    }


RESUME_TAG = "tumorseg.resume_token"
PARAMS_CHANGED_TAG = "params_changed_on_resume"  # MLflow params are immutable; see record_param_changes
PARAMS_IN_EFFECT_TAG = "params_in_effect"


@contextlib.contextmanager
def run(uri: str, *, run_id: str | None, run_name: str, tags: Mapping[str, str], resume_token: str | None = None) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) a run in the tumorseg experiment.

    ``resume_token`` (saved by the caller *before* this call) is set as a tag when the run is
    created, in the same transaction; a caller killed before it could save the new run's id finds
    the run again by the token instead of starting a second one.
    """
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(EXPERIMENT_NAME)
    if run_id is None and resume_token:
        found = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{RESUME_TAG}` = '{resume_token}'", output_format="list", max_results=1)
        run_id = found[0].info.run_id if found else None
    create_tags = {RESUME_TAG: resume_token} if resume_token and run_id is None else None
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=create_tags)
    try:
        mlflow.set_tags(dict(tags))
        yield active
    except BaseException:
        # mark it FAILED if the store still answers; when it does not (the usual reason for getting
        # here), the caller's error is the one to report, not a second one from this call
        try:
            mlflow.end_run("FAILED")
        except Exception as exc:
            log.debug("could not mark MLflow run %s failed: %s", active.info.run_id, exc)
        raise
    mlflow.end_run()


def store_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the tracking store stopped answering or refused a write"."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException)


def lost_store(uri: str, exc: BaseException, consequence: str) -> TrackingError:
    """One line for a store that failed mid-work: ``consequence`` (what is safe, what to do) first,
    since an error line is clipped at 300 characters, then the cause in brief."""
    text = " ".join(str(exc).split())
    if "Max retries exceeded" in text or "Connection refused" in text or isinstance(exc, ConnectionError):
        cause = "no answer: connection refused" if "refused" in text.lower() else "no answer"
    else:
        cause = f"{type(exc).__name__}: {text[:120]}"
    return TrackingError(f"MLflow tracking store {uri} failed ({cause}); {consequence}")


def log_params(params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Log ``params`` into the active run; returns those it had logged before with another value
    (``{key: (logged, now)}``): a resumed run whose params.yaml changed meanwhile. MLflow params are
    immutable, so the first value stays and the caller must record the change elsewhere
    (:func:`record_param_changes`)."""
    mlflow = _mlflow()
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    as_text = {k: str(v)[:6000] for k, v in params.items()}
    fresh = {k: v for k, v in as_text.items() if k not in existing}
    items = list(fresh.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))
    return {k: (existing[k], v) for k, v in as_text.items() if k in existing and existing[k] != v}


def describe_param_change(change: Mapping[str, Any]) -> str:
    return f"after epoch {change['after_epoch']}: {change['key']} {change['old']} -> {change['new']}"


def record_param_changes(changes: Sequence[Mapping[str, Any]]) -> None:
    """Keep a resumed run's param changes (``{after_epoch, key, old, new}``, oldest first) in tags,
    since its params still show the values it started with: ``PARAMS_CHANGED_TAG`` for people,
    ``PARAMS_IN_EFFECT_TAG`` (JSON, each key's latest value) for :func:`study_runs`."""
    described = "; ".join(map(describe_param_change, changes))
    in_effect = {c["key"]: c["new"] for c in changes}
    _mlflow().set_tags({PARAMS_CHANGED_TAG: described[:5000], PARAMS_IN_EFFECT_TAG: json.dumps(in_effect)[:5000]})


def log_metrics(metrics: Mapping[str, float], step: int | None = None, *, model_id: str | None = None) -> None:
    """Log numbers into the active run (NaN and None left out); ``model_id`` also links them to
    that logged model, so the experiment's Models tab shows them beside it."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and v == v}
    if clean:
        _mlflow().log_metrics(clean, step=step, model_id=model_id)


def log_missing_epochs(history: Mapping[str | int, Mapping[str, float]]) -> int:
    """Log the per-epoch rows (``{epoch: {metric: value}}``) that the active run lacks.

    A run killed after its epoch was committed but before MLflow heard of it gets the row on the
    next start; rows already there are never logged twice. Returns how many epochs were logged.
    """
    if not history:
        return 0
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    keys = sorted({key for row in history.values() for key in row})
    logged = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    repaired = 0
    for epoch, row in sorted(history.items(), key=lambda item: int(item[0])):
        missing = {k: v for k, v in row.items() if int(epoch) not in logged[k] and v == v}  # NaN is never logged
        if missing:
            log_metrics(missing, step=int(epoch))
            repaired += 1
    return repaired


def log_metrics_once(metrics: Mapping[str, float], *, model_id: str | None = None) -> None:
    """Log run-level metrics that the active run does not hold yet (a resumed run logs them once);
    ``model_id``: linked to that logged model too."""
    mlflow = _mlflow()
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.metrics
    log_metrics({k: v for k, v in metrics.items() if k not in existing}, model_id=model_id)


def set_tags(tags: Mapping[str, str]) -> None:
    """Tags known only once the run has done its work (e.g. the sha256 of the file it wrote)."""
    _mlflow().set_tags(dict(tags))


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    if Path(path).exists():
        _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_keras_model(model, input_example, *, name: str = "model", params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Log ``model`` as an MLflow LoggedModel of the active run, in the Keras flavour with its
    signature and input example: it shows in the experiment's Models tab, and ``runs:/<run id>/model``
    and ``models:/<model id>`` load it. Returns the model id.

    Idempotent for a resumed run: a READY model of this run with the same name and the same
    ``sha256`` tag is returned, not logged twice. Saved locally first and then uploaded:
    ``mlflow.keras.log_model`` with an input example writes the example before creating its
    folder (FileNotFoundError in MLflow 3.17).
    """
    import tempfile

    import keras
    import tensorflow as tf
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    mlflow = _mlflow()
    run_id = active_run_id()
    tags = {k: str(v) for k, v in (tags or {}).items()}
    if run_id and "sha256" in tags:
        for existing in mlflow.search_logged_models(filter_string=f"name = '{name}' AND source_run_id = '{run_id}'", output_format="list"):
            if existing.status == LoggedModelStatus.READY and existing.tags.get("sha256") == tags["sha256"]:
                return existing.model_id
    model_params = {k: str(v)[:6000] for k, v in (params or {}).items()} or None
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, model_type="keras-segmentation", params=model_params, tags=tags or None)
    try:
        prediction = model.predict(input_example, verbose=0)
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / "model"
            target.mkdir()
            mlflow.keras.save_model(
                model,
                path=str(target),
                signature=infer_signature(input_example, prediction),
                input_example=input_example,
                # Explicit requirements: inferring them costs ~9 s per model.
                # the models are graphs of stock Keras layers: TensorFlow and Keras are all they need
                pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
            )
            mlflow.MlflowClient().log_model_artifacts(logged.model_id, str(target))
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def log_dataset(frame, *, name: str, origin: str, context: str, tags: Mapping[str, str] | None = None) -> None:
    """Record the rows a run trained / validated / was tested on as an MLflow dataset input (the
    Dataset column of the runs table). ``frame``: the manifest rows (slice ids, file hashes), so
    MLflow's digest changes exactly when the data does; ``origin``: a folder, Kaggle slug or
    description; ``tags``: e.g. the data's kind (real / synthetic) and content hash. Logging
    the same rows again (a resumed run) adds nothing."""
    import warnings

    mlflow = _mlflow()
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.pandas_dataset import PandasDataset

    if origin.startswith("kaggle:"):
        origin = f"https://www.kaggle.com/datasets/{origin.removeprefix('kaggle:')}"
    # MLflow infers a schema and a digest from the rows and warns about integer columns and future
    # pandas keywords, and about a local path it can read "in multiple ways" (two names, one class):
    # nothing a user can act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if origin.startswith(("http://", "https://")):
            dataset = PandasDataset(frame, source=HTTPDatasetSource(origin), name=name)
        elif Path(origin).is_absolute():
            dataset = mlflow.data.from_pandas(frame, source=origin, name=name)
        else:  # a Kaggle slug, synthetic phantoms: said in words
            dataset = PandasDataset(frame, source=CodeDatasetSource({"origin": origin}), name=name)
        try:
            mlflow.log_input(dataset, context=context, tags=dict(tags or {}) or None)
        except mlflow.exceptions.MlflowException as exc:
            # two runs logging the same rows at once (queued experiments on one server) race to
            # create the dataset row: the loser's insert violates its key; once it exists, the
            # second call only links it to this run
            if "unique" not in str(exc).lower():
                raise
            mlflow.log_input(dataset, context=context, tags=dict(tags or {}) or None)


def active_run_id() -> str | None:
    run = _mlflow().active_run()
    return run.info.run_id if run else None


# --- model registry and loading ----------------------------------------------------------------


def load_keras_model(model_uri: str, uri: str | None = None):
    """Load a Keras model logged by :func:`log_keras_model` (``runs:/<id>/model``, ``models:/<name>/<version>``)."""
    import tumorseg.models  # noqa: F401 - registers the legacy layers of models logged before they were stock Keras layers

    mlflow = _mlflow()
    store = uri or tracking_uri()
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        return mlflow.keras.load_model(model_uri)
    except Exception as exc:  # MlflowException (unknown run/model/version), OSError: say which URI and store
        raise TrackingError(f"cannot load {model_uri!r} from the MLflow store {store!r} ({type(exc).__name__}: {str(exc)[:300]})") from None


def register_model(
    name: str,
    *,
    run_id: str | None = None,
    model_id: str | None = None,
    model=None,
    uri: str | None = None,
    artifact_path: str = "model",
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Register a model version under ``name`` in the MLflow model registry.

    Exactly one source: a logged model (``model_id``: ``models:/<model_id>``), a run's logged
    model (``run_id``: ``runs:/<run_id>/<artifact_path>``), or a Keras ``model`` that is first
    logged into a new run of the tumorseg experiment (so every version points at a run with its
    files). A version of ``name`` from the same source is reused, not registered twice. ``alias``
    (e.g. ``champion``) is then moved to the version. Returns name, version, source URI, run id
    and the ``models:/name/version`` URI to load it with (``models:/name@alias`` too).
    """
    if sum(x is not None for x in (run_id, model_id, model)) != 1:
        raise ValueError("give exactly one of run_id, model_id or model")
    mlflow = _mlflow()
    store = uri or tracking_uri()
    check_tracking(store)
    mlflow.set_registry_uri(store)
    client = mlflow.MlflowClient()
    if model is not None:
        side = model.input_shape[1] or 256
        with run(store, run_id=None, run_name=f"register-{name}", tags={"registered_as": name, **dict(tags or {})}) as active:
            model_id = log_keras_model(model, _zeros_example(side, model.input_shape[-1] or 1))
            run_id = active.info.run_id
    if model_id is not None:
        try:
            run_id = mlflow.get_logged_model(model_id).source_run_id
        except Exception:
            raise TrackingError(f"no logged model {model_id!r} in {store!r}") from None
        source = f"models:/{model_id}"
    else:
        try:
            mlflow.get_run(run_id)
        except Exception:
            raise TrackingError(f"no MLflow run {run_id!r} in {store!r}; list runs with `mlflow ui --backend-store-uri {store}`") from None
        source = f"runs:/{run_id}/{artifact_path}"
    version = None
    try:
        found = client.search_model_versions(f"name = '{name}'") if client.search_registered_models(f"name = '{name}'") else []
        version = next((v for v in found if model_id and model_id in (getattr(v, "model_id", None), v.source.removeprefix("models:/"))), None)
        version = version or mlflow.register_model(source, name, tags=dict(tags or {}) or None)
        if alias:
            client.set_registered_model_alias(name, alias, str(version.version))
    except Exception as exc:
        raise TrackingError(f"cannot register {source} as {name!r} in {store!r} ({type(exc).__name__}: {str(exc)[:300]})") from None
    info = {"name": name, "version": str(version.version), "source": source, "run_id": run_id or "", "model_uri": f"models:/{name}/{version.version}"}
    return info | ({"alias": alias, "alias_uri": f"models:/{name}@{alias}"} if alias else {})


def _zeros_example(side: int, channels: int):
    import numpy as np

    return np.zeros((1, side, side, channels), np.float32)


# --- reading runs back (study reports) ---------------------------------------------------------


def study_runs(uri: str | None = None, *, history_metric: str = "val_dice") -> list[dict[str, Any]]:
    """Every run of the tumorseg experiment as plain data: name, tags, params, final metrics and
    the per-epoch history of ``history_metric`` (for all-experiments learning curves)."""
    mlflow = _mlflow()
    store = uri or tracking_uri()
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        return []
    client = mlflow.tracking.MlflowClient(store)
    runs = []
    for item in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000):
        history = client.get_metric_history(item.info.run_id, history_metric)
        runs.append(
            {
                "run_id": item.info.run_id,
                "run_name": item.info.run_name,
                "status": item.info.status,
                "start_time": item.info.start_time,
                "tags": dict(item.data.tags),
                # a run resumed with changed params: the values it trained on last (its params keep the first)
                "params": dict(item.data.params) | json.loads(item.data.tags.get(PARAMS_IN_EFFECT_TAG, "{}")),
                "metrics": dict(item.data.metrics),
                "history": sorted((int(m.step), float(m.value)) for m in history),
            }
        )
    return runs
