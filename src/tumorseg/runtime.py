"""TensorFlow runtime set-up for training and benchmarks: seeds, threads, determinism, and the
``tf.distribute`` strategy."""

from __future__ import annotations

import json
import logging
import os

from tumorseg.errors import UsageError

log = logging.getLogger(__name__)


def configure_runtime(*, seed: int, threads: int, deterministic: bool) -> None:
    """Seeds and thread pools; must run before TensorFlow executes its first op."""
    import keras
    import tensorflow as tf

    from tumorseg.processes import default_workers

    cores = threads or default_workers()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:  # already initialised in this process (tests): keep what is set
        pass
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def distribution_strategy(kind: str):
    import tensorflow as tf

    if kind == "mirrored":
        # Without GPUs MirroredStrategy would use one CPU; use every logical CPU device instead
        # (several exist only when configured, e.g. to test data parallelism on one machine).
        if not tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("CPU")])
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker":
        return _keras_multi_worker_strategy()
    return tf.distribute.get_strategy()  # the default (no-op) strategy


def _keras_multi_worker_strategy():
    """``tf.distribute.MultiWorkerMirroredStrategy`` with the one method Keras 3 trips over.

    Keras 3's ``fit`` (3.15, keras-team/keras#20585, open) asks this strategy to ``reduce`` a whole
    ``(x, y)`` batch structure at once (it reduces leaves only) and scalar metrics with ``axis=0``
    (no such axis); either fails every multi-worker ``fit`` before its first step. ``reduce`` here
    reduces leaf by leaf and drops the axis for scalars, so each number is the one the stock
    ``reduce`` gives for that leaf. Checked by tests/test_team_scale.py with two workers.
    """
    import tensorflow as tf

    class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def leaf(v):
                scalar = len(self.experimental_local_results(v)[0].shape) == 0
                return super(KerasMultiWorkerMirroredStrategy, self).reduce(reduce_op, v, None if scalar else axis)

            return tf.nest.map_structure(leaf, value)

    return KerasMultiWorkerMirroredStrategy()


def worker_role(tf_config: str | None = None) -> tuple[str, int, bool]:
    """``(task type, index, is chief)`` from ``TF_CONFIG`` (the environment's when not given).

    Under ``train.distribute: multi_worker`` every worker runs the same training stage and the
    collectives keep them in step, but one of them - the chief: task type ``chief``, or worker 0
    when the cluster names no chief (TensorFlow's rule) - owns the outputs: the model, the metric
    files and the MLflow run. No ``TF_CONFIG``: a single process, its own chief.
    """
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw.strip():
        return "chief", 0, True
    try:
        spec = json.loads(raw)
        task, cluster = spec.get("task", {}), spec.get("cluster", {})
        kind, index = str(task.get("type", "worker")), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        example = '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
        raise UsageError(f"TF_CONFIG is not a multi-worker spec ({exc}); expected JSON like {example}") from None
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return kind, index, chief
