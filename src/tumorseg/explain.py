"""Seg-Grad-CAM: where in the image did the model look when it segmented the tumour?

Grad-CAM (Selvaraju et al., 2017) adapted to segmentation (Vinogradova et al., 2020)::

    S      = sum of the output probability over the predicted tumour region (p > threshold),
             or over the whole image when nothing is predicted (then the map shows what would
             raise the tumour probability anywhere)
    w_k    = spatial mean of dS / dA_k              A = activation of the chosen layer, channel k
    heat   = ReLU(sum_k w_k A_k), resized to the image (linear), divided by its maximum -> [0, 1]

The layer is any feature map of the model's graph, including layers inside a nested functional
sub-model (UMobileNetV2's MobileNetV2 ``encoder``): a sub-model that outputs that layer's
activation beside the prediction is built through the nested graph, sharing the trained weights.
The default layer is the last stride-2 feature map of the top-level graph: the decoder stage before
the last one in both models (``dec2`` of the U-Net, ``dec4_relu2`` of UMobileNetV2). The last stage
(stride 1) would only restate the output (its Grad-CAM is about the logit map), and coarser ones
did not localise reliably: on blob phantoms, stride-4 maps of a UMobileNetV2 and a plain U-Net
pointed away from the tumour, while stride-2 maps of UMobileNetV2 and the HAC U-Net peaked on it
(``layer=`` picks any other, e.g. ``dec3`` or ``block_16_project``, UMobileNetV2's bottleneck).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from tumorseg import images
from tumorseg.inference import resize_to_input
from tumorseg.inference.predictor import as_sequence_stack
from tumorseg.models.inputs import sequences_in

# Default layer: the last top-level feature map at the first of these strides that the model has.
DEFAULT_STRIDES = (2, 4, 8, 16, 32, 1)


class LayerNotFoundError(ValueError):
    """The requested layer is not a feature map of the model; the message lists the names."""


def _is_graph_model(layer) -> bool:
    import keras

    return isinstance(layer, keras.Model) and bool(getattr(layer, "_inbound_nodes", None)) and hasattr(layer, "inputs")


def _spatial_output(layer) -> tuple[int, int] | None:
    """(h, w) of a layer's single rank-4 output with a spatial extent > 1, else None."""
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # no or several outputs (nested models, multi-output layers)
        return None
    if len(shape) != 4 or shape[1] is None or shape[2] is None or shape[1] * shape[2] <= 1:
        return None
    return int(shape[1]), int(shape[2])


def _feature_layers(model, prefix: str = "") -> Iterator[tuple[str, object, tuple[str, ...]]]:
    """(name, layer, path of nested model names) for every feature-map layer, nested ones included."""
    for layer in model.layers:
        if _is_graph_model(layer):
            yield from _feature_layers(layer, prefix + layer.name + "/")
        elif layer is not model.layers[0] and layer.__class__.__name__ != "InputLayer" and _spatial_output(layer):
            yield layer.name, layer, tuple(prefix.strip("/").split("/")) if prefix else ()


def feature_layer_names(model) -> list[str]:
    """Names :func:`grad_cam` accepts as ``layer=`` (feature maps, nested ones as ``outer/inner``)."""
    return ["/".join((*path, name)) for name, _, path in _feature_layers(model)]


def _find(model, name: str) -> tuple[object, tuple[str, ...]]:
    wanted = name.split("/")[-1]
    path = tuple(name.split("/")[:-1])
    for found, layer, where in _feature_layers(model):
        if found == wanted and (not path or where == path):
            return layer, where
    names = feature_layer_names(model)
    raise LayerNotFoundError(
        f"layer {name!r} is not a feature map of model {model.name!r}; available ({len(names)}): {', '.join(names)}"
    )


def default_layer(model) -> str:
    """The last top-level feature map at stride 2 (else 4, 8, 16, 32, 1), skipping Dropout (identity at inference)."""
    import keras

    height = int(model.input_shape[1])
    by_stride: dict[int, str] = {}
    output_layer = model.layers[-1]
    for layer in model.layers:
        size = _spatial_output(layer)
        if (
            size is None
            or layer is output_layer
            or _is_graph_model(layer)
            or isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout))
        ):
            continue
        if height % size[0] == 0:
            by_stride[height // size[0]] = layer.name  # later layers overwrite: the last one wins
    for stride in DEFAULT_STRIDES:
        if stride in by_stride:
            return by_stride[stride]
    raise LayerNotFoundError(f"model {model.name!r} has no feature-map layer for Grad-CAM; give layer=")


def _exposing_model(model, layer, path: tuple[str, ...]):
    """A model with ``model``'s inputs and outputs ``[activation of layer, *model outputs]``.

    Top-level layers: the usual Grad-CAM sub-model. A layer inside a nested functional model
    (called once): split the outer graph at that model's call - ``pre`` (outer inputs -> its
    inputs), the nested model exposed recursively, ``post`` (its outputs -> outer outputs) - and
    compose them. Every piece shares the original layers, hence the trained weights.
    """
    import keras

    def one(tensors):  # a single tensor where the graph has one: keeps Keras' input structure
        return tensors[0] if len(tensors) == 1 else list(tensors)

    if not path:
        return keras.Model(one(model.inputs), [layer.output, *model.outputs], name=f"{model.name}_gradcam")
    nested = model.get_layer(path[0])
    if len(nested._inbound_nodes) != 1:
        raise LayerNotFoundError(
            f"cannot expose {layer.name!r}: sub-model {nested.name!r} is called {len(nested._inbound_nodes)} times in {model.name!r}"
        )
    node = nested._inbound_nodes[0]
    inner = _exposing_model(nested, layer, path[1:])
    try:
        pre = keras.Model(one(model.inputs), one(node.input_tensors))
        post = keras.Model(one(node.outputs), one(model.outputs))
    except ValueError as exc:  # the outer graph uses more than the nested model's outputs after it
        raise LayerNotFoundError(f"cannot expose {layer.name!r} through {nested.name!r}: {exc}") from None
    inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype) for t in model.inputs]
    activation, *inner_outputs = inner(pre(one(inputs)))
    outputs = post(one(inner_outputs))
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return keras.Model(one(inputs), [activation, *outputs], name=f"{model.name}_gradcam")


class GradCam:
    """Seg-Grad-CAM for one model and layer; build once, call per image (the sub-model and the
    traced gradient function are reused)."""

    def __init__(self, model, layer: str | None = None, *, threshold: float = 0.5) -> None:
        import tensorflow as tf

        if model is None:
            raise ValueError("Grad-CAM needs the Keras model (an exported .tflite/.onnx file has no gradients)")
        shape = model.input_shape
        if shape[1] is None or shape[2] is None:
            raise ValueError(f"Grad-CAM needs a model with a fixed input size, got {shape}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.layer = layer or default_layer(model)
        target, path = _find(model, self.layer)
        self.input_shape = (int(shape[1]), int(shape[2]))
        self.channels = int(shape[3]) if len(shape) == 4 and shape[3] is not None else 1
        self.sequences = sequences_in(model.inputs[0].name)  # () = one grayscale image
        self.threshold = float(threshold)
        self._sub = _exposing_model(model, target, path)

        @tf.function(reduce_retracing=True)
        def heat_at_layer(batch):
            with tf.GradientTape() as tape:
                activation, probability = self._sub(batch, training=False)[:2]
                probability = tf.cast(probability, tf.float32)
                region = tf.cast(probability > self.threshold, tf.float32)
                # nothing predicted: explain the tumour probability of the whole image instead
                region = tf.cond(tf.reduce_any(region > 0), lambda: region, lambda: tf.ones_like(region))
                score = tf.reduce_sum(probability * region)
            activation = tf.cast(activation, tf.float32)
            grads = tf.cast(tape.gradient(score, activation), tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (1, 1, 1, K)
            return tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1))[0]

        self._heat_at_layer = heat_at_layer

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float32 ``(H, W)`` heat map in [0, 1] at the image's size (all zeros when no evidence).
        A multi-sequence model takes an ``(H, W, C)`` stack in its sequence order; the one map
        explains all sequences together (the gradient reaches the layer through every channel)."""
        pixels = as_sequence_stack(image, self.sequences) if self.sequences else _as_gray(image)
        height, width = pixels.shape[:2]
        side_h, side_w = self.input_shape
        resized = resize_to_input(pixels, side_h) if side_h == side_w else cv2.resize(pixels, (side_w, side_h), interpolation=cv2.INTER_AREA)
        batch = resized.astype(np.float32)[None]
        if batch.ndim == 3:
            batch = batch[..., None]
        if self.channels == 3 and not self.sequences:
            batch = np.repeat(batch, 3, axis=-1)
        heat = np.asarray(self._heat_at_layer(batch), dtype=np.float32)
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
        heat = np.maximum(heat, 0.0)
        peak = float(heat.max())
        return (heat / peak).astype(np.float32) if peak > 0 and np.isfinite(peak) else np.zeros_like(heat)


def _as_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2 and image.dtype == np.uint8:
        return image
    if image.ndim in (2, 3) and image.size:
        return images.to_gray_uint8(image)
    raise ValueError(f"expected a (H, W) grayscale image, got shape {image.shape}")


def grad_cam(model, image: np.ndarray, layer: str | None = None, *, threshold: float = 0.5) -> np.ndarray:
    """Seg-Grad-CAM heat map of one uint8 grayscale image: float32 ``(H, W)`` in [0, 1].

    Convenience wrapper; use :class:`GradCam` to explain many images with one model.
    """
    return GradCam(model, layer, threshold=threshold)(image)


def sequence_mean(image: np.ndarray) -> np.ndarray:
    """The plane a heat map is drawn over: the image itself, or the mean of a slice's sequences."""
    return image if image.ndim == 2 else np.rint(image.mean(axis=2)).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: the image blended with the heat map in OpenCV's JET colours
    (blue = no evidence, red = strongest), plus the mask outline in white when ``mask`` is given."""
    from tumorseg.overlays import outline

    gray = _as_gray(image)
    if heat.shape != gray.shape:
        raise ValueError(f"heat map shape {heat.shape} does not match the image's {gray.shape}")
    colours = cv2.applyColorMap(np.clip(np.nan_to_num(heat) * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(colours, alpha, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), 1.0 - alpha, 0.0)
    if mask is not None:
        blended[outline(mask)] = (255, 255, 255)
    return cv2.cvtColor(blended, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------
# Files: what `tumorseg explain` runs
# --------------------------------------------------------------------------------------------

@dataclass
class ExplainReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    ignored: int = 0  # files in folders/zips without an image extension


def explanation_panel(image: np.ndarray, mask: np.ndarray, heat: np.ndarray, labels: Sequence[str] = ()) -> np.ndarray:
    """BGR panel for a PNG: the prediction overlay (green outline) beside the Grad-CAM overlay
    (white outline); small images are enlarged so both stay readable. A multi-sequence ``(H, W, C)``
    slice gets one prediction overlay per sequence, and the Grad-CAM overlay on their mean;
    ``labels`` caption the tiles (the sequences, then the Grad-CAM)."""
    from tumorseg.overlays import PREDICTION_BGR, caption, frame_tile, overlay_outline

    planes = [image] if image.ndim == 2 else [np.ascontiguousarray(image[..., c]) for c in range(image.shape[2])]
    backdrop = sequence_mean(image)
    tiles = [overlay_outline(plane, mask, PREDICTION_BGR) for plane in planes]
    tiles.append(cv2.cvtColor(heatmap_overlay(backdrop, heat, mask=mask), cv2.COLOR_RGB2BGR))
    tiles = [frame_tile(tile, min_side=256) for tile in tiles]
    if labels:  # name each multi-sequence tile
        tiles = [np.concatenate([caption(tile.shape[1], label), tile], axis=0) for label, tile in zip(labels, tiles)]
    return np.concatenate(tiles, axis=1)


def explain_files(
    inputs: Sequence[str | Path],
    predictor,
    out_dir: str | Path,
    *,
    layer: str | None = None,
    max_pixels: int | None = None,
    missing_sequences: str = "skip",
    progress: bool = False,
) -> ExplainReport:
    """Write ``<out_dir>/<stem>_gradcam.png`` (:func:`explanation_panel`) for every image in
    ``inputs`` - files, folders and zip archives, listed and named exactly as ``tumorseg predict``
    does; unreadable inputs are skipped with the reason. ``predictor`` must hold a Keras model."""
    from tqdm import tqdm

    from tumorseg import inference
    from tumorseg.io import atomic_write_png, check_separate

    check_separate(out_dir, inputs, what="the output folder")  # panels written among the inputs could overwrite them
    explainer = GradCam(predictor.model, layer, threshold=predictor.threshold)
    out_dir = Path(out_dir)
    listing = inference.list_inputs(inputs, predictor.sequences)
    report = ExplainReport(skipped=list(listing.problems), ignored=listing.ignored)
    report.skipped += [(item.display, "a NIfTI volume: explain takes 2-D slices (predict segments volumes)") for item in listing.volumes]
    reader = inference.ImageReader()  # same reading rules (size limits, zip members) as predict
    limit = max_pixels or images.DEFAULT_MAX_PIXELS
    items = [*listing.sources, *listing.slices]
    try:
        pairs = zip(items, inference.unique_stems(items))
        for item, stem in tqdm(pairs, total=len(items), desc="explain", unit="image", disable=not progress):
            try:
                if isinstance(item, inference.SliceInput):
                    image = inference.read_slice(item, predictor.sequences, missing_sequences, limit)
                else:
                    image = images.decode_image(reader.read(item), item.display, max_pixels=limit)  # the one decode gate
            except images.InputImageError as exc:
                report.skipped.append((item.display, str(exc)))
                continue
            prediction = predictor.predict([image])[0]
            labels = [*predictor.sequences, "Grad-CAM (mean of the sequences)"] if predictor.sequences else ()
            panel = explanation_panel(predictor.as_input(image), prediction.mask, explainer(image), labels)
            report.written.append(atomic_write_png(out_dir / f"{stem}_gradcam.png", panel))
    finally:
        reader.close()
    return report
