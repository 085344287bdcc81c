"""Batch normalisation through TensorFlow's fused kernel, for stock Keras layers.

Keras 3 computes ``BatchNormalization`` on the TensorFlow backend as separate ops - the batch
moments, then subtract, multiply, add - and the gradient as as many again (keras-team/keras-core#225);
tf.keras, which the segmentation_models peer runs on, used TensorFlow's single ``FusedBatchNormV3``
kernel. On these 2 CPU cores, with 2 threads, fusing made UMobileNetV2's training step (128², batch 8)
28-31% shorter and the U-Net's 0-17% (benchmarks/bench_train_step.py, results/train_step.json).

:func:`fuse_batch_norm` gives each eligible layer *instance* the fused computation and leaves the
layer stock - class, config and weights - so a saved model loads anywhere, without tumorseg, and
computes the same function (to float rounding: the fused kernel sums in another order).

Semantics are Keras': training with a trainable layer normalises with the batch mean and the
biased batch variance and moves ``moving_mean``/``moving_variance`` towards them by ``momentum``
(the kernel reports the unbiased variance, so it is scaled back by (n - 1) / n, n = N·H·W).
Otherwise - inference, or a frozen layer in training - the layer normalises with its moving
statistics through Keras' own computation (two elementwise ops: nothing worth fusing, and no
gradient through the fused kernel's inference mode, which TensorFlow's op determinism may refuse
on GPU).
"""

from __future__ import annotations

import types

__all__ = ["fuse_batch_norm", "is_fused"]

_MARK = "_tumorseg_fused_call"


def _eligible(layer) -> bool:
    """Layers whose computation the fused kernel reproduces: channels-last 4-D float32 input, no
    renormalisation and no cross-replica (synchronised) statistics."""
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    rank = getattr(layer.input_spec, "ndim", None)  # set when the layer was built
    return (
        axis in (-1, 3)
        and rank == 4
        and not layer.renorm
        and not layer.synchronized
        and layer.variable_dtype == "float32"
        and layer.compute_dtype == "float32"
    )


def _fused_call(self, inputs, training=None, mask=None):
    import tensorflow as tf

    # Moving statistics (inference, a frozen layer): two elementwise ops, nothing to fuse
    if not (training and self.trainable) or mask is not None or inputs.dtype != tf.float32:
        return type(self).call(self, inputs, training=training, mask=mask)
    x = tf.convert_to_tensor(inputs)
    channels = x.shape[-1]
    gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([channels], tf.float32)
    beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([channels], tf.float32)
    empty = tf.zeros([0], tf.float32)
    y, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=self.epsilon, data_format="NHWC", is_training=True
    )
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    variance = unbiased * tf.where(count > 1.0, (count - 1.0) / count, 1.0)  # Keras moves the biased variance
    momentum = self.momentum
    self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
    return y


def is_fused(layer) -> bool:
    return getattr(layer, _MARK, False)


def fuse_batch_norm(model) -> int:
    """Give every eligible ``BatchNormalization`` in ``model`` (nested models included) the fused
    computation; returns how many layers compute fused. A no-op off the TensorFlow backend, and
    idempotent (already fused layers are counted, not changed)."""
    import keras
    from keras import layers

    if keras.backend.backend() != "tensorflow":
        return 0
    fused = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) is not layers.BatchNormalization:  # subclasses may compute otherwise
            continue
        if not is_fused(layer):
            if not _eligible(layer):
                continue
            layer.call = types.MethodType(_fused_call, layer)
            setattr(layer, _MARK, True)
        fused += 1
    return fused
