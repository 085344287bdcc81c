"""Fused batch normalisation (tumorseg.models.fused_norm): the fused kernel computes what Keras'
stock BatchNormalization computes - outputs, gradients, moving statistics - and a fused model
saves as stock layers."""

from __future__ import annotations

import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tumorseg.config import Config
from tumorseg.models import build_model, fuse_batch_norm
from tumorseg.models.fused_norm import is_fused
from tumorseg.training import compile_for_training


def _pair(momentum=0.9, center=True, scale=True, seed=3):
    """Two identical one-BN models (random gamma, beta and moving statistics)."""
    rng = np.random.default_rng(seed)
    models = []
    for _ in range(2):
        inputs = keras.Input((6, 5, 4))
        outputs = layers.BatchNormalization(momentum=momentum, center=center, scale=scale, epsilon=1e-3)(inputs)
        models.append(keras.Model(inputs, outputs))
    values = [rng.normal(1.0, 0.3, 4).astype("float32") if "gamma" in w.path else rng.normal(0, 0.5, 4).astype("float32") for w in models[0].weights]
    values = [np.abs(v) + 0.1 if "variance" in w.path else v for w, v in zip(models[0].weights, values)]
    for model in models:
        model.set_weights(values)
    return models


def _outputs_and_gradients(model, x, training):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=training)
        loss = tf.reduce_sum(y * tf.sin(y))  # a loss with a non-trivial gradient
    grads = tape.gradient(loss, [x, *model.trainable_variables])
    return y.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_stock_outputs_gradients_and_moving_statistics(training, center, scale):
    stock, fused = _pair(center=center, scale=scale)
    start_mean, start_variance = stock.layers[1].moving_mean.numpy(), stock.layers[1].moving_variance.numpy()
    assert fuse_batch_norm(fused) == 1
    assert not is_fused(stock.layers[1])
    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (3, 6, 5, 4)).astype("float32"))
    stock_y, stock_g = _outputs_and_gradients(stock, x, training)
    fused_y, fused_g = _outputs_and_gradients(fused, x, training)
    np.testing.assert_allclose(fused_y, stock_y, rtol=1e-4, atol=1e-4)
    assert len(fused_g) == 1 + int(center) + int(scale)
    for a, b in zip(fused_g, stock_g):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    bn = fused.layers[1]
    for a, b in zip(fused.non_trainable_weights, stock.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    if training:  # moved by momentum 0.9 towards the batch's mean and biased variance
        batch = x.numpy().reshape(-1, 4)
        np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * start_mean + 0.1 * batch.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * start_variance + 0.1 * batch.var(axis=0), rtol=1e-5)
    else:
        np.testing.assert_array_equal(bn.moving_mean.numpy(), start_mean)
        np.testing.assert_array_equal(bn.moving_variance.numpy(), start_variance)


def test_a_frozen_layer_in_training_uses_its_moving_statistics():
    stock, fused = _pair()
    fuse_batch_norm(fused)
    for model in (stock, fused):
        model.layers[1].trainable = False
    x = tf.constant(np.random.default_rng(1).normal(0, 2, (2, 6, 5, 4)).astype("float32"))
    before = [w.numpy() for w in fused.weights]
    np.testing.assert_allclose(fused(x, training=True).numpy(), stock(x, training=True).numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(before, fused.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_only_eligible_layers_are_fused_and_fusing_twice_changes_nothing():
    inputs = keras.Input((8, 8, 3))
    x = layers.BatchNormalization(name="plain")(inputs)
    x = layers.BatchNormalization(name="renorm", renorm=True)(x)
    x = layers.BatchNormalization(name="channels_first", axis=1)(x)
    flat = layers.Reshape((64, 3))(x)
    y = layers.BatchNormalization(name="rank3")(flat)
    model = keras.Model(inputs, y)
    assert fuse_batch_norm(model) == 1
    assert [layer.name for layer in model.layers if is_fused(layer)] == ["plain"]
    call = model.get_layer("plain").call
    assert fuse_batch_norm(model) == 1 and model.get_layer("plain").call is call


def _model_gradients(model, x, y, loss):
    with tf.GradientTape() as tape:
        loss_value = tf.reduce_mean(loss(y, model(x, training=True)))
    return [g.numpy() for g in tape.gradient(loss_value, model.trainable_variables)]


@pytest.mark.parametrize("name,params", [("umobilenetv2", {"encoder_weights": "none"}), ("unet", {"base_filters": 8})])
def test_fused_model_gradients_differ_from_stock_no_more_than_float_rounding(name, params):
    """A whole model's training gradients, fused vs stock, differ no more than the stock model's
    own gradients differ when the same batch comes in another order (the same sums, rounded in
    another order): the fused kernel changes rounding, not the function."""
    from tumorseg.losses import combined_loss

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 64, 64, 1)).astype("float32")
    y = (rng.random((4, 64, 64, 1)) > 0.9).astype("float32")
    keras.utils.set_random_seed(5)
    stock = build_model(name, (64, 64, 1), **params)
    fused = build_model(name, (64, 64, 1), **params)
    fused.set_weights(stock.get_weights())
    assert fuse_batch_norm(fused) > 10
    np.testing.assert_allclose(fused(x, training=False).numpy(), stock(x, training=False).numpy(), atol=1e-4)
    loss = combined_loss()  # (each training-mode call below also moves the moving statistics)
    reference = _model_gradients(stock, x, y, loss)
    order = [2, 0, 3, 1]
    reordered = _model_gradients(stock, x[order], y[order], loss)
    candidate = _model_gradients(fused, x, y, loss)

    def relative(others):  # per variable with a gradient well above rounding (|g| > 1e-4)
        return np.array([np.linalg.norm(g - o) / np.linalg.norm(g) for g, o in zip(reference, others) if np.linalg.norm(g) > 1e-4])

    fused_error, rounding = relative(candidate), relative(reordered)
    assert len(fused_error) > 20
    assert np.median(fused_error) <= 2 * np.median(rounding) + 1e-6, (np.median(fused_error), np.median(rounding))
    assert fused_error.max() <= 2 * rounding.max() + 1e-6, (fused_error.max(), rounding.max())


def test_training_fuses_and_a_fused_model_saves_stock_layers(tmp_path):
    """compile_for_training fuses under train.fused_batch_norm (and not without it); a fused,
    trained model saves plain BatchNormalization layers that load and predict without tumorseg's
    fusing."""
    cfg = Config()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    y = (rng.random((4, 32, 32, 1)) > 0.9).astype("float32")
    models = {}
    for setting in (False, True):
        model = build_model("unet", (32, 32, 1), base_filters=4, depth=3, use_hac=False, use_caspp=False)  # 14 BatchNorms, a small graph
        compile_for_training(model, train=cfg.train.model_copy(update={"fused_batch_norm": setting}), loss=cfg.loss, learning_rate=1e-3, steps_per_epoch=2)
        model.train_on_batch(x, y)
        models[setting] = model
    assert cfg.train.fused_batch_norm  # the default
    assert sum(is_fused(layer) for layer in models[True]._flatten_layers()) > 10
    assert not any(is_fused(layer) for layer in models[False]._flatten_layers())

    path = tmp_path / "fused.keras"
    models[True].save(path)
    with zipfile.ZipFile(path) as archive:
        text = archive.read("config.json").decode()
    assert '"class_name": "BatchNormalization"' in text and "fused" not in text.lower()
    loaded = keras.models.load_model(path, compile=False)
    assert not any(is_fused(layer) for layer in loaded._flatten_layers())
    np.testing.assert_allclose(loaded.predict_on_batch(x), models[True].predict_on_batch(x), atol=1e-4)
