"""TensorFlow runtime set-up for training and benchmarks: seeds, threads, determinism, and the
``tf.distribute`` strategy."""

from __future__ import annotations

import logging

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
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()  # the default (no-op) strategy
