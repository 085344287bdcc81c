"""Segmentation models: the hybrid U-Net (HAC + CASPP) and UMobileNetV2.

``build_model(name, input_shape, **params)`` builds one of :data:`MODEL_NAMES` from its config
section's values. Importing this package registers every custom layer, loss and metric with Keras,
so ``keras.models.load_model("model.keras")`` needs no ``custom_objects``.
"""

from tumorseg import losses as _losses  # noqa: F401 - registers the serialisable loss
from tumorseg import metrics as _metrics  # noqa: F401 - registers the serialisable metrics
from tumorseg.models.blocks import CASPPBlock, ChannelAttention, HACBlock, SpatialAttention
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
    "build_encoder",
    "build_model",
    "count_flops",
    "get_encoder",
    "inference_model",
    "model_params",
    "model_summary_stats",
    "set_encoder_trainable",
    "with_deep_supervision",
]
