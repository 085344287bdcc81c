"""The two building blocks of the hybrid U-Net: HAC and CASPP, as serialisable Keras layers.

The reference work names the blocks and their purpose only; the designs below are ours and are
documented here and in the README (section "Models").

HAC - hierarchical attention convolution (:class:`HACBlock`)
    Replaces the plain "conv-BN-ReLU x2" block of the U-Net encoder and decoder.

    1. *Projection*: 1x1 conv-BN-ReLU to ``scales * width`` channels (``width = ceil(filters /
       scales)``), split into ``scales`` groups x_1 ... x_s.
    2. *Hierarchical branches* (Res2Net style): y_1 = K_1(x_1), y_i = K_i(x_i + y_{i-1}) where every
       K_i is a 3x3 conv-BN-ReLU. Each branch sees the previous branch's output, so branch i has a
       receptive field of (2i + 1) x (2i + 1): 3, 5, 7, 9 pixels for the default 4 scales, at the
       cost of one narrow 3x3 conv per branch.
    3. *Fusion*: concatenate y_1 ... y_s, 1x1 conv-BN to ``filters`` channels.
    4. *Channel attention* (:class:`ChannelAttention`, squeeze-excitation / CBAM): global average
       and max pooled descriptors pass through one shared bottleneck MLP (ratio ``reduction``), are
       summed and squashed by a sigmoid into one weight per channel.
    5. *Spatial attention* (:class:`SpatialAttention`, CBAM): channel-wise mean and max maps are
       stacked and convolved (``spatial_kernel`` x ``spatial_kernel``, sigmoid) into one weight per
       pixel.
    6. *Residual*: out = ReLU(attended + shortcut(x)); the shortcut is the identity when the
       channel counts match, else a 1x1 conv-BN projection.

CASPP - context-aggregation spatial pyramid pooling (:class:`CASPPBlock`)
    Replaces the plain conv block at the U-Net bottleneck.

    Parallel branches on the same input, each ``branch_filters`` wide: for every rate r in
    ``rates`` a 3x3 atrous conv-BN-ReLU with dilation r (r = 1: a 1x1 conv-BN-ReLU, as in ASPP),
    plus an image-level branch (global average pool -> 1x1 conv + ReLU -> broadcast back to H x W)
    that carries whole-image context. The branches are concatenated and projected by a 1x1
    conv-BN-ReLU to ``filters`` channels, followed by dropout.

All layers here are registered under the ``tumorseg`` package, so a saved ``.keras`` model loads
with plain ``keras.models.load_model`` once ``tumorseg.models`` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers, ops

__all__ = ["CASPPBlock", "ChannelAttention", "HACBlock", "SpatialAttention"]

_PACKAGE = "tumorseg"


def _conv(filters: int, kernel: int, name: str, dilation: int = 1, use_bias: bool = False) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        kernel,
        padding="same",
        dilation_rate=dilation,
        use_bias=use_bias,
        kernel_initializer="he_normal",
        name=name,
    )


def _bn(momentum: float, name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=momentum, name=name)


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


def attention_gate(gating, skip, name: str):
    """Additive attention gate on a skip connection (Oktay et al. 2018, "Attention U-Net").

    The decoder feature ``gating`` (already upsampled to the skip's size) decides, per pixel, how
    much of the encoder feature ``skip`` passes: ``skip * sigmoid(psi(relu(W_x skip + W_g gating)))``.
    Built from stock layers, so a model using it saves and loads with no custom objects.
    """
    inter = max(int(skip.shape[-1]) // 2, 8)
    theta = layers.Conv2D(inter, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_theta")(skip)
    phi = layers.Conv2D(inter, 1, kernel_initializer="he_normal", name=f"{name}_phi")(gating)
    joint = layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([theta, phi]))
    coefficients = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_psi")(joint)
    return layers.Multiply(name=f"{name}_gate")([skip, coefficients])
