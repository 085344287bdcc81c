"""Model builders: shapes, switches, training, saving, encoder weights and statistics."""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np
import pytest

from tumorseg.config import UMobileNetV2Config, UNetConfig
from tumorseg.losses import CombinedLoss, combined_loss
from tumorseg.metrics import segmentation_metrics
from tumorseg.models import (
    MODEL_NAMES,
    EncoderWeightsError,
    blocks_in,
    build_model,
    count_flops,
    get_encoder,
    hac_block,
    model_params,
    model_summary_stats,
    set_encoder_trainable,
)

# Keras' own get_weights() trips numpy 2's copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL_UNET = {"base_filters": 8, "depth": 4}
SMALL_MOBILE = {"alpha": 0.35, "encoder_weights": "none", "decoder_filters": (32, 16, 16, 8, 8)}


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype("float32")


@pytest.fixture(scope="module")
def unet128():
    return build_model("unet", (128, 128, 1), **SMALL_UNET)


@pytest.fixture(scope="module")
def mobile128():
    return build_model("umobilenetv2", (128, 128, 1), **SMALL_MOBILE)


def _random_mobilenet(alpha: float, size: int, seed: int) -> keras.Model:
    """A no-top MobileNetV2 whose every weight is set to random non-default values."""
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None)
    rng = np.random.default_rng(seed)
    for variable in base.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    return base


# --- registry and parameters ----------------------------------------------------------------------


def test_model_names_and_params_match_config():
    assert set(MODEL_NAMES) == {"unet", "umobilenetv2"}
    assert set(model_params("unet")) == set(UNetConfig.model_fields)
    assert set(model_params("umobilenetv2")) == set(UMobileNetV2Config.model_fields)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unet, umobilenetv2"):
        build_model("resnet", (64, 64, 1))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("unet", {"base_filter": 8}, "unknown parameter.*base_filter"),
        ("unet", {"depth": 0}, "depth"),
        ("unet", {"dropout": 1.5}, "dropout"),
        ("unet", {"caspp_rates": [1, 0]}, "caspp_rates"),
        ("unet", {"use_hac": "yes"}, "use_hac"),
        ("umobilenetv2", {"decoder_filters": (16, 8)}, "decoder_filters"),
        ("umobilenetv2", {"alpha": 0.0}, "alpha"),
        ("umobilenetv2", {"bn_momentum": 1.0}, "bn_momentum"),
        ("umobilenetv2", {"freeze_epochs": -1}, "freeze_epochs"),
    ],
)
def test_invalid_params_raise(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, (64, 64, 1), **params)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("unet", (100, 100, 1)), ("unet", (128, 120, 1)), ("umobilenetv2", (112, 112, 1)), ("unet", (64, 64))],
)
def test_invalid_input_size_raises(name, shape):
    params = SMALL_UNET if name == "unet" else SMALL_MOBILE
    with pytest.raises(ValueError, match="divisible|input_shape"):
        build_model(name, shape, **params)


def test_builds_with_config_defaults():
    unet = build_model("unet", (64, 64, 1), **UNetConfig().model_dump())
    assert unet.output_shape == (None, 64, 64, 1)
    params = UMobileNetV2Config(encoder_weights="none").model_dump()
    mobile = build_model("umobilenetv2", (64, 64, 1), **params)
    assert mobile.output_shape == (None, 64, 64, 1)


# --- forward pass -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["unet128", "mobile128"])
def test_forward_shape_and_range(fixture, request):
    model = request.getfixturevalue(fixture)
    out = np.asarray(model(_images(2, 128), training=False))
    assert out.shape == (2, 128, 128, 1)
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1)) and np.all(np.isfinite(out))


def test_other_sizes():
    unet = build_model("unet", (256, 256, 1), **SMALL_UNET)
    assert unet.output_shape == (None, 256, 256, 1)
    mobile = build_model("umobilenetv2", (64, 96, 1), **SMALL_MOBILE)
    out = np.asarray(mobile(np.zeros((1, 64, 96, 1), "float32"), training=False))
    assert out.shape == (1, 64, 96, 1)


def test_input_scaling_is_inside_the_model(unet128, mobile128):
    scale = unet128.get_layer("scale_0_1")
    assert float(np.asarray(scale(np.full((1, 1, 1, 1), 255.0, "float32"))).squeeze()) == pytest.approx(1.0)
    pre = mobile128.get_layer("mobilenetv2_preprocess")
    values = np.asarray(pre(np.array([0.0, 127.5, 255.0], "float32").reshape(1, 1, 3, 1))).ravel()
    np.testing.assert_allclose(values, [-1.0, 0.0, 1.0], atol=1e-6)
    assert mobile128.get_layer("gray_to_rgb").output.shape[-1] == 3


# --- architecture switches ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_hac", [True, False])
@pytest.mark.parametrize("use_caspp", [True, False])
def test_hac_and_caspp_switches(use_hac, use_caspp):
    model = build_model("unet", (64, 64, 1), base_filters=8, depth=3, use_hac=use_hac, use_caspp=use_caspp)
    blocks = blocks_in(model)
    hac_blocks = [name for name, kind in blocks.items() if kind == "hac"]
    assert ("caspp" in blocks.values()) is use_caspp
    # HAC in every encoder and decoder block (+ the bottleneck when CASPP is off)
    assert len(hac_blocks) == (0 if not use_hac else 2 * 3 + (0 if use_caspp else 1))
    plain_convs = [layer.name for layer in model.layers if layer.name.endswith("_conv1")]
    assert bool(plain_convs) is (not use_hac)  # the plain double-conv blocks
    if use_hac:
        assert {"enc1", "enc2", "enc3", "dec3", "dec2", "dec1"} <= set(hac_blocks)
        for name in hac_blocks:  # channel and spatial attention in each
            assert isinstance(model.get_layer(f"{name}_ca_mlp_hidden"), keras.layers.Dense)
            assert model.get_layer(f"{name}_sa_conv").activation.__name__ == "sigmoid"
    else:
        assert {"enc1_conv1", "dec1_conv1"} <= set(plain_convs)
    assert ("bottleneck" in hac_blocks) is (use_hac and not use_caspp)
    # stock Keras layers only: nothing that needs tumorseg (or safe_mode=False) to load
    assert all(type(layer).__module__.startswith("keras.") for layer in model.layers)
    if use_caspp:
        assert blocks["caspp"] == "caspp" and model.get_layer("caspp").output.shape[-1] == 8 * 2**3
        branches = [layer for layer in model.layers if layer.name.startswith("caspp_branch") and isinstance(layer, keras.layers.Conv2D)]
        assert sorted(conv.dilation_rate[0] for conv in branches) == [1, 2, 4, 6]
        assert model.get_layer("caspp_branch1_rate1").kernel_size == (1, 1)  # rate 1 -> 1x1
        assert all(conv.kernel_size == (3, 3) for conv in branches if conv.dilation_rate[0] > 1)
        assert isinstance(model.get_layer("caspp_image_pool"), keras.layers.GlobalAveragePooling2D)  # the image-level branch


def test_caspp_rates_and_dropout_reach_the_block():
    model = build_model("unet", (64, 64, 1), base_filters=8, depth=2, caspp_rates=[1, 3], dropout=0.25)
    assert [layer.dilation_rate[0] for layer in model.layers if layer.name.startswith("caspp_branch") and isinstance(layer, keras.layers.Conv2D)] == [1, 3]
    assert model.get_layer("caspp_dropout").rate == 0.25
    assert model.get_layer("enc1_dropout").rate == 0.25
    no_dropout = build_model("unet", (64, 64, 1), base_filters=8, depth=2, dropout=0.0)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in no_dropout.layers)


def _hac_model(in_channels: int, filters: int, scales: int, size: int = 8) -> keras.Model:
    inputs = keras.Input((size, size, in_channels))
    return keras.Model(inputs, hac_block(inputs, filters, "hac", scales=scales))


def test_hac_block_structure():
    model = _hac_model(3, 16, scales=4)
    out = model(np.zeros((1, 8, 8, 3), "float32"))
    assert tuple(out.shape) == (1, 8, 8, 16) and model.layers[-1].name == "hac"
    names = {layer.name for layer in model.layers}
    assert {f"hac_branch{i}" for i in range(1, 5)} <= names and "hac_branch5" not in names
    assert all(model.get_layer(f"hac_project{i}").filters == 4 for i in range(1, 5))  # width = ceil(16 / 4)
    # hierarchy: branch i adds the previous branch's output to its own group
    for i in range(2, 5):
        inbound = model.get_layer(f"hac_branch{i}_in")._inbound_nodes[0].input_tensors
        assert {t._keras_history.operation.name for t in inbound} == {f"hac_project{i}_relu", f"hac_branch{i - 1}_relu"}
    assert "hac_shortcut" in names  # 3 -> 16 channels needs a projection
    same = _hac_model(3, 3, scales=3)
    same(np.zeros((1, 8, 8, 3), "float32"))
    assert not any("shortcut" in layer.name for layer in same.layers)  # identity residual
    residual = same.get_layer("hac_residual")._inbound_nodes[0].input_tensors
    assert any(tensor is same.input for tensor in residual)


def _receptive_field(tensor) -> int:
    """Receptive field (pixels per side) of a graph tensor: every conv on the longest path back to the input widens it."""
    layer, node_index, _ = tensor._keras_history
    if isinstance(layer, keras.layers.InputLayer):
        return 1
    grow = (layer.kernel_size[0] - 1) * layer.dilation_rate[0] if isinstance(layer, keras.layers.Conv2D) else 0
    return grow + max(_receptive_field(t) for t in layer._inbound_nodes[node_index].input_tensors)


def test_hac_branch_receptive_fields_grow_by_two():
    model = _hac_model(2, 8, scales=4, size=16)
    assert [_receptive_field(model.get_layer(f"hac_branch{i}_relu").output) for i in range(1, 5)] == [3, 5, 7, 9]
    assert _receptive_field(model.get_layer("hac_fuse").output) == 9
    caspp = build_model("unet", (64, 64, 1), base_filters=4, depth=2, use_hac=False, caspp_rates=[1, 2, 6])
    pool = caspp.get_layer("pool2").output
    widths = [_receptive_field(caspp.get_layer(f"caspp_branch{i}_rate{r}").output) - _receptive_field(pool) for i, r in enumerate([1, 2, 6], 1)]
    assert widths == [0, 4, 12]  # 1x1, then 3x3 dilated 2 and 6


# --- training, saving -----------------------------------------------------------------------------------


def _fixed_batch(size: int, n: int = 4):
    rng = np.random.default_rng(7)
    images = rng.uniform(20, 80, (n, size, size, 1)).astype("float32")
    masks = np.zeros((n, size, size, 1), "float32")
    for i in range(n):
        r, c = rng.integers(2, size - 10, 2)
        masks[i, r : r + 8, c : c + 8] = 1.0
    images[masks > 0] = 200.0
    return images, masks


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("unet", {"base_filters": 4, "depth": 2}),  # HAC + CASPP on
        ("umobilenetv2", {**SMALL_MOBILE, "decoder_filters": (16, 8, 8, 8, 8)}),
    ],
)
@pytest.mark.slow  # trains (5 steps per model)
def test_training_steps_lower_the_loss(name, params):
    keras.utils.set_random_seed(0)
    model = build_model(name, (32, 32, 1), **params)
    # eager: tracing the train step costs 15-30 s on 2 CPU cores, five eager steps ~5 s
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=combined_loss(), run_eagerly=True)
    images, masks = _fixed_batch(32)
    losses = [float(model.train_on_batch(images, masks)) for _ in range(5)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # saved before any step
@pytest.mark.parametrize("fixture", ["unet128", "mobile128"])
def test_keras_round_trip(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    model.compile(optimizer="adam", loss=combined_loss(dice_weight=0.5), metrics=segmentation_metrics())
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: stock layers (the loss and metrics are registered)
    images = _images(2, 128, seed=1)
    np.testing.assert_array_equal(
        np.asarray(model(images, training=False)), np.asarray(loaded(images, training=False))
    )
    assert isinstance(loaded.loss, CombinedLoss) and loaded.loss.dice_weight == 0.5
    assert len(loaded.weights) == len(model.weights)


# --- UMobileNetV2 encoder -----------------------------------------------------------------------------------


def _assert_encoder_equals(encoder, reference):
    checked = 0
    for layer in encoder.layers:
        if not layer.weights:
            continue
        checked += 1
        expected = reference.get_layer(layer.name).get_weights()
        for got, want in zip(layer.get_weights(), expected):
            np.testing.assert_array_equal(got, want)
    assert checked > 50


@pytest.mark.parametrize("source", ["mobilenet", "encoder", "legacy_h5"])
def test_encoder_weights_loaded_from_file(tmp_path, source):
    base = _random_mobilenet(0.35, 128, seed=5)
    if source == "mobilenet":  # a whole no-top MobileNetV2 saved with save_weights
        path = tmp_path / "mobilenet.weights.h5"
        base.save_weights(path)
    elif source == "legacy_h5":  # legacy HDF5 layout (as the Keras-applications ..._no_top.h5 files)
        path = tmp_path / "mobilenet_no_top.h5"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras: "HDF5 is legacy"
            base.save(path)
    else:  # the encoder of a UMobileNetV2 (fewer layers than a whole MobileNetV2)
        donor = build_model("umobilenetv2", (128, 128, 1), **SMALL_MOBILE)
        donor_encoder = get_encoder(donor)
        for layer in donor_encoder.layers:
            if layer.weights:
                layer.set_weights(base.get_layer(layer.name).get_weights())
        path = tmp_path / "encoder.weights.h5"
        donor_encoder.save_weights(path)

    model = build_model("umobilenetv2", (128, 128, 1), **{**SMALL_MOBILE, "encoder_weights": str(path)})
    encoder = get_encoder(model)
    _assert_encoder_equals(encoder, base)
    fresh = get_encoder(build_model("umobilenetv2", (128, 128, 1), **SMALL_MOBILE))
    conv = encoder.get_layer("Conv1").get_weights()[0]
    assert not np.allclose(conv, fresh.get_layer("Conv1").get_weights()[0])
    # the file may come from a model of another input size: the weights do not depend on it
    other_size = build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "encoder_weights": str(path)})
    np.testing.assert_array_equal(get_encoder(other_size).get_layer("Conv1").get_weights()[0], conv)


def test_encoder_weights_errors(tmp_path):
    with pytest.raises(EncoderWeightsError, match="models.umobilenetv2.encoder_weights.*not found"):
        build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "encoder_weights": str(tmp_path / "nope.h5")})
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(EncoderWeightsError, match="not a Keras weights file"):
        build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "encoder_weights": str(text)})
    other_alpha = tmp_path / "alpha05.weights.h5"
    keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.5, include_top=False, weights=None).save_weights(
        other_alpha
    )
    with pytest.raises(EncoderWeightsError, match="same alpha"):
        build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "encoder_weights": str(other_alpha)})


def test_imagenet_without_network_fails_fast_and_clearly(monkeypatch):
    from keras.src.utils import file_utils

    calls = []

    def no_network(fname, origin=None, *args, **kwargs):
        calls.append(origin)
        raise Exception(f"URL fetch failure on {origin}: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    start = time.perf_counter()
    with pytest.raises(EncoderWeightsError) as info:
        build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "encoder_weights": "imagenet"})
    assert time.perf_counter() - start < 10
    assert calls and "mobilenet_v2" in calls[0]  # the Keras download was attempted (and patched)
    message = str(info.value)
    assert "internet" in message and "`none`" in message and "path" in message
    assert "models.umobilenetv2.encoder_weights" in message


def test_imagenet_rejects_alpha_without_weights():
    with pytest.raises(EncoderWeightsError, match="alpha"):
        build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "alpha": 0.6, "encoder_weights": "imagenet"})


def test_bn_momentum_on_every_batchnorm():
    model = build_model("umobilenetv2", (64, 64, 1), **{**SMALL_MOBILE, "bn_momentum": 0.77})
    encoder_bns = [layer for layer in get_encoder(model).layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(encoder_bns) > 30
    assert all(layer.momentum == pytest.approx(0.77) for layer in encoder_bns)
    decoder_bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert decoder_bns and all(layer.momentum == pytest.approx(0.77) for layer in decoder_bns)
    unet = build_model("unet", (64, 64, 1), base_filters=8, depth=3, use_hac=False, use_caspp=False, bn_momentum=0.66)
    assert all(
        layer.momentum == pytest.approx(0.66)
        for layer in unet.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_set_encoder_trainable_freezes_encoder_only():
    model = build_model("umobilenetv2", (64, 64, 1), **SMALL_MOBILE)
    encoder = get_encoder(model)
    n_encoder = len(encoder.trainable_weights)
    n_all = len(model.trainable_weights)
    assert n_encoder > 0

    set_encoder_trainable(model, False)
    assert encoder.trainable_weights == []
    assert len(model.trainable_weights) == n_all - n_encoder  # decoder untouched
    assert all(not layer.trainable for layer in encoder.layers)

    # frozen BatchNorm runs in inference mode: a training step leaves its statistics alone
    bn_encoder = encoder.get_layer("bn_Conv1")
    bn_decoder = model.get_layer("dec1_bn1")
    before_enc, before_dec = bn_encoder.moving_mean.numpy().copy(), bn_decoder.moving_mean.numpy().copy()
    model(_images(2, 64), training=True)
    np.testing.assert_array_equal(bn_encoder.moving_mean.numpy(), before_enc)
    assert not np.allclose(bn_decoder.moving_mean.numpy(), before_dec)

    set_encoder_trainable(model, True, batchnorm_trainable=False)
    assert not bn_encoder.trainable and encoder.get_layer("Conv1").trainable
    set_encoder_trainable(model, True)
    assert len(model.trainable_weights) == n_all
    with pytest.raises(ValueError, match="encoder"):
        set_encoder_trainable(build_model("unet", (64, 64, 1), base_filters=8, depth=3), False)


# --- statistics -----------------------------------------------------------------------------------------------


def test_flops_by_hand():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*4 outputs * 3*3*3 = 6912 MAC
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 8*8*4 * 3*3 = 2304
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)  # 8*8*4 inputs * 2*2*2 = 2048
    x = keras.layers.Dense(5)(x)  # 16*16 positions * 2 * 5 = 2560
    model = keras.Model(inputs, x)
    assert count_flops(model) == 2 * (6912 + 2304 + 2048 + 2560)
    stats = model_summary_stats(model)
    assert stats["macs_per_image"] == 13824 and stats["flops_per_image"] == 27648
    assert stats["params_total"] == model.count_params()


def test_flops_count_layers_inside_hac():
    model = _hac_model(8, 8, scales=4, size=16)
    # 256 pixels: project 1x1 8->8 (four 8->2 convs), four 3x3 2->2 branches, fuse 1x1 8->8,
    # channel-attention MLP (8->4->8, called on avg and max: 2 * 64), spatial-attention 7x7 2->1;
    # identity shortcut; the reshapes and channel poolings cost nothing
    macs = 256 * 64 + 4 * 256 * 9 * 4 + 256 * 64 + 2 * 64 + 256 * 49 * 2
    assert count_flops(model) == 2 * macs
    assert "call" not in model.get_layer("hac_project1").__dict__  # the counting hooks are removed
    assert "call" not in model.get_layer("hac_ca_mlp_hidden").__dict__


def test_flops_of_the_unet_are_those_of_the_legacy_layers():
    from helpers import legacy_unet

    params = {"base_filters": 8, "depth": 3, "attention_gates": True}
    assert count_flops(build_model("unet", (64, 64, 1), **params)) == count_flops(legacy_unet((64, 64, 1), **params)) > 0


def test_model_summary_stats(unet128, mobile128):
    for model in (unet128, mobile128):
        stats = model_summary_stats(model)
        assert stats["params_total"] == model.count_params()
        assert stats["params_trainable"] + stats["params_non_trainable"] == stats["params_total"]
        assert stats["flops_per_image"] == 2 * stats["macs_per_image"] > 0
        assert stats["input_shape"] == (128, 128, 1)
    # FLOPs scale with the pixel count (exactly, but for the few per-image ops on pooled vectors:
    # CASPP's image-level branch and the channel-attention MLPs)
    big = build_model("unet", (256, 256, 1), **SMALL_UNET)
    assert count_flops(big) == pytest.approx(4 * count_flops(unet128), rel=1e-3)
    plain = {**SMALL_UNET, "use_hac": False, "use_caspp": False}
    assert count_flops(build_model("unet", (64, 64, 1), **plain)) * 4 == count_flops(
        build_model("unet", (128, 128, 1), **plain)
    )


@pytest.mark.parametrize(
    ("name", "params", "gates"),
    [
        ("unet", {"base_filters": 4, "depth": 2, "use_caspp": False}, 2),
        ("umobilenetv2", {**SMALL_MOBILE, "decoder_filters": (16, 8, 8, 8, 8)}, 4),
    ],
)
def test_attention_gates_weight_every_skip_and_survive_a_round_trip(name, params, gates, tmp_path):
    model = build_model(name, (64, 64, 1), **params, attention_gates=True)
    psi = [layer for layer in model.layers if layer.name.endswith("_attention_psi")]
    assert len(psi) == gates  # one gate per skip connection
    assert not any(layer.name.endswith("_attention_psi") for layer in build_model(name, (64, 64, 1), **params).layers)
    # each gate emits one coefficient in (0, 1) per pixel of its skip
    probe = keras.Model(model.inputs, [layer.output for layer in psi])
    for coefficients in probe(_images(2, 64), training=False):
        values = np.asarray(coefficients)
        assert values.shape[-1] == 1 and 0.0 < values.min() and values.max() < 1.0
    model.save(tmp_path / "gated.keras")
    loaded = keras.models.load_model(tmp_path / "gated.keras")
    images = _images(2, 64, seed=3)
    np.testing.assert_allclose(np.asarray(model(images, training=False)), np.asarray(loaded(images, training=False)), atol=1e-6)


# --- transformer bottleneck --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "tokens", "channels"),
    [
        ("unet", {"base_filters": 4, "depth": 2, "use_hac": False}, 16 * 16, 16),  # after CASPP, stride 4
        ("umobilenetv2", {**SMALL_MOBILE, "decoder_filters": (16, 8, 8, 8, 8)}, 2 * 2, 112),  # stride 32
    ],
)
def test_transformer_bottleneck_attends_over_every_position_and_survives_a_round_trip(name, params, tokens, channels, tmp_path):
    plain = build_model(name, (64, 64, 1), **params)
    model = build_model(name, (64, 64, 1), **params, transformer_depth=2, transformer_heads=4)
    assert "transformer" not in {layer.name for layer in plain.layers}
    attention = [layer for layer in model.layers if isinstance(layer, keras.layers.MultiHeadAttention)]
    assert [layer.name for layer in attention] == ["transformer1_attention", "transformer2_attention"]
    assert all(layer.num_heads == 4 and layer.key_dim == channels // 4 for layer in attention)
    # the map leaves the block with the shape it came in with, so the decoder is unchanged
    map_in, map_out = model.get_layer("transformer_position").input, model.get_layer("transformer").output
    assert tuple(map_out.shape[1:]) == tuple(map_in.shape[1:]) and map_out.shape[-1] == channels
    assert [tuple(w.shape) for w in model.get_layer("dec1_conv1").weights] == [tuple(w.shape) for w in plain.get_layer("dec1_conv1").weights]
    # self-attention: every token's output depends on every other token (a conv's would not)
    probe = keras.Model(model.inputs, [model.get_layer("transformer_tokens").output, model.get_layer("transformer1_attention").output])
    token_in, token_out = probe(_images(1, 64), training=False)
    assert tuple(token_in.shape) == tuple(token_out.shape) == (1, tokens, channels)
    layer = model.get_layer("transformer1_attention")
    moved = np.asarray(token_in).copy()
    moved[0, 0] += np.random.default_rng(1).normal(0.0, 5.0, channels)  # not a constant shift: LayerNorm removes those
    normed = model.get_layer("transformer1_norm1")
    before = np.asarray(layer(normed(token_in), normed(token_in), training=False))
    after = np.asarray(layer(normed(moved), normed(moved), training=False))
    assert np.abs(after - before)[0, -1].max() > 1e-4  # the last token sees a change at the first
    # stock layers only: saves and loads with no custom objects, same predictions
    model.save(tmp_path / "transformer.keras")
    loaded = keras.models.load_model(tmp_path / "transformer.keras")
    images = _images(2, 64, seed=3)
    np.testing.assert_allclose(np.asarray(model(images, training=False)), np.asarray(loaded(images, training=False)), atol=1e-6)
    # no weight depends on the input size: the 64-px model warm-starts a 128-px one (train.init_from)
    bigger = build_model(name, (128, 128, 1), **params, transformer_depth=2, transformer_heads=4)
    bigger.load_weights(tmp_path / "transformer.keras")
    for mine, theirs in zip(bigger.get_layer("transformer2_mlp2").weights, model.get_layer("transformer2_mlp2").weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_transformer_flops_count_its_projections_attention_and_mlp():
    params = {"base_filters": 4, "depth": 2, "use_hac": False, "use_caspp": False, "dropout": 0.0}
    plain = count_flops(build_model("unet", (32, 32, 1), **params))
    model = build_model("unet", (32, 32, 1), **params, transformer_depth=1, transformer_heads=2)
    tokens, channels, heads, key_dim = 8 * 8, 16, 2, 8
    position = tokens * channels * 9  # the 3x3 depthwise positional encoding
    attention = tokens * channels * heads * key_dim * 3 + tokens * heads * key_dim * channels + tokens * tokens * heads * key_dim * 2
    mlp = tokens * channels * 2 * channels * 2  # C -> 2C -> C
    assert count_flops(model) == plain + 2 * (position + attention + mlp)


def test_transformer_settings_are_checked_with_their_names():
    for bad, message in [({"transformer_depth": -1}, "unet.transformer_depth"), ({"transformer_depth": 1, "transformer_heads": 0}, "unet.transformer_heads")]:
        with pytest.raises(ValueError, match=message):
            build_model("unet", (32, 32, 1), base_filters=4, depth=2, **bad)
    with pytest.raises(ValueError, match="transformer_heads"):
        UMobileNetV2Config(transformer_heads=0)
    assert UNetConfig().transformer_depth == UMobileNetV2Config().transformer_depth == 0  # off by default


# --- deep supervision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "strides"),
    [
        ("unet", {"base_filters": 4, "depth": 3}, [4, 2]),  # dec3 (stride 4), dec2 (2); dec1 feeds the main head
        ("unet", {"base_filters": 4, "depth": 2, "use_hac": False, "use_caspp": False, "attention_gates": True}, [2]),
        ("umobilenetv2", {**SMALL_MOBILE, "decoder_filters": (16, 8, 8, 8, 8), "dropout": 0.1}, [16, 8, 4, 2]),
    ],
)
def test_deep_supervision_heads_sit_on_every_coarse_decoder_stage(name, params, strides, tmp_path):
    from tumorseg.models import DeeplySupervised, inference_model, with_deep_supervision
    from tumorseg.models.supervision import decoder_stages

    model = build_model(name, (64, 64, 1), **params)
    assert [stride for _, stride in decoder_stages(model)] == strides
    trained = with_deep_supervision(model, 2.0)
    assert trained.aux_weights == [2.0 / s for s in strides]  # half the weight per halving of resolution
    assert len(trained.outputs) == 1 + len(strides)
    images = _images(2, 64)
    main, *auxiliary = trained(images, training=False)
    assert all(tuple(a.shape) == (2, 64, 64, 1) for a in auxiliary)
    np.testing.assert_allclose(np.asarray(main), np.asarray(model(images, training=False)), atol=1e-6)  # layers shared
    # the checkpoint keeps the heads (resume); the published model is the plain one, same weights
    trained.save(tmp_path / "checkpoint.keras")
    loaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert isinstance(loaded, DeeplySupervised) and loaded.aux_weights == trained.aux_weights
    plain = inference_model(loaded)
    plain.save(tmp_path / "published.keras")
    published = keras.models.load_model(tmp_path / "published.keras")
    assert len(published.outputs) == 1 and published.count_params() == model.count_params() and published.name == model.name
    assert not any("_aux_" in layer.name for layer in published.layers)
    np.testing.assert_allclose(np.asarray(published(images, training=False)), np.asarray(main), atol=1e-6)
    assert inference_model(model) is model


def test_deep_supervision_loss_adds_each_weighted_auxiliary_loss_and_metrics_see_the_main_head():
    from tumorseg.models import with_deep_supervision

    keras.utils.set_random_seed(0)
    model = with_deep_supervision(build_model("unet", (32, 32, 1), base_filters=4, depth=2), 3.0)
    loss = combined_loss()
    model.compile(optimizer="adam", loss=loss, metrics=segmentation_metrics())
    images, masks = _fixed_batch(32)
    main, auxiliary = model(images, training=False)
    expected = float(loss(masks, main)) + 3.0 / 2 * float(loss(masks, auxiliary))  # one stage, stride 2
    got = float(model.compute_loss(images, masks, [main, auxiliary], training=False))
    assert got == pytest.approx(expected, rel=1e-5)
    assert float(loss(masks, auxiliary)) > 0.1  # the auxiliary term is not ~0, so the check can fail
    results = model.evaluate(images, masks, verbose=0, return_dict=True)
    assert "dice" in results and not any("aux" in key or key.startswith("mask_") for key in results)
    plain_dice = segmentation_metrics()[[m.name for m in segmentation_metrics()].index("dice")]
    plain_dice.update_state(masks, main)
    assert results["dice"] == pytest.approx(float(plain_dice.result()), abs=1e-5)
    # the auxiliary head is trained: its kernel gets a gradient (it would get none if its loss were dropped)
    import tensorflow as tf

    head = model.get_layer("dec2_aux_logits").kernel
    with tf.GradientTape() as tape:
        total = model.compute_loss(images, masks, model(images, training=True))
    assert float(tf.reduce_max(tf.abs(tape.gradient(total, head.value)))) > 0.0


def test_deep_supervision_needs_a_coarse_decoder_stage():
    from tumorseg.models import with_deep_supervision

    inputs = keras.Input((16, 16, 1))
    flat = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs), name="flat")
    with pytest.raises(ValueError, match="train.deep_supervision: model 'flat' has no decoder stage"):
        with_deep_supervision(flat, 1.0)
