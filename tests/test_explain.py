"""Seg-Grad-CAM: the map follows the tumour, has the image's shape and range, and nested layers work."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from helpers import blob_at, blob_pair
from tumorseg.explain import (
    GradCam,
    LayerNotFoundError,
    _exposing_model,
    _find,
    default_layer,
    explanation_panel,
    feature_layer_names,
    grad_cam,
    heatmap_overlay,
)

CENTRES = [(8, 8), (24, 8), (8, 24), (24, 24)]  # (x, y) in the 32x32 image
RADIUS = 5


@pytest.mark.slow
@pytest.mark.parametrize("layer", [None, "dec1"])
def test_heat_map_follows_the_tumour(blob_model, layer):
    model, _ = blob_model
    explain = GradCam(model, layer)
    hot_centres = []
    for centre in CENTRES:
        image, mask = blob_at(32, centre, RADIUS, seed=7)
        heat = explain(image)
        peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
        assert np.hypot(peak_x - centre[0], peak_y - centre[1]) <= RADIUS, f"{explain.layer}: peak ({peak_x}, {peak_y}) outside the disc at {centre}"
        ys, xs = np.nonzero(heat >= 0.5)
        hot_centres.append((xs.mean(), ys.mean()))
    hot = np.array(hot_centres)
    # the hot region moves with the disc: right discs to the right, lower discs lower, by most of the 16 px shift
    assert hot[1, 0] - hot[0, 0] > 10 and hot[3, 0] - hot[2, 0] > 10, hot
    assert hot[2, 1] - hot[0, 1] > 10 and hot[3, 1] - hot[1, 1] > 10, hot
    assert np.abs(hot - np.array(CENTRES)).max() < 4, hot


def test_default_layers_of_the_project_models():
    from tumorseg.config import Config
    from tumorseg.models import build_model

    cfg = Config().models
    unet = build_model("unet", (64, 64, 1), **cfg.unet.model_dump())
    mobile = build_model("umobilenetv2", (64, 64, 1), **(cfg.umobilenetv2.model_dump() | {"encoder_weights": "none", "alpha": 0.35}))
    plain = build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_hac=False, use_caspp=False)
    # the decoder stage before the last: stride 2, 32x32 of 64x64 (16x16 of 32x32)
    assert default_layer(unet) == "dec2"
    assert default_layer(mobile) == "dec4_relu2"
    assert default_layer(plain) == "dec2_relu2"
    assert unet.get_layer("dec2").output.shape[1:3] == (32, 32)


def test_nested_layer_sub_model_shares_the_graph_and_weights():
    """A layer inside UMobileNetV2's nested encoder: the exposing sub-model returns that layer's
    activation and the model's own output, exactly."""
    import keras

    from tumorseg.models import build_model

    model = build_model("umobilenetv2", (32, 32, 1), alpha=0.35, encoder_weights="none", decoder_filters=(16, 8, 8, 8, 8))
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 1)).astype("float32")
    for name in ("block_13_expand_relu", "encoder/block_6_expand_relu"):
        layer, path = _find(model, name)
        assert path == ("encoder",)
        activation, output = _exposing_model(model, layer, path)(x)
        encoder = model.get_layer("encoder")
        direct = keras.Model(encoder.inputs[0], layer.output)(np.repeat(x, 3, axis=-1) / 127.5 - 1.0)
        np.testing.assert_allclose(np.asarray(activation), np.asarray(direct), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(output), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    heat = grad_cam(model, x[0, :, :, 0].astype(np.uint8), layer="block_13_expand_relu")  # 2x2 at stride 16
    assert heat.shape == (32, 32) and heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    names = feature_layer_names(model)
    assert "encoder/block_13_expand_relu" in names and "dec4_relu2" in names
    assert "encoder/block_16_project" not in names  # 1x1 at 32x32: no spatial map to show


def test_shape_range_and_image_kinds(blob_model):
    model, _ = blob_model
    explain = GradCam(model)
    image, _ = blob_pair(96, 3)
    wide = cv2.resize(image, (120, 50))
    for picture in (wide, wide[..., None], cv2.cvtColor(wide, cv2.COLOR_GRAY2BGR), wide.astype(np.uint16) * 257):
        heat = explain(picture)
        assert heat.shape == (50, 120) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    # nothing predicted: the score is the whole image's probability; still a finite map in [0, 1]
    blank = np.full((32, 32), 40, np.uint8)
    assert not (model.predict(blank[None, ..., None].astype("float32"), verbose=0) > 0.5).any()
    heat = explain(blank)
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    with pytest.raises(ValueError, match="grayscale"):
        explain(np.zeros((2, 3, 4, 5), np.uint8))


def test_unknown_layer_lists_the_available_names(blob_model):
    model, _ = blob_model
    with pytest.raises(LayerNotFoundError) as error:
        grad_cam(model, np.zeros((32, 32), np.uint8), layer="no_such_layer")
    message = str(error.value)
    assert "'no_such_layer'" in message
    for name in ("enc1", "dec1", "dec2", "bottleneck"):
        assert name in message.split("available", 1)[1]


def test_overlay_colours_and_outline():
    image = np.full((20, 30), 100, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[:, 15:] = 1.0
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:12] = 255
    rgb = heatmap_overlay(image, heat, mask=mask)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    red, blue = rgb[..., 0].astype(int), rgb[..., 2].astype(int)
    assert (red[:, 20:] > blue[:, 20:]).all()  # strongest evidence is red (JET)
    assert (blue[:, :4] > red[:, :4]).all()  # none is blue
    assert (rgb[5, 5:12] == 255).all()  # the mask outline, white
    assert (rgb[10, 8] != 255).any()  # inside the outline: the blend, not white
    with pytest.raises(ValueError, match="does not match"):
        heatmap_overlay(image, heat[:10])
    panel = explanation_panel(image, mask, heat)
    # two tiles, each enlarged x13 (to at least 256 px) and framed by 2 px
    assert panel.shape == (20 * 13 + 4, 2 * (30 * 13 + 4), 3)


@pytest.mark.slow
def test_explain_cli_writes_panels_and_skips_bad_inputs(blob_model, tmp_path, capsys):
    from tumorseg.cli import main

    _, model_path = blob_model
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (1, 2):
        cv2.imwrite(str(inputs / f"slice{seed}.png"), blob_pair(48, seed)[0])
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    rc = main(["explain", str(inputs), "--model", str(model_path), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1  # some inputs skipped, like predict
    assert sorted(p.name for p in out.iterdir()) == ["slice1_gradcam.png", "slice2_gradcam.png"]
    panel = cv2.imread(str(out / "slice1_gradcam.png"))
    assert panel.shape[1] == 2 * panel.shape[0]  # overlay | Grad-CAM, each framed square tile
    assert "broken.png" in captured.err and "not an image" in captured.err
    assert "2 Grad-CAM panel(s)" in captured.out
    rc = main(["explain", str(inputs / "slice1.png"), "--model", str(model_path), "--out", str(out), "--layer", "nope"])
    assert rc == 1 and "dec2" in capsys.readouterr().err
