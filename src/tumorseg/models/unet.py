"""Base U-Net from scratch, with switchable HAC blocks and CASPP bottleneck (the hybrid U-Net).

Layout for ``depth = d`` and ``base_filters = f`` (level i has ``f * 2**i`` filters)::

    raw image (0..255) -> Rescaling(1/255)
    encoder level i = 0..d-1:  block(f*2^i) [-> dropout] -> skip_i ; MaxPool 2x2
    bottleneck:                CASPP(f*2^d)  if use_caspp  else  block(f*2^d) [-> dropout]
                               [-> transformer layers  if transformer_depth]
    decoder level i = d-1..0:  ConvTranspose 2x2/2 (f*2^i) -> concat skip_i -> block(f*2^i) [-> dropout]
    head:                      1x1 conv -> sigmoid (float32)

``block`` is :func:`~tumorseg.models.blocks.hac_block` when ``use_hac`` and a plain
"3x3 conv-BN-ReLU x2" otherwise; with both switches off this is the classic U-Net (ablation base).
Every block is a sub-graph of stock Keras layers whose output layer bears the block's name
(``enc1`` ... ``dec1``, ``caspp`` or ``bottleneck``), so a saved model loads with plain
``keras.models.load_model`` anywhere, without tumorseg.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from tumorseg.models._validate import check_bool, check_float, check_input_shape, check_int, check_int_list
from tumorseg.models.blocks import attention_gate, caspp_block, hac_block, transformer_bottleneck
from tumorseg.models.inputs import INPUT_NAME


def conv_block(x, filters: int, name: str, bn_momentum: float):
    """Plain U-Net block: (3x3 conv, no bias -> BatchNorm -> ReLU) x 2, as standard layers."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    input_shape: tuple[int, int, int],
    input_name: str = INPUT_NAME,
    *,
    base_filters: int = 32,
    depth: int = 4,
    use_hac: bool = True,
    use_caspp: bool = True,
    caspp_rates: Sequence[int] = (1, 2, 4, 6),
    dropout: float = 0.1,
    bn_momentum: float = 0.9,
    attention_gates: bool = False,
    transformer_depth: int = 0,
    transformer_heads: int = 8,
) -> keras.Model:
    """Build the (hybrid) U-Net. Input ``(N, H, W, C)`` raw pixels in [0, 255], H and W divisible
    by ``2**depth``; output ``(N, H, W, 1)`` sigmoid probabilities (float32).

    Parameters are exactly ``UNetConfig``'s: see the module docstring for the layout.
    """
    base_filters = check_int("unet.base_filters", base_filters, 1, 1024)
    depth = check_int("unet.depth", depth, 1, 6)
    use_hac = check_bool("unet.use_hac", use_hac)
    use_caspp = check_bool("unet.use_caspp", use_caspp)
    caspp_rates = check_int_list("unet.caspp_rates", caspp_rates, 1)
    dropout = check_float("unet.dropout", dropout, 0.0, 1.0, high_open=True)
    bn_momentum = check_float("unet.bn_momentum", bn_momentum, 0.0, 1.0, low_open=True, high_open=True)
    attention_gates = check_bool("unet.attention_gates", attention_gates)
    transformer_depth = check_int("unet.transformer_depth", transformer_depth, 0, 12)
    transformer_heads = check_int("unet.transformer_heads", transformer_heads, 1, 64)
    height, width, channels = check_input_shape(input_shape, 2**depth, "unet")

    def block(x, filters: int, name: str):
        if use_hac:
            x = hac_block(x, filters, name, bn_momentum=bn_momentum)
        else:
            x = conv_block(x, filters, name, bn_momentum)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
        return x

    inputs = keras.Input((height, width, channels), name=input_name)
    x = layers.Rescaling(1.0 / 255.0, name="scale_0_1")(inputs)
    skips = []
    for level in range(depth):
        x = block(x, base_filters * 2**level, f"enc{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level + 1}")(x)

    bottleneck_filters = base_filters * 2**depth
    if use_caspp:
        x = caspp_block(x, bottleneck_filters, "caspp", rates=caspp_rates, dropout=dropout, bn_momentum=bn_momentum)
    else:
        x = block(x, bottleneck_filters, "bottleneck")
    if transformer_depth:
        x = transformer_bottleneck(x, "transformer", depth=transformer_depth, heads=transformer_heads, dropout=dropout)

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, kernel_initializer="he_normal", name=f"up{level + 1}")(x)
        skip = attention_gate(x, skips[level], f"skip{level + 1}_attention") if attention_gates else skips[level]
        x = layers.Concatenate(name=f"skip{level + 1}")([x, skip])
        x = block(x, filters, f"dec{level + 1}")

    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    suffix = ("_hac" if use_hac else "") + ("_caspp" if use_caspp else "") + ("_transformer" if transformer_depth else "")
    return keras.Model(inputs, outputs, name=f"unet{suffix}")
