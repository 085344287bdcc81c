"""The blocks of both models as functional sub-graphs of stock Keras layers: HAC and CASPP (the hybrid
U-Net), attention gates and the transformer bottleneck (switches of both models).

The reference work names the blocks and their purpose only; the designs below are ours and are
documented here and in the README (section "Models").

Every block is a function ``block(x, ..., name=...)`` that adds plain Keras layers (Conv2D,
BatchNormalization, ReLU, Add, Concatenate, Dense, global pooling, Reshape, UpSampling2D,
Multiply; LayerNormalization and MultiHeadAttention in :func:`transformer_bottleneck`) to the
graph: no custom layer class and no Lambda. A saved model therefore loads with
plain ``keras.models.load_model(path)`` (safe mode, no ``custom_objects``) in a Python that has
never heard of tumorseg. Each sub-layer is named ``<block>_<part>`` (``enc1_branch2_bn``) and the
block's output layer carries the block's name (``enc1``, ``dec2``, ``caspp``), so a block's
layers are the ones named ``<block>`` or ``<block>_*`` (:func:`blocks_in` finds the blocks).

Until issue 23 the blocks were custom layer classes (``HACBlock``, ``CASPPBlock``); they live on in
:mod:`tumorseg.models.legacy` so older files load, and :func:`tumorseg.models.to_portable`
rebuilds such a model as the graph below with the same weights (same math: the projection that
was one conv + BN to ``scales * width`` channels split into groups is ``scales`` convs + BNs of
``width`` channels, the same numbers since both are per output channel).

HAC - hierarchical attention convolution (:func:`hac_block`)
    Replaces the plain "conv-BN-ReLU x2" block of the U-Net encoder and decoder.

    1. *Projection*: 1x1 conv-BN-ReLU to ``scales`` groups x_1 ... x_s of ``width = ceil(filters /
       scales)`` channels each (``<block>_project<i>``).
    2. *Hierarchical branches* (Res2Net style): y_1 = K_1(x_1), y_i = K_i(x_i + y_{i-1}) where every
       K_i is a 3x3 conv-BN-ReLU (``<block>_branch<i>``). Each branch sees the previous branch's
       output, so branch i has a receptive field of (2i + 1) x (2i + 1): 3, 5, 7, 9 pixels for the
       default 4 scales, at the cost of one narrow 3x3 conv per branch.
    3. *Fusion*: concatenate y_1 ... y_s, 1x1 conv-BN to ``filters`` channels (``<block>_fuse``).
    4. *Channel attention* (:func:`channel_attention`, squeeze-excitation / CBAM, ``<block>_ca``):
       global average and max pooled descriptors pass through one shared bottleneck MLP (ratio
       ``reduction``), are summed and squashed by a sigmoid into one weight per channel.
    5. *Spatial attention* (:func:`spatial_attention`, CBAM, ``<block>_sa``): channel-wise mean and
       max maps are stacked and convolved (``spatial_kernel`` x ``spatial_kernel``, sigmoid) into
       one weight per pixel.
    6. *Residual*: out = ReLU(attended + shortcut(x)); the shortcut is the identity when the
       channel counts match, else a 1x1 conv-BN projection (``<block>_shortcut``).

CASPP - context-aggregation spatial pyramid pooling (:func:`caspp_block`)
    Replaces the plain conv block at the U-Net bottleneck.

    Parallel branches on the same input, each ``branch_filters`` wide: for every rate r in
    ``rates`` a 3x3 atrous conv-BN-ReLU with dilation r (r = 1: a 1x1 conv-BN-ReLU, as in ASPP;
    ``<block>_branch<i>_rate<r>``), plus an image-level branch (global average pool -> 1x1 conv +
    ReLU -> repeated back to H x W; ``<block>_image_pool``) that carries whole-image context. The
    branches are concatenated and projected by a 1x1 conv-BN-ReLU to ``filters`` channels (the
    output, named ``<block>``), followed by dropout (``<block>_dropout``).

The spatial sizes must be static (the U-Net has a fixed input size): the channel-wise mean/max
reshape to ``(H*W, C)`` and the image-level branch repeats its 1x1 map H x W times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers

__all__ = ["attention_gate", "blocks_in", "caspp_block", "channel_attention", "hac_block", "spatial_attention"]


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


def _static_hw(x, what: str) -> tuple[int, int]:
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        raise ValueError(f"{what} needs a static height and width, got {tuple(x.shape)}")
    return int(height), int(width)


def channel_hidden_units(channels: int, reduction: int) -> int:
    """Width of the channel-attention MLP: ``max(1, min(channels, max(4, channels // reduction)))``."""
    return max(1, min(channels, max(4, channels // reduction)))


def channel_attention(x, name: str, reduction: int = 8):
    """CBAM channel attention: ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``.

    The MLP (Dense ``hidden`` + ReLU, Dense ``channels``; ``<name>_mlp_hidden``, ``<name>_mlp_out``)
    is ONE pair of layers called on both pooled descriptors (shared weights). The per-channel
    weights ``(N, 1, 1, C)`` broadcast over ``(N, H, W, C)`` in the closing Multiply (``<name>``).
    """
    if int(reduction) < 1:
        raise ValueError(f"reduction must be >= 1, got {reduction}")
    channels = int(x.shape[-1])
    hidden = layers.Dense(channel_hidden_units(channels, int(reduction)), activation="relu", name=f"{name}_mlp_hidden")
    output = layers.Dense(channels, name=f"{name}_mlp_out")
    average = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_avg")(x)
    maximum = layers.GlobalMaxPooling2D(keepdims=True, name=f"{name}_max")(x)
    logits = layers.Add(name=f"{name}_add")([output(hidden(average)), output(hidden(maximum))])
    weights = layers.Activation("sigmoid", name=f"{name}_sigmoid")(logits)
    return layers.Multiply(name=name)([x, weights])


def spatial_attention(x, name: str, kernel_size: int = 7):
    """CBAM spatial attention: ``x * sigmoid(conv_kxk([mean_c(x), max_c(x)]))``.

    Keras has no "reduce over channels" layer: ``x`` is reshaped to ``(H*W, C)`` and the
    channels-first global 1-D poolings reduce its last axis (a plain mean and max over channels,
    no Lambda); the two ``(H*W, 1)`` maps are stacked and reshaped back to ``(H, W, 2)``.
    """
    if int(kernel_size) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    height, width = _static_hw(x, f"spatial attention {name!r}")
    channels = int(x.shape[-1])
    flat = layers.Reshape((height * width, channels), name=f"{name}_flatten")(x)
    mean = layers.GlobalAveragePooling1D(data_format="channels_first", keepdims=True, name=f"{name}_mean")(flat)
    maximum = layers.GlobalMaxPooling1D(data_format="channels_first", keepdims=True, name=f"{name}_max")(flat)
    pooled = layers.Concatenate(name=f"{name}_concat")([mean, maximum])
    pooled = layers.Reshape((height, width, 2), name=f"{name}_maps")(pooled)
    weights = layers.Conv2D(1, int(kernel_size), padding="same", activation="sigmoid", name=f"{name}_conv")(pooled)
    return layers.Multiply(name=name)([x, weights])


def hac_block(
    x,
    filters: int,
    name: str,
    *,
    scales: int = 4,
    reduction: int = 8,
    spatial_kernel: int = 7,
    bn_momentum: float = 0.99,
):
    """Hierarchical attention convolution: Res2Net-style multi-scale 3x3 branches + CBAM + residual.

    ``(N, H, W, C_in) -> (N, H, W, filters)``; the output layer is named ``name``. See the module
    docstring for the design.

    Args:
        filters: output channels.
        scales: number of hierarchical branches (receptive fields 3, 5, ..., 2*scales+1).
        reduction: channel-attention MLP reduction ratio.
        spatial_kernel: kernel size of the spatial-attention conv.
        bn_momentum: momentum of every BatchNormalization inside the block.
    """
    if int(filters) < 1 or int(scales) < 1:
        raise ValueError(f"filters and scales must be >= 1, got filters={filters}, scales={scales}")
    filters, scales = int(filters), int(scales)
    width = math.ceil(filters / scales)
    outputs, previous = [], None
    for i in range(1, scales + 1):
        part = _conv(width, 1, f"{name}_project{i}")(x)
        part = _bn(bn_momentum, f"{name}_project{i}_bn")(part)
        part = layers.ReLU(name=f"{name}_project{i}_relu")(part)
        if previous is not None:
            part = layers.Add(name=f"{name}_branch{i}_in")([part, previous])
        branch = _conv(width, 3, f"{name}_branch{i}")(part)
        branch = _bn(bn_momentum, f"{name}_branch{i}_bn")(branch)
        previous = layers.ReLU(name=f"{name}_branch{i}_relu")(branch)
        outputs.append(previous)
    fused = outputs[0] if scales == 1 else layers.Concatenate(name=f"{name}_concat")(outputs)
    fused = _conv(filters, 1, f"{name}_fuse")(fused)
    fused = _bn(bn_momentum, f"{name}_fuse_bn")(fused)
    attended = channel_attention(fused, f"{name}_ca", reduction)
    attended = spatial_attention(attended, f"{name}_sa", spatial_kernel)
    if int(x.shape[-1]) == filters:
        shortcut = x
    else:
        shortcut = _conv(filters, 1, f"{name}_shortcut")(x)
        shortcut = _bn(bn_momentum, f"{name}_shortcut_bn")(shortcut)
    residual = layers.Add(name=f"{name}_residual")([attended, shortcut])
    return layers.ReLU(name=name)(residual)


def caspp_block(
    x,
    filters: int,
    name: str,
    *,
    rates: Sequence[int] = (1, 2, 4, 6),
    branch_filters: int | None = None,
    dropout: float = 0.0,
    bn_momentum: float = 0.99,
):
    """Context-aggregation spatial pyramid pooling (ASPP-style) for the U-Net bottleneck.

    ``(N, H, W, C_in) -> (N, H, W, filters)``. Branches: one per rate (rate 1 -> 1x1 conv, else
    3x3 conv with that dilation; each conv-BN-ReLU, ``branch_filters`` wide) and an image-level
    branch (global average pool -> 1x1 conv + ReLU, no BN since it sees one value per image ->
    nearest up-sampling by H x W, i.e. the value repeated over the map). Concatenation -> 1x1
    conv-BN-ReLU to ``filters`` (the layer named ``name``) -> dropout (``<name>_dropout``, when
    ``dropout`` > 0).

    Args:
        filters: output channels.
        rates: dilation rates, one branch each (>= 1).
        branch_filters: width of each branch; default ``max(1, filters // 2)``.
        dropout: dropout rate after the projection (0 = none).
        bn_momentum: momentum of every BatchNormalization inside the block.
    """
    rates = tuple(int(r) for r in rates)
    if not rates or any(r < 1 for r in rates):
        raise ValueError(f"rates must be one or more dilation rates >= 1, got {rates}")
    if int(filters) < 1:
        raise ValueError(f"filters must be >= 1, got {filters}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    filters = int(filters)
    branch_filters = int(branch_filters) if branch_filters else max(1, filters // 2)
    height, width = _static_hw(x, f"CASPP block {name!r}")
    branches = []
    for i, rate in enumerate(rates, start=1):
        part = f"{name}_branch{i}_rate{rate}"
        branch = _conv(branch_filters, 1 if rate == 1 else 3, part, dilation=rate)(x)
        branch = _bn(bn_momentum, f"{part}_bn")(branch)
        branches.append(layers.ReLU(name=f"{part}_relu")(branch))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_image_pool")(x)
    pooled = layers.Conv2D(branch_filters, 1, activation="relu", kernel_initializer="he_normal", name=f"{name}_image_pool_conv")(pooled)
    branches.append(layers.UpSampling2D((height, width), interpolation="nearest", name=f"{name}_image_pool_repeat")(pooled))
    merged = layers.Concatenate(name=f"{name}_concat")(branches)
    out = _conv(filters, 1, f"{name}_project")(merged)
    out = _bn(bn_momentum, f"{name}_project_bn")(out)
    out = layers.ReLU(name=name)(out)
    if dropout > 0:
        out = layers.Dropout(float(dropout), name=f"{name}_dropout")(out)
    return out


def blocks_in(model: keras.Model) -> dict[str, str]:
    """``{block name: "hac" | "caspp"}`` for every HAC and CASPP block of ``model``, in layer order.

    A portable block is recognised by its layer names (a HAC block ``X`` has ``X``, ``X_fuse`` and
    ``X_sa_conv``; a CASPP block ``X`` has ``X`` and ``X_image_pool_conv``); a legacy layer by its
    class (``HACBlock``, ``CASPPBlock``).
    """
    names = {layer.name for layer in model.layers}
    legacy = {"HACBlock": "hac", "CASPPBlock": "caspp"}
    found = {}
    for layer in model.layers:
        kind = legacy.get(type(layer).__name__)
        if kind is None:
            if {f"{layer.name}_fuse", f"{layer.name}_sa_conv"} <= names:
                kind = "hac"
            elif f"{layer.name}_image_pool_conv" in names:
                kind = "caspp"
        if kind:
            found[layer.name] = kind
    return found


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


def transformer_bottleneck(x, name: str, *, depth: int, heads: int, mlp_ratio: int = 2, dropout: float = 0.0):
    """Self-attention over the deepest feature map: TransUNet's bottleneck (Chen et al. 2021),
    the reference work's other named next step; ``depth`` pre-norm transformer layers.

    Every pixel of the map becomes a token of its channels; each layer is
    ``t = t + MHA(LN(t))`` then ``t = t + MLP(LN(t))`` (MLP: Dense ``mlp_ratio x C``, SiLU, Dense C;
    SiLU rather than ViT's exact GELU, whose ``Erfc`` op tf2onnx cannot export),
    and the tokens go back to the map, so the decoder sees the same shape as without it. A CNN
    bottleneck sees a neighbourhood; attention lets every position weigh every other (the whole
    slice at stride 16/32), e.g. the opposite hemisphere. Position comes from a 3x3 depthwise
    convolution added to the map first (conditional positional encoding, Chu et al., CPVT 2023),
    not from a learnt table, so no weight depends on the input size: a model trained at 128² still
    warm-starts one at 256² (``train.init_from``). Stock layers only (``<name>_*``, output ``name``).
    """
    height, width, channels = (int(v) for v in x.shape[1:])
    position = layers.DepthwiseConv2D(3, padding="same", name=f"{name}_position")(x)
    x = layers.Add(name=f"{name}_with_position")([x, position])
    tokens = layers.Reshape((height * width, channels), name=f"{name}_tokens")(x)
    key_dim = max(channels // heads, 1)
    for index in range(1, depth + 1):
        prefix = f"{name}{index}"
        h = layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_norm1")(tokens)
        h = layers.MultiHeadAttention(heads, key_dim, dropout=dropout, name=f"{prefix}_attention")(h, h)
        tokens = layers.Add(name=f"{prefix}_attention_add")([tokens, h])
        h = layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_norm2")(tokens)
        h = layers.Dense(channels * mlp_ratio, activation="silu", name=f"{prefix}_mlp1")(h)
        h = layers.Dense(channels, name=f"{prefix}_mlp2")(h)
        tokens = layers.Add(name=f"{prefix}_mlp_add")([tokens, h])
    return layers.Reshape((height, width, channels), name=name)(tokens)
