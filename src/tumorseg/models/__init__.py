"""Segmentation models: the hybrid U-Net (HAC + CASPP) and UMobileNetV2.

``build_model(name, input_shape, **params)`` builds one of :data:`MODEL_NAMES` from its config
section's values. Both models are graphs of stock Keras layers: a saved model loads with plain
``keras.models.load_model("model.keras")`` anywhere, without tumorseg. Importing this package
registers the project's losses and metrics (a compiled checkpoint names them), deep supervision's
training model, and the legacy HAC/CASPP layer classes that files saved before issue 23 hold;
:func:`to_portable` turns such a legacy model into the stock-layer graph.
"""

from tumorseg import losses as _losses  # noqa: F401 - registers the serialisable loss
from tumorseg import metrics as _metrics  # noqa: F401 - registers the serialisable metrics
from tumorseg.models.blocks import blocks_in, caspp_block, channel_attention, hac_block, spatial_attention
from tumorseg.models.fused_norm import fuse_batch_norm
from tumorseg.models.legacy import CASPPBlock, ChannelAttention, HACBlock, SpatialAttention, is_legacy, to_portable
from tumorseg.models.registry import MODEL_NAMES, build_model, count_flops, model_params, model_summary_stats
from tumorseg.models.supervision import DeeplySupervised, inference_model, with_deep_supervision
from tumorseg.models.umobilenetv2 import (
    ENCODER_NAME,
    EncoderWeightsError,
    build_encoder,
    get_encoder,
    set_encoder_trainable,
)

__all__ = [
    "CASPPBlock",
    "ChannelAttention",
    "DeeplySupervised",
    "ENCODER_NAME",
    "EncoderWeightsError",
    "HACBlock",
    "MODEL_NAMES",
    "SpatialAttention",
    "blocks_in",
    "build_encoder",
    "build_model",
    "caspp_block",
    "channel_attention",
    "count_flops",
    "fuse_batch_norm",
    "get_encoder",
    "hac_block",
    "inference_model",
    "is_legacy",
    "model_params",
    "model_summary_stats",
    "set_encoder_trainable",
    "spatial_attention",
    "to_portable",
    "with_deep_supervision",
]
