"""Deep supervision: auxiliary mask heads on the decoder's coarser stages, for training only.

Each decoder stage below full resolution gets a 1x1 conv (logits), bilinear up-sampling to the
input size and a sigmoid, and is trained against the same full-size mask as the main head. The
coarse stages then get a gradient of their own instead of only what reaches them through the
finer ones (Lee et al. 2015; nnU-Net). An auxiliary loss weighs half as much per halving of its
stage's resolution (stride 2: 1/2, stride 4: 1/4, ...), all of them times ``train.deep_supervision``.

Only training sees the heads: metrics, validation Dice and early stopping read the main head,
and :func:`inference_model` strips the heads before a model is published, so the files that
prediction, evaluation and export read are the plain single-output models.
"""

from __future__ import annotations

import re

import keras
from keras import layers

_STAGE = re.compile(r"^(dec\d+)(?:_|$)")


def decoder_stages(model: keras.Model) -> list[tuple[str, int]]:
    """``(stage name, stride)`` of each decoder stage of ``model`` below full resolution, coarsest first.

    A stage is the layers named ``decK`` or ``decK_*`` (both models name their decoder so); its
    output is its last layer's. Stride = input height / stage height.
    """
    return [(name, stride) for name, stride, _ in _coarse_stages(model)]


def _coarse_stages(model: keras.Model) -> list[tuple[str, int, keras.layers.Layer]]:
    """``(stage name, stride, last layer)`` of the stages below full resolution, coarsest first."""
    ends = {}
    for layer in model.layers:  # topological order: a stage's last layer comes last
        match = _STAGE.match(layer.name)
        if match:
            ends[match.group(1)] = layer
    height = model.input_shape[1]
    stages = [(name, height // layer.output.shape[1], layer) for name, layer in ends.items() if layer.output.shape[1] < height]
    return sorted(stages, key=lambda stage: -stage[1])


@keras.saving.register_keras_serializable(package="tumorseg")
class DeeplySupervised(keras.Model):
    """A model whose first output is the mask and whose other outputs are auxiliary masks.

    The loss is the compiled loss on the main output plus ``sum(aux_weights[k] * loss(y, aux_k))``;
    the compiled metrics see the main output only, so their names (``dice``, ``val_dice``) and
    values are those of the plain model.
    """

    def __init__(self, *args, aux_weights=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_weights = [float(w) for w in aux_weights]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        main, *auxiliary = y_pred
        loss = super().compute_loss(x, y, main, sample_weight, training)
        loss_fn = keras.losses.get(self.loss)
        for weight, prediction in zip(self.aux_weights, auxiliary):
            loss = loss + weight * loss_fn(y, prediction)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred[0], sample_weight)

    def get_config(self):
        return {**super().get_config(), "aux_weights": self.aux_weights}


def with_deep_supervision(model: keras.Model, weight: float) -> DeeplySupervised:
    """``model`` (layers shared, not copied) with an auxiliary head on every coarse decoder stage.

    ``weight`` (``train.deep_supervision``) scales all auxiliary losses; a stage at stride ``s``
    weighs ``weight / s``. Raises ``ValueError`` if ``model`` has no decoder stage below full
    resolution to supervise.
    """
    if not weight > 0:
        raise ValueError(f"train.deep_supervision must be > 0 to add auxiliary heads, got {weight}")
    stages = _coarse_stages(model)
    if not stages:
        raise ValueError(f"train.deep_supervision: model {model.name!r} has no decoder stage (layers named decK_*) below full resolution")
    outputs, aux_weights = [model.outputs[0]], []
    for name, stride, end in stages:
        x = layers.Conv2D(1, 1, name=f"{name}_aux_logits")(end.output)
        x = layers.UpSampling2D(stride, interpolation="bilinear", name=f"{name}_aux_up")(x)
        outputs.append(layers.Activation("sigmoid", dtype="float32", name=f"{name}_aux_mask")(x))
        aux_weights.append(weight / stride)
    return DeeplySupervised(model.input, outputs, aux_weights=aux_weights, name=model.name)


def inference_model(model: keras.Model) -> keras.Model:
    """The plain single-output model: ``model`` itself, or a deeply supervised one without its heads."""
    if isinstance(model, DeeplySupervised):
        return keras.Model(model.input, model.outputs[0], name=model.name)
    return model
