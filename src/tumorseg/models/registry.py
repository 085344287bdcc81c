"""Model registry: ``build_model(name, input_shape, **params)`` and model statistics."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import layers

from tumorseg.config import MODEL_NAMES
from tumorseg.models.inputs import input_name
from tumorseg.models.umobilenetv2 import build_umobilenetv2
from tumorseg.models.unet import build_unet

_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "unet": build_unet,
    "umobilenetv2": build_umobilenetv2,
}
if tuple(_BUILDERS) != MODEL_NAMES:  # a model needs both a builder and its params.yaml section
    raise ImportError(f"model builders {tuple(_BUILDERS)} do not match the config's models {MODEL_NAMES}")


def model_params(name: str) -> tuple[str, ...]:
    """The keyword parameters model ``name`` accepts (the fields of its config section)."""
    builder = _builder(name)
    return tuple(
        p.name for p in inspect.signature(builder).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    )


def _builder(name: str) -> Callable[..., keras.Model]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name]


def build_model(name: str, input_shape: tuple[int, int, int], *, sequences: Sequence[str] = (), **params: Any) -> keras.Model:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) for ``(H, W, C)`` raw-pixel inputs.

    ``params`` are the model's config section as keywords, e.g.
    ``build_model("unet", (256, 256, 1), **cfg.models.unet.model_dump())``; missing ones take the
    defaults of ``params.yaml``. ``sequences``: the MRI sequence of each channel, recorded in the
    input's name (:mod:`tumorseg.models.inputs`). An unknown name, unknown parameter or invalid
    value raises ``ValueError`` naming it.
    """
    if sequences and len(sequences) != input_shape[-1]:
        raise ValueError(f"model {name!r}: {len(sequences)} sequences ({', '.join(sequences)}) for {input_shape[-1]} input channel(s)")
    builder = _builder(name)
    accepted = model_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return builder(input_shape, input_name(sequences), **params)


# --- statistics -------------------------------------------------------------------------------

_FLOP_LAYERS = (
    layers.Conv2D,
    layers.DepthwiseConv2D,
    layers.SeparableConv2D,
    layers.Conv2DTranspose,
    layers.Dense,
    layers.MultiHeadAttention,
)


def _macs(layer: layers.Layer, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one call on a batch of 1 (bias additions not counted)."""
    if isinstance(layer, layers.Conv2DTranspose):
        # every input pixel scatters a kh x kw x C_out kernel patch
        kh, kw = layer.kernel_size
        return int(np.prod(in_shape[1:])) * kh * kw * layer.filters
    if isinstance(layer, layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        mid = in_shape[-1] * layer.depth_multiplier
        return int(np.prod(out_shape[1:-1])) * (mid * kh * kw + mid * layer.filters)
    if isinstance(layer, layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return int(np.prod(out_shape[1:])) * kh * kw
    if isinstance(layer, layers.Conv2D):
        kh, kw = layer.kernel_size
        groups = getattr(layer, "groups", 1) or 1
        return int(np.prod(out_shape[1:])) * kh * kw * (in_shape[-1] // groups)
    if isinstance(layer, layers.Dense):
        return int(np.prod(in_shape[1:])) * layer.units
    if isinstance(layer, layers.MultiHeadAttention):  # self-attention over T tokens of C channels
        tokens, channels = int(np.prod(in_shape[1:-1])), in_shape[-1]
        heads, key_dim, value_dim = layer.num_heads, layer.key_dim, layer.value_dim or layer.key_dim
        projections = tokens * channels * heads * (2 * key_dim + value_dim) + tokens * heads * value_dim * out_shape[-1]
        return projections + tokens * tokens * heads * (key_dim + value_dim)  # scores QK^T and their weighted sum of V
    return 0


def count_flops(model: keras.Model) -> int:
    """FLOPs of one forward pass on ONE image, by the convention 1 multiply-add = 2 FLOPs.

    Counted: the multiply-accumulates of every Conv2D, DepthwiseConv2D, SeparableConv2D,
    Conv2DTranspose and Dense call and of self-attention (its four projections, the scores and
    their weighted sum of the values), wherever it sits (top level - the HAC/CASPP sub-graphs -, inside
    legacy HAC/CASPP layers or the nested encoder; a layer called twice, as channel attention's
    shared MLP, counts twice), from the shapes actually seen in one inference pass on a zero image
    (same padding counted as full-size output). Not counted: bias additions, BatchNorm (foldable
    into the conv), activations, pooling, up-sampling, reshapes, concatenation and the attention
    element-wise products - together a few percent at most. This is the usual "FLOPs = 2 x MACs"
    convention of segmentation papers (some papers report MACs and call them FLOPs: halve ours).
    """
    counted = [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, _FLOP_LAYERS)]
    total = 0
    originals = {}

    def wrap(layer):
        original = layer.call

        def call(inputs, *args, **kwargs):
            nonlocal total
            outputs = original(inputs, *args, **kwargs)
            total += _macs(layer, tuple(inputs.shape), tuple(outputs.shape))
            return outputs

        return original, call

    try:
        for layer in counted:
            originals[id(layer)], layer.call = wrap(layer)
        shape = (1, *model.input_shape[1:])
        if any(dim is None for dim in shape):
            raise ValueError(f"count_flops needs a model with a fixed input size, got {model.input_shape}")
        model(np.zeros(shape, dtype="float32"), training=False)
    finally:
        for layer in counted:
            if "call" in layer.__dict__:
                del layer.__dict__["call"]
    return 2 * total


def model_summary_stats(model: keras.Model) -> dict[str, Any]:
    """Parameter counts and FLOPs per image of ``model`` (see :func:`count_flops` for the convention).

    Returns ``{"params_total", "params_trainable", "params_non_trainable", "flops_per_image",
    "gflops_per_image", "macs_per_image", "input_shape", "flops_convention"}``.
    """
    trainable = int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))
    non_trainable = int(sum(int(np.prod(v.shape)) for v in model.non_trainable_weights))
    flops = count_flops(model)
    return {
        "params_total": trainable + non_trainable,
        "params_trainable": trainable,
        "params_non_trainable": non_trainable,
        "flops_per_image": flops,
        "gflops_per_image": flops / 1e9,
        "macs_per_image": flops // 2,
        "input_shape": tuple(model.input_shape[1:]),
        "flops_convention": "2 FLOPs per multiply-add of conv/dense layers and self-attention; bias, BN, activations not counted",
    }
