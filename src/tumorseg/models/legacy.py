"""The U-Net's HAC and CASPP blocks as they were until issue 23: custom Keras layer classes.

:mod:`tumorseg.models.blocks` builds the same blocks from stock Keras layers (a saved model loads
anywhere, without tumorseg); :func:`~tumorseg.models.build_model` builds only those. The classes
below stay importable and registered under the ``tumorseg`` package ONLY so that older files load:
a user's ``models/unet.keras``, an MLflow-logged model, a resume checkpoint or a
``train.init_from`` file. :func:`to_portable` rebuilds such a model as the portable graph with the
same weights, and the project's loading paths (``open_keras_model``, publishing, resuming and warm
starts) apply it, so everything downstream sees one graph kind. Do not build new models from them.

The math of each class is exactly that of its portable counterpart (see the design in
:mod:`tumorseg.models.blocks`): HAC's one 1x1 projection conv + BN to ``scales * width`` channels,
split into ``scales`` groups, is the portable block's ``scales`` 1x1 convs + BNs of ``width``
channels (conv and BN act per output channel), so its kernel's columns and BN vectors are sliced
group by group; every other sub-layer maps one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers, ops

from tumorseg.models.blocks import _bn, _conv  # the same conv/BN constructors the stock-layer blocks use

__all__ = ["CASPPBlock", "ChannelAttention", "HACBlock", "SpatialAttention", "copy_legacy_state", "is_legacy", "saved_with_legacy_layers", "to_portable"]

_PACKAGE = "tumorseg"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ChannelAttention(layers.Layer):
    """CBAM channel attention: ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``.

    The MLP (Dense ``hidden`` + ReLU, Dense ``channels``) is shared by both pooled descriptors;
    ``hidden = max(1, min(channels, max(4, channels // reduction)))``.
    """

    def __init__(self, reduction: int = 8, **kwargs):
        super().__init__(**kwargs)
        if int(reduction) < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.reduction = int(reduction)
        self.hidden_dense = None
        self.output_dense = None

    def build(self, input_shape):
        channels = int(input_shape[-1])
        hidden = max(1, min(channels, max(4, channels // self.reduction)))
        self.hidden_dense = layers.Dense(hidden, activation="relu", name="mlp_hidden")
        self.output_dense = layers.Dense(channels, name="mlp_out")
        self.hidden_dense.build((None, channels))
        self.output_dense.build((None, hidden))
        super().build(input_shape)

    def call(self, inputs):
        avg = ops.mean(inputs, axis=(1, 2))
        mx = ops.max(inputs, axis=(1, 2))
        logits = self.output_dense(self.hidden_dense(avg)) + self.output_dense(self.hidden_dense(mx))
        weights = ops.sigmoid(logits)[:, None, None, :]
        return inputs * ops.cast(weights, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpatialAttention(layers.Layer):
    """CBAM spatial attention: ``x * sigmoid(conv_kxk([mean_c(x), max_c(x)]))``."""

    def __init__(self, kernel_size: int = 7, **kwargs):
        super().__init__(**kwargs)
        if int(kernel_size) < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.conv = None

    def build(self, input_shape):
        self.conv = layers.Conv2D(
            1, self.kernel_size, padding="same", activation="sigmoid", name="attention_conv"
        )
        self.conv.build((*input_shape[:-1], 2))
        super().build(input_shape)

    def call(self, inputs):
        pooled = ops.concatenate(
            [ops.mean(inputs, axis=-1, keepdims=True), ops.max(inputs, axis=-1, keepdims=True)], axis=-1
        )
        return inputs * ops.cast(self.conv(pooled), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HACBlock(layers.Layer):
    """Hierarchical attention convolution: Res2Net-style multi-scale 3x3 branches + CBAM + residual.

    ``(N, H, W, C_in) -> (N, H, W, filters)``. See the module docstring for the full design.

    Args:
        filters: output channels.
        scales: number of hierarchical branches (receptive fields 3, 5, ..., 2*scales+1).
        reduction: channel-attention MLP reduction ratio.
        spatial_kernel: kernel size of the spatial-attention conv.
        bn_momentum: momentum of every BatchNormalization inside the block.
    """

    def __init__(
        self,
        filters: int,
        scales: int = 4,
        reduction: int = 8,
        spatial_kernel: int = 7,
        bn_momentum: float = 0.99,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(filters) < 1 or int(scales) < 1:
            raise ValueError(f"filters and scales must be >= 1, got filters={filters}, scales={scales}")
        self.filters = int(filters)
        self.scales = int(scales)
        self.reduction = int(reduction)
        self.spatial_kernel = int(spatial_kernel)
        self.bn_momentum = float(bn_momentum)
        self.width = math.ceil(self.filters / self.scales)

        self.project = _conv(self.scales * self.width, 1, "project")
        self.project_bn = _bn(self.bn_momentum, "project_bn")
        self.branch_convs = [_conv(self.width, 3, f"branch{i + 1}") for i in range(self.scales)]
        self.branch_bns = [_bn(self.bn_momentum, f"branch{i + 1}_bn") for i in range(self.scales)]
        self.fuse = _conv(self.filters, 1, "fuse")
        self.fuse_bn = _bn(self.bn_momentum, "fuse_bn")
        self.channel_attention = ChannelAttention(self.reduction, name="channel_attention")
        self.spatial_attention = SpatialAttention(self.spatial_kernel, name="spatial_attention")
        self.shortcut = None
        self.shortcut_bn = None

    def build(self, input_shape):
        batch_hw = tuple(input_shape[:-1])
        in_channels = int(input_shape[-1])
        self.project.build(input_shape)
        self.project_bn.build((*batch_hw, self.scales * self.width))
        for conv, bn in zip(self.branch_convs, self.branch_bns):
            conv.build((*batch_hw, self.width))
            bn.build((*batch_hw, self.width))
        self.fuse.build((*batch_hw, self.scales * self.width))
        out_shape = (*batch_hw, self.filters)
        self.fuse_bn.build(out_shape)
        self.channel_attention.build(out_shape)
        self.spatial_attention.build(out_shape)
        if in_channels != self.filters:
            self.shortcut = _conv(self.filters, 1, "shortcut")
            self.shortcut_bn = _bn(self.bn_momentum, "shortcut_bn")
            self.shortcut.build(input_shape)
            self.shortcut_bn.build(out_shape)
        super().build(input_shape)

    def call(self, inputs, training=None):
        x = ops.relu(self.project_bn(self.project(inputs), training=training))
        splits = ops.split(x, self.scales, axis=-1)
        outputs, previous = [], None
        for part, conv, bn in zip(splits, self.branch_convs, self.branch_bns):
            branch_in = part if previous is None else part + previous
            previous = ops.relu(bn(conv(branch_in), training=training))
            outputs.append(previous)
        fused = outputs[0] if self.scales == 1 else ops.concatenate(outputs, axis=-1)
        fused = self.fuse_bn(self.fuse(fused), training=training)
        attended = self.spatial_attention(self.channel_attention(fused))
        if self.shortcut is None:
            shortcut = inputs
        else:
            shortcut = self.shortcut_bn(self.shortcut(inputs), training=training)
        return ops.relu(attended + shortcut)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "scales": self.scales,
            "reduction": self.reduction,
            "spatial_kernel": self.spatial_kernel,
            "bn_momentum": self.bn_momentum,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CASPPBlock(layers.Layer):
    """Context-aggregation spatial pyramid pooling (ASPP-style) for the U-Net bottleneck.

    ``(N, H, W, C_in) -> (N, H, W, filters)``. Branches: one per rate (rate 1 -> 1x1 conv, else
    3x3 conv with that dilation; each conv-BN-ReLU, ``branch_filters`` wide) and an image-level
    branch (global average pool -> 1x1 conv + ReLU, no BN since it sees one value per image ->
    broadcast to H x W). Concatenation -> 1x1 conv-BN-ReLU to ``filters`` -> dropout.

    Args:
        filters: output channels.
        rates: dilation rates, one branch each (>= 1).
        branch_filters: width of each branch; default ``max(1, filters // 2)``.
        dropout: dropout rate after the projection (0 = none).
        bn_momentum: momentum of every BatchNormalization inside the block.
    """

    def __init__(
        self,
        filters: int,
        rates: Sequence[int] = (1, 2, 4, 6),
        branch_filters: int | None = None,
        dropout: float = 0.0,
        bn_momentum: float = 0.99,
        **kwargs,
    ):
        super().__init__(**kwargs)
        rates = tuple(int(r) for r in rates)
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f"rates must be one or more dilation rates >= 1, got {rates}")
        if int(filters) < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.filters = int(filters)
        self.rates = rates
        self.branch_filters = int(branch_filters) if branch_filters else max(1, self.filters // 2)
        self.dropout = float(dropout)
        self.bn_momentum = float(bn_momentum)

        self.branch_convs = [
            _conv(self.branch_filters, 1 if r == 1 else 3, f"rate{r}_{i}", dilation=r)
            for i, r in enumerate(rates)
        ]
        self.branch_bns = [_bn(self.bn_momentum, f"rate{r}_{i}_bn") for i, r in enumerate(rates)]
        self.pool_conv = layers.Conv2D(
            self.branch_filters, 1, activation="relu", kernel_initializer="he_normal", name="image_pool_conv"
        )
        self.project = _conv(self.filters, 1, "project")
        self.project_bn = _bn(self.bn_momentum, "project_bn")
        self.dropout_layer = layers.Dropout(self.dropout, name="dropout") if self.dropout > 0 else None

    def build(self, input_shape):
        batch_hw = tuple(input_shape[:-1])
        branch_shape = (*batch_hw, self.branch_filters)
        for conv, bn in zip(self.branch_convs, self.branch_bns):
            conv.build(input_shape)
            bn.build(branch_shape)
        self.pool_conv.build((input_shape[0], 1, 1, input_shape[-1]))
        self.project.build((*batch_hw, self.branch_filters * (len(self.rates) + 1)))
        self.project_bn.build((*batch_hw, self.filters))
        super().build(input_shape)

    def call(self, inputs, training=None):
        branches = [
            ops.relu(bn(conv(inputs), training=training)) for conv, bn in zip(self.branch_convs, self.branch_bns)
        ]
        pooled = self.pool_conv(ops.mean(inputs, axis=(1, 2), keepdims=True))
        branches.append(ops.broadcast_to(pooled, ops.shape(branches[0])))
        x = ops.relu(self.project_bn(self.project(ops.concatenate(branches, axis=-1)), training=training))
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "rates": list(self.rates),
            "branch_filters": self.branch_filters,
            "dropout": self.dropout,
            "bn_momentum": self.bn_momentum,
        }


# --- conversion to the portable graph ------------------------------------------------------------

LEGACY_CLASSES = (HACBlock, CASPPBlock, ChannelAttention, SpatialAttention)
_REGISTERED_NAMES = tuple(f'"{_PACKAGE}>{cls.__name__}"' for cls in LEGACY_CLASSES)


def is_legacy(model) -> bool:
    """Whether ``model`` contains a legacy layer (``HACBlock``, ``CASPPBlock``, ``ChannelAttention``, ``SpatialAttention``)."""
    return any(isinstance(layer, LEGACY_CLASSES) for layer in model._flatten_layers(include_self=False))


def saved_with_legacy_layers(path) -> bool:
    """Whether the ``.keras`` file at ``path`` holds a legacy layer, read from its config (no model built).

    False for a file that is not a ``.keras`` archive: Keras then reports what it finds.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json").decode("utf-8", errors="replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False
    return any(name in config for name in _REGISTERED_NAMES)


def to_portable(model: keras.Model) -> keras.Model:
    """``model`` with every legacy layer replaced by its stock-layer sub-graph, weights copied exactly.

    A model without legacy layers is returned as it is. Every other layer is cloned (same name,
    config and weights), the input keeps its name (the sequences it declares), the model its name,
    and a deeply supervised model its auxiliary heads and loss weights. Predictions agree with
    ``model``'s to float rounding (the same arithmetic, convs split per group): in eager inference
    bit for bit on the shipped U-Net and within ~1e-7 on tiny test models, in training mode (batch
    statistics) within ~5e-6; through ``predict()``'s compiled graph within 1.5e-5 on the shipped
    U-Net, as much as the legacy model's own ``predict()`` and eager outputs differ.
    """
    if not is_legacy(model):
        return model
    from tumorseg.models.blocks import caspp_block, channel_attention, hac_block, spatial_attention
    from tumorseg.models.supervision import DeeplySupervised

    def clone(layer):
        return layer if isinstance(layer, LEGACY_CLASSES) else layer.__class__.from_config(layer.get_config())

    def call(layer, *args, **kwargs):
        if not isinstance(layer, LEGACY_CLASSES):
            return layer(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if isinstance(layer, HACBlock):
            return hac_block(
                x, layer.filters, layer.name, scales=layer.scales, reduction=layer.reduction,
                spatial_kernel=layer.spatial_kernel, bn_momentum=layer.bn_momentum,
            )
        if isinstance(layer, CASPPBlock):
            return caspp_block(
                x, layer.filters, layer.name, rates=layer.rates, branch_filters=layer.branch_filters,
                dropout=layer.dropout, bn_momentum=layer.bn_momentum,
            )
        if isinstance(layer, ChannelAttention):
            return channel_attention(x, layer.name, layer.reduction)
        return spatial_attention(x, layer.name, layer.kernel_size)

    graph = keras.Model(model.input, model.outputs, name=model.name) if isinstance(model, DeeplySupervised) else model
    portable = keras.models.clone_model(graph, clone_function=clone, call_function=call)
    if isinstance(model, DeeplySupervised):  # clone_model makes a plain Functional of it
        portable = DeeplySupervised(portable.input, portable.outputs, aux_weights=model.aux_weights, name=model.name)
    copy_legacy_state(model, portable)
    return portable


def copy_legacy_state(source: keras.Model, target: keras.Model, *, optimizer: bool = False) -> None:
    """Copy the weights of ``source`` (with legacy layers) into ``target`` (the same model, portable).

    Layers are matched by name (a legacy block ``X`` by the layers ``X_*`` of its sub-graph); every
    weight of both models must be used exactly once with matching shapes, else ``ValueError``.
    ``optimizer``: also copy the optimizer state (Adam's moments, EMA averages, the step count)
    from ``source.optimizer`` to ``target.optimizer``, both built, for a resume.
    """
    pairs = _weight_pairs(source, target)
    for target_variable, source_variable, part in pairs:
        target_variable.assign(_sliced(source_variable, part))
    if optimizer:
        _copy_optimizer_state(pairs, source.optimizer, target.optimizer)


def _sliced(variable, part):
    value = keras.ops.convert_to_numpy(variable)
    return value if part is None else value[..., part]


def _layer_pairs(source, target, part=None):
    """``(target weight, source weight, slice of the source's last axis)`` for two layers of one kind."""
    if type(source) is not type(target) or len(source.weights) != len(target.weights):
        raise ValueError(
            f"layer {target.name!r} ({type(target).__name__}, {len(target.weights)} weights) does not match "
            f"{source.name!r} ({type(source).__name__}, {len(source.weights)} weights)"
        )
    pairs = []
    for want, have in zip(target.weights, source.weights):
        shape = tuple(have.shape)
        if part is not None:
            shape = (*shape[:-1], len(range(*part.indices(shape[-1]))))
        if tuple(want.shape) != shape:
            raise ValueError(f"weight {want.path} has shape {tuple(want.shape)}, {have.path} gives {shape}")
        pairs.append((want, have, part))
    return pairs


def _weight_pairs(source: keras.Model, target: keras.Model):
    by_name = {layer.name: layer for layer in target.layers}

    def get(name):
        if name not in by_name:
            raise ValueError(f"model {target.name!r} has no layer {name!r} (from {source.name!r})")
        return by_name[name]

    pairs = []
    for layer in source.layers:
        name = layer.name
        if isinstance(layer, HACBlock):
            for i in range(layer.scales):
                group = slice(i * layer.width, (i + 1) * layer.width)
                pairs += _layer_pairs(layer.project, get(f"{name}_project{i + 1}"), group)
                pairs += _layer_pairs(layer.project_bn, get(f"{name}_project{i + 1}_bn"), group)
                pairs += _layer_pairs(layer.branch_convs[i], get(f"{name}_branch{i + 1}"))
                pairs += _layer_pairs(layer.branch_bns[i], get(f"{name}_branch{i + 1}_bn"))
            pairs += _layer_pairs(layer.fuse, get(f"{name}_fuse"))
            pairs += _layer_pairs(layer.fuse_bn, get(f"{name}_fuse_bn"))
            pairs += _attention_pairs(layer.channel_attention, f"{name}_ca", get)
            pairs += _attention_pairs(layer.spatial_attention, f"{name}_sa", get)
            if layer.shortcut is not None:
                pairs += _layer_pairs(layer.shortcut, get(f"{name}_shortcut"))
                pairs += _layer_pairs(layer.shortcut_bn, get(f"{name}_shortcut_bn"))
        elif isinstance(layer, CASPPBlock):
            for i, (rate, conv, bn) in enumerate(zip(layer.rates, layer.branch_convs, layer.branch_bns), start=1):
                pairs += _layer_pairs(conv, get(f"{name}_branch{i}_rate{rate}"))
                pairs += _layer_pairs(bn, get(f"{name}_branch{i}_rate{rate}_bn"))
            pairs += _layer_pairs(layer.pool_conv, get(f"{name}_image_pool_conv"))
            pairs += _layer_pairs(layer.project, get(f"{name}_project"))
            pairs += _layer_pairs(layer.project_bn, get(f"{name}_project_bn"))
        elif isinstance(layer, (ChannelAttention, SpatialAttention)):
            pairs += _attention_pairs(layer, name, get)
        elif layer.weights:
            pairs += _layer_pairs(layer, get(name))
    targets = [id(t) for t, _, _ in pairs]
    sources = {(id(s), None if p is None else (p.start, p.stop)) for _, s, p in pairs}
    if len(set(targets)) != len(targets) or set(targets) != {id(w) for w in target.weights} or len(sources) != len(pairs):
        raise ValueError(f"the weights of {source.name!r} do not map one to one onto {target.name!r}")
    used = {id(s) for _, s, _ in pairs}
    if used != {id(w) for w in source.weights}:
        raise ValueError(f"{source.name!r} has weights that {target.name!r} has no place for")
    return pairs


def _attention_pairs(layer, name: str, get):
    if isinstance(layer, ChannelAttention):
        return _layer_pairs(layer.hidden_dense, get(f"{name}_mlp_hidden")) + _layer_pairs(layer.output_dense, get(f"{name}_mlp_out"))
    return _layer_pairs(layer.conv, get(f"{name}_conv"))


def _slot_lists(optimizer) -> dict[str, list]:
    """The optimizer's per-weight state lists (Adam's ``_momentums``/``_velocities``, EMA averages...),
    each aligned with its trainable variables; found generically, as Keras keeps no public index."""
    count = len(optimizer._trainable_variables)
    lists = {}
    for key, value in vars(optimizer).items():
        if key in ("_variables", "_trainable_variables") or not isinstance(value, list) or len(value) != count:
            continue
        if all(isinstance(v, keras.Variable) for v in value):
            lists[key] = value
    return lists


def _copy_optimizer_state(pairs, source, target) -> None:
    if source is None or target is None or not source.built or not target.built:
        raise ValueError("copying the optimizer state needs both models' optimizers, built")
    source_slots, target_slots = _slot_lists(source), _slot_lists(target)
    if set(source_slots) != set(target_slots):
        raise ValueError(f"optimizer state {sorted(source_slots)} does not match {sorted(target_slots)}")
    done = set()
    for target_variable, source_variable, part in pairs:
        if not target_variable.trainable:
            continue
        to, of = target._get_variable_index(target_variable), source._get_variable_index(source_variable)
        for key, slots in target_slots.items():
            slots[to].assign(_sliced(source_slots[key][of], part))
            done.add(id(slots[to]))
    slot_ids = {id(slot) for slots in source_slots.values() for slot in slots}
    by_name = {variable.name: variable for variable in source.variables if id(variable) not in slot_ids}
    for variable in target.variables:
        if id(variable) in done:
            continue
        match = by_name.get(variable.name)
        if match is None or tuple(match.shape) != tuple(variable.shape):
            raise ValueError(f"optimizer variable {variable.path} has no counterpart in the saved optimizer")
        variable.assign(match)
        done.add(id(variable))
