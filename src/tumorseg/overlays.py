"""Pictures of masks on images: outlines, framed tiles and captions.

A ground-floor module (OpenCV and NumPy only): the augment preview, ``predict``'s overlays, the
evaluation's best/worst grid, ``explain`` and the web app all draw with these, so an outline
looks the same wherever a user sees one.
"""

from __future__ import annotations

import cv2
import numpy as np


def outline(mask: np.ndarray) -> np.ndarray:
    """Boolean image of the mask's boundary pixels (mask pixels > 127 are foreground)."""
    binary = (mask > 127).astype(np.uint8)
    return (binary - cv2.erode(binary, np.ones((3, 3), np.uint8))).astype(bool)


# One colour code everywhere (predict, serve, explain, the evaluation grid, the augment preview):
# what a model predicted is red, the ground truth green.
PREDICTION_BGR = (0, 0, 255)
TRUTH_BGR = (0, 255, 0)


def overlay_outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = PREDICTION_BGR) -> np.ndarray:
    """Grayscale image as BGR with the mask outline drawn in ``colour`` (default: a prediction's red)."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    canvas[outline(mask)] = colour
    return canvas


def frame_tile(tile: np.ndarray, min_side: int = 128, border: int = 2) -> np.ndarray:
    """Frame a tile; small tiles are enlarged (nearest, so outlines stay crisp) to be readable."""
    factor = -(-min_side // tile.shape[0])
    if factor > 1:
        tile = cv2.resize(tile, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    return cv2.copyMakeBorder(tile, border, border, border, border, cv2.BORDER_CONSTANT, value=(255, 255, 255))


def fit_tile(tile: np.ndarray, side: int) -> np.ndarray:
    """``tile`` scaled to ``side`` x ``side`` (nearest: outlines stay one pixel wide and crisp), so
    images of different sizes line up in one grid."""
    if tile.shape[:2] == (side, side):
        return tile
    return cv2.resize(tile, (side, side), interpolation=cv2.INTER_NEAREST)


def caption(width: int, text: str) -> np.ndarray:
    """A white band with one line of black text, to put above a grid."""
    band = np.full((22, width, 3), 255, np.uint8)
    cv2.putText(band, text, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return band
