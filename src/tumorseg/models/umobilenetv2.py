"""UMobileNetV2: a Keras MobileNetV2 encoder with a U-Net decoder.

Layout (strides relative to the input, H and W divisible by 32)::

    raw gray image (0..255) -> gray->RGB (concat x3) -> Rescaling(1/127.5, offset -1)  # MobileNetV2 preprocessing
    encoder (nested keras.Model named "encoder", MobileNetV2 include_top=False):
        stride  2: block_1_expand_relu    -> skip
        stride  4: block_3_expand_relu    -> skip
        stride  8: block_6_expand_relu    -> skip
        stride 16: block_13_expand_relu   -> skip
        stride 32: block_16_project       -> bottleneck [-> transformer layers if transformer_depth]
    decoder stage k = 1..5 (filters decoder_filters[k-1]):
        UpSampling2D x2 (bilinear) -> concat skip (stages 1-4; stage 5 at full resolution has none)
        -> (3x3 conv-BN-ReLU) x 2 [-> dropout]
    head: 1x1 conv -> sigmoid (float32)

Every BatchNormalization of the encoder gets ``bn_momentum`` (Keras builds them with 0.999,
whose moving statistics lag far behind when training from scratch, so inference-mode predictions
come out empty).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras
from keras import layers

from tumorseg.models._validate import check_bool, check_float, check_input_shape, check_int, check_int_list
from tumorseg.models.blocks import attention_gate, transformer_bottleneck
from tumorseg.models.inputs import INPUT_NAME

ENCODER_NAME = "encoder"
SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu")
BOTTLENECK_LAYER = "block_16_project"
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
WEIGHTS_KEY = "models.umobilenetv2.encoder_weights"
_WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")


class EncoderWeightsError(ValueError):
    """The encoder weights asked for cannot be had (no internet for ``imagenet``, bad path/file)."""


def _mobilenet(alpha: float, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    return keras.applications.MobileNetV2(
        input_shape=input_shape, alpha=alpha, include_top=False, weights=weights
    )


def _imagenet_base(alpha: float, input_shape: tuple[int, int, int]) -> keras.Model:
    if alpha not in IMAGENET_ALPHAS:
        raise EncoderWeightsError(
            f"{WEIGHTS_KEY}=imagenet: ImageNet weights exist only for alpha in {list(IMAGENET_ALPHAS)}, "
            f"got alpha={alpha}; use encoder_weights `none` or a path to a weights file"
        )
    try:
        with warnings.catch_warnings():
            # sizes other than 96..224: Keras loads the 224 weights, valid for any size (fully convolutional)
            warnings.filterwarnings("ignore", message=".*input_shape. is undefined or non-square")
            return _mobilenet(alpha, input_shape, "imagenet")
    except Exception as exc:  # noqa: BLE001 - any download/cache failure means the same to the user
        raise EncoderWeightsError(
            f"{WEIGHTS_KEY}=imagenet: could not get the ImageNet MobileNetV2 weights "
            f"(alpha={alpha}, no top) - downloading them needs internet access "
            f"({type(exc).__name__}: {exc}). Alternatives: set {WEIGHTS_KEY} to `none` "
            "(train the encoder from scratch) or to the path of a local weights file "
            "(.h5 Keras-applications 'no_top' file, or a .weights.h5/.keras saved from a "
            f"MobileNetV2 of the same alpha, include_top=False)"
        ) from exc


def _load_encoder_weights(base: keras.Model, encoder: keras.Model, path: Path) -> None:
    """Load ``path`` into the encoder: files of the full MobileNetV2 (no top) or of the encoder."""
    errors = []
    # .weights.h5 / .keras files are matched by layer name, so a full-MobileNetV2 file also loads into
    # the (truncated) encoder; legacy .h5 files are matched by layer order and need the full model.
    targets = [("full MobileNetV2", base), ("encoder", encoder)]
    if str(path).endswith((".weights.h5", ".keras")):
        targets.reverse()
    for label, target in targets:
        try:
            with warnings.catch_warnings():
                # Keras warns about every saved group the other layout lacks; errors are reported below
                warnings.simplefilter("ignore", UserWarning)
                target.load_weights(str(path))
            return
        except Exception as exc:  # noqa: BLE001 - try the other layout, then report both
            errors.append(f"as {label}: {type(exc).__name__}: {str(exc)[:300]}")
    raise EncoderWeightsError(
        f"{WEIGHTS_KEY}: {path} does not hold weights of a MobileNetV2 encoder with the same alpha "
        "(include_top=False): " + " | ".join(errors)
    )


def build_encoder(
    input_shape: tuple[int, int, int], alpha: float = 1.0, encoder_weights: str | os.PathLike | None = "none"
) -> keras.Model:
    """The MobileNetV2 encoder alone: ``(H, W, 3)`` preprocessed input -> 5 feature maps
    (strides 2, 4, 8, 16, 32), as a ``keras.Model`` named ``"encoder"``."""
    spec = "none" if encoder_weights is None else str(encoder_weights)
    if spec.strip().lower() == "imagenet":
        base = _imagenet_base(alpha, input_shape)
        path = None
    elif spec.strip().lower() in ("none", "null", "scratch", "random", ""):
        base = _mobilenet(alpha, input_shape, None)
        path = None
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise EncoderWeightsError(
                f"{WEIGHTS_KEY}: weights file {spec!r} not found; give an existing .h5/.weights.h5/.keras "
                "file, `imagenet` (needs internet) or `none` (from scratch)"
            )
        if not str(path).lower().endswith(_WEIGHT_SUFFIXES):
            raise EncoderWeightsError(
                f"{WEIGHTS_KEY}: {spec!r} is not a Keras weights file (expected one of {list(_WEIGHT_SUFFIXES)})"
            )
        base = _mobilenet(alpha, input_shape, None)
    outputs = [base.get_layer(name).output for name in (*SKIP_LAYERS, BOTTLENECK_LAYER)]
    encoder = keras.Model(base.inputs, outputs, name=ENCODER_NAME)
    if path is not None:
        _load_encoder_weights(base, encoder, path)
    return encoder


def _decoder_stage(x, filters: int, name: str, bn_momentum: float, dropout: float):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def build_umobilenetv2(
    input_shape: tuple[int, int, int],
    input_name: str = INPUT_NAME,
    *,
    alpha: float = 1.0,
    encoder_weights: str | os.PathLike | None = "imagenet",
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16),
    dropout: float = 0.0,
    bn_momentum: float = 0.9,
    freeze_epochs: int = 0,
    fine_tune_lr_factor: float = 0.1,
    attention_gates: bool = False,
    transformer_depth: int = 0,
    transformer_heads: int = 8,
) -> keras.Model:
    """Build UMobileNetV2. Input ``(N, H, W, 1 or 3)`` raw pixels in [0, 255], H and W divisible by
    32; output ``(N, H, W, 1)`` sigmoid probabilities (float32).

    Parameters are exactly ``UMobileNetV2Config``'s. ``encoder_weights``: ``"imagenet"`` (Keras
    download; :class:`EncoderWeightsError` without internet), ``"none"`` (random init) or a path
    to a weights file of a MobileNetV2 with the same ``alpha`` and ``include_top=False`` (the Keras
    application ``..._no_top.h5`` file, or ``.weights.h5``/``.keras`` saved from such a model or
    from this model's ``"encoder"`` sub-model). ``freeze_epochs`` and ``fine_tune_lr_factor`` are
    validated here but used by training (see :func:`set_encoder_trainable`); the model is built
    with the encoder trainable.
    """
    alpha = check_float("umobilenetv2.alpha", alpha, 0.0, 1.4, low_open=True)
    decoder_filters = check_int_list("umobilenetv2.decoder_filters", decoder_filters, 1, length=5)
    dropout = check_float("umobilenetv2.dropout", dropout, 0.0, 1.0, high_open=True)
    bn_momentum = check_float("umobilenetv2.bn_momentum", bn_momentum, 0.0, 1.0, low_open=True, high_open=True)
    check_int("umobilenetv2.freeze_epochs", freeze_epochs, 0)
    check_float("umobilenetv2.fine_tune_lr_factor", fine_tune_lr_factor, 0.0, 1.0, low_open=True)
    attention_gates = check_bool("umobilenetv2.attention_gates", attention_gates)
    transformer_depth = check_int("umobilenetv2.transformer_depth", transformer_depth, 0, 12)
    transformer_heads = check_int("umobilenetv2.transformer_heads", transformer_heads, 1, 64)
    if encoder_weights is not None and not isinstance(encoder_weights, (str, os.PathLike)):
        raise ValueError(f"umobilenetv2.encoder_weights must be imagenet, none or a path, got {encoder_weights!r}")
    height, width, channels = check_input_shape(input_shape, 32, "umobilenetv2")

    encoder = build_encoder((height, width, 3), alpha, encoder_weights)
    for layer in encoder.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum

    inputs = keras.Input((height, width, channels), name=input_name)
    if channels == 3:  # three sequences (or an RGB image) feed the encoder's three input planes
        x = inputs
    elif channels == 1:
        x = layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    else:  # another number of sequences: a learnt 1x1 mix to three planes, starting as their mean
        x = layers.Conv2D(3, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(1.0 / channels), name="sequences_to_rgb")(inputs)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenetv2_preprocess")(x)
    *skips, x = encoder(x)
    if transformer_depth:
        x = transformer_bottleneck(x, "transformer", depth=transformer_depth, heads=transformer_heads, dropout=dropout)
    for stage, filters in enumerate(decoder_filters, start=1):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{stage}_up")(x)
        if stage <= len(skips):
            skip = attention_gate(x, skips[-stage], f"dec{stage}_attention") if attention_gates else skips[-stage]
            x = layers.Concatenate(name=f"dec{stage}_skip")([x, skip])
        x = _decoder_stage(x, filters, f"dec{stage}", bn_momentum, dropout)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=f"umobilenetv2_{alpha:g}")


def get_encoder(model: keras.Model) -> keras.Model:
    """The nested ``"encoder"`` sub-model of a UMobileNetV2 (``ValueError`` if there is none)."""
    try:
        return model.get_layer(ENCODER_NAME)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no {ENCODER_NAME!r} sub-model (not a UMobileNetV2?)") from None


def set_encoder_trainable(model: keras.Model, trainable: bool, *, batchnorm_trainable: bool | None = None) -> None:
    """Freeze (``trainable=False``) or unfreeze the encoder of a UMobileNetV2; the decoder is untouched.

    Frozen: every encoder layer has ``trainable=False``; for BatchNormalization this also means
    inference mode (moving statistics used and not updated), as Keras' transfer-learning guide
    recommends. Unfrozen: all encoder layers trainable, except BatchNormalization when
    ``batchnorm_trainable=False`` (the guide's advice for fine-tuning *pretrained* weights with
    small batches: keep BN in inference mode). ``batchnorm_trainable`` defaults to ``trainable``.

    Call ``model.compile(...)`` again afterwards so the change reaches the optimizer.
    """
    encoder = get_encoder(model)
    trainable = bool(trainable)
    bn_trainable = trainable if batchnorm_trainable is None else bool(trainable and batchnorm_trainable)
    encoder.trainable = trainable
    # Set every layer explicitly: Keras propagates `trainable` to sublayers only when the
    # container's own flag changes, which would leave a BatchNorm frozen by an earlier call.
    for layer in encoder.layers:
        layer.trainable = bn_trainable if isinstance(layer, layers.BatchNormalization) else trainable
