"""Seeded MRI-like brain-tumour phantoms: a stand-in for T1 contrast-enhanced axial slices.

Used when no real data can be had (offline runs, CI, demos), so the pipeline can still train
and be tested end to end. A phantom is a head (bright scalp, dark skull, brain with smooth
texture, gray/white-matter contrast, sulci, sometimes ventricles and a falx) holding exactly one
tumour, whose hard outline is the mask. Tumours loosely follow the three classes of the
Figshare set (Cheng et al.): gliomas anywhere in the brain, irregular, often rim-enhancing
with a necrotic core and oedema; meningiomas round and broad-based against the skull or falx;
pituitary tumours small, bright and near the midline at the skull base. A bias field and
Rician noise finish the image.

All geometry is in units of the image size (coordinates run from -1 to 1), so any size from
32 pixels up gives the same anatomy. Each phantom depends only on ``(seed, index)``: its
generator comes from ``SeedSequence([seed, index])``, so a dataset is the same however it is
split across processes or in which order it is generated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tumorseg.io import atomic_write_bytes, encode_png

MIN_SIZE = 32

# Tumour area as a fraction of the image: log-normal per class, truncated to this range. The
# medians and spread roughly follow the masks of the Figshare set (mean about 1.7% of the image,
# gliomas largest, pituitary tumours smallest), with a few more small lesions.
MIN_AREA_FRACTION = 0.001
MAX_AREA_FRACTION = 0.08
_MEDIAN_AREA = {"glioma": 0.015, "meningioma": 0.012, "pituitary": 0.006}
_AREA_SPREAD = 0.9  # standard deviation of log(area)

# Class mix. The Figshare set is about 47% glioma, 23% meningioma, 30% pituitary; pituitary is
# rarer here because an axial phantom has no real skull-base anatomy to put around it.
_KINDS = ("glioma", "meningioma", "pituitary")
_KIND_PROBABILITIES = (0.5, 0.3, 0.2)

# Relative T1 signal levels (scaled to 0-255 at the end).
_SCALP = 1.0  # subcutaneous fat: the brightest ring, over twice the brain's signal
_GRAY = 0.42  # cortex; white matter is brighter on T1
_CSF = 0.12  # ventricles, sulci


# --------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] as a row (x) and a column (y): broadcasting them
    gives full images without allocating coordinate planes."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - np.float32(1.0)
    return coords[None, :], coords[:, None]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise that varies over about 1/cells of the shape: a
    coarse random grid upsampled bicubically (cheap low-frequency texture, no FFT needed)."""
    height, width = shape
    cells = int(max(2, min(cells, height, width)))
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    coarse -= coarse.mean()
    # Normalising the coarse grid is much cheaper than the full field; bicubic upsampling keeps
    # about 0.88 of the standard deviation whatever the sizes.
    coarse *= np.float32(1.0 / (0.88 * (coarse.std() + 1e-6)))
    # Bicubic to ~8 pixels per cell, then bilinear the rest of the way: looks the same for a
    # field this smooth and costs a fraction of a full-size bicubic resize.
    middle = (min(width, 8 * cells), min(height, 8 * cells))
    field = cv2.resize(coarse, middle, interpolation=cv2.INTER_CUBIC)
    if middle != (width, height):
        field = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
    return field


def _soft_inside(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """1 where ``signed_distance < 0``, 0 outside, with a linear ramp ``width`` wide: anti-aliased
    region edges instead of jagged pixel steps."""
    return np.clip(np.float32(0.5) - signed_distance / np.float32(width), 0.0, 1.0)


def _pixel_box(x: float, y: float, extent: float, size: int) -> tuple[slice, slice]:
    """Rows and columns within ``extent`` (normalised units) of the point (x, y): local
    structures are computed on this crop only, which keeps small ones cheap."""
    half = size / 2.0

    def span(centre: float) -> slice:
        low = int(np.floor((centre - extent + 1.0) * half))
        high = int(np.ceil((centre + extent + 1.0) * half)) + 1
        return slice(min(max(low, 0), size), max(min(high, size), 0))

    return span(y), span(x)


def _truncated_log_normal(rng: np.random.Generator, median: float, spread: float, low: float, high: float) -> float:
    """Log-normal draw redrawn until it falls in [low, high] (no pile-up at the limits)."""
    while True:
        value = median * float(np.exp(spread * rng.standard_normal()))
        if low <= value <= high:
            return value


# --------------------------------------------------------------------------------------------
# Head and brain
# --------------------------------------------------------------------------------------------


@dataclass
class _Head:
    """The head ellipse and the maps later steps need to place a tumour inside the brain."""

    cx: float
    cy: float
    a: float  # half-width (left-right), normalised units
    b: float  # half-length (front-back)
    cos: float
    sin: float
    u: np.ndarray  # head-frame coordinates (u across, v front to back)
    v: np.ndarray
    rho: np.ndarray  # elliptical radius: 1 on the outer scalp edge
    brain_edge: np.ndarray  # rho at which the brain ends (varies with skull thickness)
    pixel: float  # one pixel in rho units

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """Head-frame point -> image coordinates (inverse of the rotation used for u, v)."""
        return self.cx + self.cos * u - self.sin * v, self.cy + self.sin * u + self.cos * v

    def brain_radius(self, phi: float, margin: float = 0.0) -> float:
        """Distance from the head centre to the (thinnest-skull) brain edge in direction phi."""
        edge = float(self.brain_edge.min()) - margin
        return edge / float(np.hypot(np.cos(phi) / self.a, np.sin(phi) / self.b))


def _head_geometry(rng: np.random.Generator, size: int) -> _Head:
    """Random head ellipse (axes, rotation, centre jitter) and its skull thickness map."""
    x, y = _grid(size)
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    a = rng.uniform(0.64, 0.78)
    b = min(a * rng.uniform(1.1, 1.3), 0.93)  # axial heads are longer front-to-back
    angle = rng.uniform(-0.2, 0.2)
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    u = np.float32(cos) * dx + np.float32(sin) * dy
    v = np.float32(-sin) * dx + np.float32(cos) * dy
    rho = np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2)
    rho *= 1.0 + np.float32(0.01) * _smooth_noise(rng, rho.shape, 5)  # not a perfect ellipse
    scalp = rng.uniform(0.035, 0.06) * (1.0 + 0.3 * _smooth_noise(rng, rho.shape, 4))
    skull = rng.uniform(0.02, 0.04) * (1.0 + 0.3 * _smooth_noise(rng, rho.shape, 4))
    return _Head(
        cx=float(cx), cy=float(cy), a=float(a), b=float(b), cos=cos, sin=sin, u=u, v=v, rho=rho,
        brain_edge=1.0 - scalp - skull, pixel=2.0 / (size * a),
    )  # fmt: skip


def _render_head(rng: np.random.Generator, head: _Head, ventricles: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scalp ring, dark skull ring and brain tissue; returns (image, brain weight 0..1)."""
    scalp_inner = 1.0 - (1.0 - head.brain_edge) * rng.uniform(0.55, 0.7)  # fat outside, bone inside
    shape = head.rho.shape
    edge = 1.5 * head.pixel
    inside_head = _soft_inside(head.rho - 1.0, edge)
    inside_scalp = _soft_inside(head.rho - scalp_inner, edge)
    brain = _soft_inside(head.rho - head.brain_edge, edge)
    scalp_level = _SCALP * rng.uniform(0.9, 1.1) * (1.0 + 0.06 * _smooth_noise(rng, shape, 16))
    skull_level = rng.uniform(0.06, 0.22)  # cortical bone and CSF, with a little marrow signal
    image = (inside_head - inside_scalp) * scalp_level + (inside_scalp - brain) * skull_level
    image += brain * _brain_tissue(rng, head, ventricles)
    return image.astype(np.float32, copy=False), brain


def _brain_tissue(rng: np.random.Generator, head: _Head, ventricles: bool) -> np.ndarray:
    """Gray/white matter with gyri, sulci, multi-scale texture, optional ventricles and falx."""
    shape = head.rho.shape
    rho_brain = head.rho / head.brain_edge  # 1 at the brain surface
    gray = _GRAY * rng.uniform(0.9, 1.1)
    white = gray * rng.uniform(1.06, 1.2)
    # Sulci: thin CSF lines where a mid-frequency field crosses zero, in the outer brain. The
    # cortex is a gray ribbon along them; white matter fills the gyri and the deep interior.
    crossings = np.abs(_smooth_noise(rng, shape, int(rng.integers(14, 24))))
    outer = np.clip((rho_brain - 0.55) / 0.2, 0.0, 1.0)
    sulci = np.clip(1.0 - crossings / 0.15, 0.0, 1.0) ** 2 * outer
    deep = rng.uniform(0.6, 0.75) + 0.08 * _smooth_noise(rng, shape, 10) - rho_brain
    gyri = np.minimum((crossings - 0.5) / 0.3, (0.93 - rho_brain) / 0.05)
    wm = np.clip(np.maximum(deep / 0.1, gyri), 0.0, 1.0)
    tissue = gray + (white - gray) * wm
    tissue -= sulci * (tissue - _CSF) * rng.uniform(0.3, 0.6)
    texture = sum(amp * _smooth_noise(rng, shape, cells) for cells, amp in ((4, 0.05), (9, 0.035), (24, 0.025)))
    tissue = tissue * (1.0 + rng.uniform(0.5, 1.5) * texture)
    if rng.random() < 0.6:
        tissue = _add_falx(rng, head, tissue)
    if ventricles and rng.random() < 0.75:
        tissue = _add_ventricles(rng, head, tissue)
    return tissue


def _add_falx(rng: np.random.Generator, head: _Head, tissue: np.ndarray) -> np.ndarray:
    """Dark interhemispheric fissure along the midline, front and back of the centre."""
    width = rng.uniform(0.006, 0.014) + head.pixel * head.a * 0.5
    across = np.clip(1.0 - np.abs(head.u) / np.float32(width), 0.0, 1.0)
    front = np.clip((-head.v / head.b - rng.uniform(0.2, 0.35)) / 0.1, 0.0, 1.0)
    back = np.clip((head.v / head.b - rng.uniform(0.3, 0.45)) / 0.1, 0.0, 1.0)
    return tissue - across * (front + back) * (tissue - _CSF) * rng.uniform(0.4, 0.8)


def _add_ventricles(rng: np.random.Generator, head: _Head, tissue: np.ndarray) -> np.ndarray:
    """A mirrored pair of dark, slightly bent ellipses (lateral ventricles) near the centre,
    drawn on a crop around them only."""
    scale = head.a / 0.72
    half_width, half_length = rng.uniform(0.02, 0.045) * scale, rng.uniform(0.08, 0.2) * scale
    offset, front = half_width + rng.uniform(0.005, 0.04) * scale, rng.uniform(-0.15, 0.02) * head.b
    tilt, bend = rng.uniform(0.0, 0.25), rng.uniform(0.1, 0.5) * half_length
    level = _CSF * rng.uniform(0.8, 1.6)
    size = tissue.shape[0]
    rows, cols = _pixel_box(*head.to_image(0.0, front), offset + half_length + half_width + bend + 0.02, size)
    u, v = head.u[rows, cols], head.v[rows, cols] - np.float32(front)
    crop = tissue[rows, cols]  # a view: edited in place
    for side in (-1.0, 1.0):
        c, s = np.float32(np.cos(side * tilt)), np.float32(np.sin(side * tilt))
        du = u - np.float32(side * offset)
        along = (-s * du + c * v) / np.float32(half_length)
        across = (c * du + s * v - np.float32(side * bend) * along * along) / np.float32(half_width)
        weight = _soft_inside(np.sqrt(across * across + along * along) - 1.0, 0.3)
        crop += weight * (level - crop)
    return tissue


# --------------------------------------------------------------------------------------------
# Tumour
# --------------------------------------------------------------------------------------------


@dataclass
class _Tumour:
    kind: str
    x: float  # centre, image coordinates in [-1, 1]
    y: float
    radius: float  # radius of the circle of equal area
    aspect: float
    angle: float
    harmonics: list[tuple[int, float, float]]  # (order, amplitude, phase) of the outline


def _choose_tumour(rng: np.random.Generator, kind: str, head: _Head, size: int) -> _Tumour:
    """Size, outline and a location that keeps the tumour (mostly) inside the brain."""
    area = _truncated_log_normal(rng, _MEDIAN_AREA[kind], _AREA_SPREAD, MIN_AREA_FRACTION, MAX_AREA_FRACTION)
    brain_min_axis = min(head.a, head.b) * float(head.brain_edge.min())
    radius = float(np.sqrt(4.0 * area / np.pi))  # the image spans 2 x 2 units
    radius = float(np.clip(radius, 3.0 / size, 0.55 * brain_min_axis))  # >= 1.5 px, fits the brain
    irregular = rng.uniform(0.1, 0.35) if kind == "glioma" else rng.uniform(0.02, 0.1)
    harmonics = [(k, irregular * rng.uniform(0.3, 1.0) / (k - 1), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    aspect = rng.uniform(1.0, 1.7 if kind == "glioma" else 1.3)
    u, v = _tumour_centre(rng, kind, head, radius)
    x, y = head.to_image(u, v)
    return _Tumour(kind, x, y, radius, aspect, rng.uniform(0, np.pi), harmonics)


def _tumour_centre(rng: np.random.Generator, kind: str, head: _Head, radius: float) -> tuple[float, float]:
    """Centre in the head frame: gliomas anywhere, meningiomas against the skull or falx,
    pituitary tumours at the midline just in front of the centre (skull base)."""
    phi = rng.uniform(0, 2 * np.pi)
    if kind == "pituitary":
        return rng.normal(0.0, 0.02), -rng.uniform(0.0, 0.25) * head.b
    if kind == "meningioma" and rng.random() < 0.25:  # falx meningioma, beside the midline
        along = rng.uniform(-0.5, 0.5) * head.b * float(head.brain_edge.min())
        return np.sign(np.cos(phi)) * 0.7 * radius, along
    reach = head.brain_radius(phi, margin=2 * head.pixel)
    if kind == "meningioma":  # broad base on the inner skull: part of the disc gets clipped
        distance = max(reach - 0.6 * radius, 0.0)
    else:
        distance = np.sqrt(rng.random()) * max(reach - 1.1 * radius, 0.0)
    return distance * np.cos(phi), distance * np.sin(phi)


def _tumour_radius_map(rng: np.random.Generator, t: _Tumour, rows: slice, cols: slice, size: int) -> np.ndarray:
    """Normalised radius inside the crop: 1 on the irregular tumour outline, 0 at its centre."""
    x, y = _grid(size)
    dx, dy = x[:, cols] - np.float32(t.x), y[rows, :] - np.float32(t.y)
    c, s = np.float32(np.cos(t.angle)), np.float32(np.sin(t.angle))
    stretch = np.float32(np.sqrt(t.aspect))
    p = (c * dx + s * dy) / (np.float32(t.radius) * stretch)
    q = (-s * dx + c * dy) * stretch / np.float32(t.radius)
    theta = np.arctan2(q, p)
    outline = np.ones_like(theta)
    for order, amplitude, phase in t.harmonics:
        outline += np.float32(amplitude) * np.cos(np.float32(order) * theta + np.float32(phase))
    radius = np.sqrt(p * p + q * q) / outline
    if t.kind == "glioma":  # finer lobulation than the harmonics give
        radius *= 1.0 + np.float32(rng.uniform(0.0, 0.08)) * np.clip(_smooth_noise(rng, radius.shape, 6), -2.0, 2.0)
    return radius


def _tumour_intensity(rng: np.random.Generator, t: _Tumour, radius: np.ndarray, tissue_level: float) -> np.ndarray:
    """Signal inside the tumour: usually enhancing (brighter), sometimes barely or darker,
    gliomas often with a bright rim around a dark necrotic core."""
    roll = rng.random()
    ring_enhancing = t.kind == "glioma" and roll >= 0.2 and rng.random() < 0.5
    if roll < 0.1:
        contrast = rng.uniform(0.04, 0.12)  # faintly enhancing: the hard cases
    elif t.kind == "glioma" and roll < 0.2:
        contrast = -rng.uniform(0.18, 0.35)  # non-enhancing, hypointense
    elif ring_enhancing:
        contrast = rng.uniform(0.6, 1.2)  # the rim enhances strongly
    elif t.kind == "glioma":
        contrast = rng.uniform(0.2, 1.0)
    else:
        contrast = rng.uniform(0.4, 1.2)  # meningioma / pituitary: strong, homogeneous
    level = tissue_level * (1.0 + contrast)
    heterogeneity = rng.uniform(0.03, 0.12)
    signal = level * (1.0 + heterogeneity * _smooth_noise(rng, radius.shape, 5))
    if ring_enhancing:  # necrotic core: its outline follows the tumour's irregular one
        core_radius = rng.uniform(0.45, 0.8)
        core = tissue_level * rng.uniform(0.4, 0.8)
        rim = np.clip((radius - core_radius) / 0.12, 0.0, 1.0)
        signal = core + (signal - core) * rim
    return signal.astype(np.float32)


def _add_tumour(rng: np.random.Generator, kind: str, image: np.ndarray, head: _Head, brain: np.ndarray) -> np.ndarray:
    """Draw one tumour (and maybe oedema) into ``image`` in place; return its uint8 mask."""
    size = image.shape[0]
    t = _choose_tumour(rng, kind, head, size)
    oedema = rng.random() < (0.55 if t.kind == "glioma" else 0.15)
    halo = rng.uniform(1.3, 2.0) if oedema else 1.0
    edge_sigma = rng.uniform(0.5, 1.5) * max(size / 256.0, 1.0)  # soft edge, in pixels
    # The crop must hold the outline (stretched by up to 1.2 by the lobulation noise) and the
    # oedema halo (up to 1.3 x halo), or they would end in a straight line at its border.
    outline = t.radius * np.sqrt(t.aspect) * (1.0 + sum(abs(h[1]) for h in t.harmonics))
    reach = outline * ((halo + 0.2) * 1.55 if oedema else 1.25)
    rows, cols = _pixel_box(t.x, t.y, reach + (3 * edge_sigma + 2) * 2.0 / size, size)
    radius = _tumour_radius_map(rng, t, rows, cols, size)

    inside_brain = head.rho[rows, cols] < head.brain_edge[rows, cols] - np.float32(head.pixel)
    shape = (radius <= 1.0) & inside_brain
    if not shape.any():  # a tumour smaller than a pixel: keep the pixel nearest its centre
        r, c = np.unravel_index(np.argmin(np.where(inside_brain, radius, np.inf)), radius.shape)
        shape[r, c] = True

    crop = image[rows, cols]
    brain_crop = brain[rows, cols]
    if oedema:  # slightly hypointense on T1, not part of the mask
        swelling = radius / (1.0 + 0.15 * np.clip(_smooth_noise(rng, radius.shape, 4), -2.0, 2.0))
        crop *= 1.0 - rng.uniform(0.08, 0.2) * brain_crop * _soft_inside(swelling - halo, 0.35)
    tissue_level = float(np.median(crop[brain_crop > 0.5])) if (brain_crop > 0.5).any() else _GRAY
    signal = _tumour_intensity(rng, t, radius, tissue_level)
    alpha = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), edge_sigma)
    crop += alpha * (signal - crop)  # image[rows, cols] is a view: this edits the image

    mask = np.zeros(image.shape, np.uint8)
    mask[rows, cols][shape] = 255
    return mask


# --------------------------------------------------------------------------------------------
# Scanner effects and the public API
# --------------------------------------------------------------------------------------------


def _scanner_effects(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Bias field (smooth multiplicative gradient), a touch of blur, Rician noise."""
    size = image.shape[0]
    x, y = _grid(size)
    direction = rng.uniform(0, 2 * np.pi)
    gradient = np.float32(np.cos(direction)) * x + np.float32(np.sin(direction)) * y
    bias = 1.0 + rng.uniform(0.05, 0.2) * gradient + rng.uniform(0.02, 0.08) * _smooth_noise(rng, image.shape, 3)
    image = image * bias
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    sigma = np.float32(rng.uniform(0.008, 0.028))
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def _to_uint8(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Scale so the brain's median lands at a random mid-gray: the scalp and enhancing tumours
    then reach the top of the range (a few clip, as in windowed scans). Anchoring on the
    brain, not the thin bright scalp, keeps the brightness the same at every image size."""
    step = 2 if image.shape[0] >= 128 else 1
    reference = float(np.median(image[::step, ::step][brain[::step, ::step] > 0.5]))
    scaled = image * np.float32(rng.uniform(75, 110) / max(reference, 1e-6))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def make_phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, mask)``: a uint8 ``size x size`` MRI-like slice and its uint8 {0, 255}
    tumour mask (never empty, always inside the brain)."""
    size = int(size)
    if size < MIN_SIZE:
        raise ValueError(f"phantom size must be at least {MIN_SIZE} pixels, got {size}")
    kind = str(rng.choice(_KINDS, p=_KIND_PROBABILITIES))
    head = _head_geometry(rng, size)
    # Pituitary tumours show at the skull base, below the lateral ventricles.
    image, brain = _render_head(rng, head, ventricles=kind != "pituitary")
    mask = _add_tumour(rng, kind, image, head, brain)
    image = _scanner_effects(rng, image)
    return _to_uint8(rng, image, brain), mask


def phantom_for_index(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom number ``index`` of the dataset seeded by ``seed``: depends on nothing else, so
    datasets can be generated in any order, in pieces, or in parallel."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return make_phantom(rng, size)


def write_synthetic_dataset(out_dir: str | os.PathLike, count: int, size: int, seed: int, progress: bool = True) -> list[str]:
    """Write ``out_dir/images/NNNNN.png`` and ``out_dir/masks/NNNNN.png`` (1-based, identical
    names) and return the names. Phantom ``i`` is ``phantom_for_index(seed, i, size)``. Every
    PNG is written atomically (temp file + ``os.replace``), so an interrupted run never leaves a
    truncated image that a later stage would trip over."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out_dir = Path(out_dir)
    images, masks = out_dir / "images", out_dir / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    names = []
    for index in tqdm(range(1, count + 1), desc="synthetic phantoms", unit="img", disable=not progress):
        image, mask = phantom_for_index(seed, index, size)
        name = f"{index:05d}.png"
        atomic_write_bytes(images / name, encode_png(image))
        atomic_write_bytes(masks / name, encode_png(mask))
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Multi-sequence phantoms (one head seen by several MRI sequences)
# --------------------------------------------------------------------------------------------

SLICES_PER_CASE = 8  # a case's slices: tumour-free at both ends, as in a scan's block around a tumour
MISSING_EVERY = 5  # every 5th case lacks its last sequence, as real sets do


def _sequence_view(style: int, plain: np.ndarray, enhanced: np.ndarray, tumour: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """One sequence's contrast of the same head: 0 = contrast-enhanced T1 (the tumour as drawn),
    1 = FLAIR-like (fluid dark, the tumour and its rim bright), 2 = pre-contrast T1 (the tumour
    darker than brain). Each shows the tumour alone, with its own contrast."""
    if style == 0:
        return enhanced
    halo = cv2.GaussianBlur(tumour, (0, 0), max(1.0, plain.shape[0] / 96))
    if style == 1:
        fluid_dark = plain * (0.55 + 0.45 * np.clip(plain / max(float(plain.max()), 1e-6) * 2.0, 0.0, 1.0))
        return fluid_dark + brain * (0.55 * tumour + 0.2 * halo)
    return plain * (1.0 - 0.4 * tumour * brain)


_STYLE_BY_NAME = {"t1ce": 0, "t1c": 0, "t1gd": 0, "flair": 1, "t2": 1, "t1": 2}


def sequence_styles(sequences: tuple[str, ...]) -> list[int]:
    """The contrast each named sequence gets (:func:`_sequence_view`); unknown names take turns."""
    return [_STYLE_BY_NAME.get(name, index % 3) for index, name in enumerate(sequences)]


def make_sequence_phantom(rng: np.random.Generator, size: int, styles: list[int], tumour: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """One uint8 view per style of one phantom head, and its {0, 255} mask (empty when ``tumour`` is False)."""
    size = int(size)
    if size < MIN_SIZE:
        raise ValueError(f"phantom size must be at least {MIN_SIZE} pixels, got {size}")
    kind = str(rng.choice(_KINDS, p=_KIND_PROBABILITIES))
    head = _head_geometry(rng, size)
    plain, brain = _render_head(rng, head, ventricles=kind != "pituitary")
    enhanced = plain.copy()
    mask = _add_tumour(rng, kind, enhanced, head, brain) if tumour else np.zeros(plain.shape, np.uint8)
    soft = cv2.GaussianBlur((mask > 0).astype(np.float32), (0, 0), 0.8)
    views = []
    for style in styles:
        view = _sequence_view(style, plain, enhanced, soft, brain).astype(np.float32)
        views.append(_to_uint8(rng, _scanner_effects(rng, view), brain))
    return views, mask


def write_sequence_dataset(
    out_dir: str | os.PathLike, count: int, size: int, seed: int, sequences: tuple[str, ...], progress: bool = True
) -> list[str]:
    """Write ``out_dir/<sequence>/caseCCC_SS.png`` and ``out_dir/masks/caseCCC_SS.png``: cases of
    :data:`SLICES_PER_CASE` slices whose first and last slice hold no tumour; every
    :data:`MISSING_EVERY`-th case has no file for the last sequence (when there are several). The
    layout of ``../shared/data/lgg-256``; slice ``i`` depends only on (``seed``, ``i``)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out_dir = Path(out_dir)
    styles = sequence_styles(tuple(sequences))
    names = []
    for index in tqdm(range(count), desc="synthetic sequence phantoms", unit="slice", disable=not progress):
        case, position = divmod(index, SLICES_PER_CASE)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, len(sequences)]))
        tumour = 0 < position < SLICES_PER_CASE - 1
        views, mask = make_sequence_phantom(rng, size, styles, tumour)
        name = f"case{case + 1:03d}_{position + 1:02d}.png"
        missing = sequences[-1] if len(sequences) > 1 and (case + 1) % MISSING_EVERY == 0 else None
        for sequence, view in zip(sequences, views):
            if sequence != missing:
                atomic_write_bytes(out_dir / sequence / name, encode_png(view))
        atomic_write_bytes(out_dir / "masks" / name, encode_png(mask))
        names.append(name)
    return names


# The voxel axes of a written phantom volume: rows run posterior, columns to the patient's left,
# slices superior (3 mm apart), so the volume's axial slices are the phantom images as drawn.
PHANTOM_AFFINE = np.array([[0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def write_sequence_volumes(
    out_dir: str | os.PathLike, count: int, size: int, seed: int, sequences: tuple[str, ...], progress: bool = True
) -> list[str]:
    """Write the slices of :func:`write_sequence_dataset` as NIfTI volumes, BraTS-named:
    ``out_dir/caseCCC_<sequence>.nii.gz`` and ``out_dir/caseCCC_seg.nii.gz`` (labels 0/1), one
    volume of :data:`SLICES_PER_CASE` slices per case; a sequence a case lacks has no volume."""
    import tempfile

    import nibabel as nib

    from tumorseg.volumes import nifti_bytes

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        names = write_sequence_dataset(scratch, count, size, seed, sequences, progress=progress)
        cases = sorted({name.rsplit("_", 1)[0] for name in names})
        for case in cases:
            slices = sorted(name for name in names if name.startswith(f"{case}_"))
            for tag, folder in [(sequence, sequence) for sequence in sequences] + [("seg", "masks")]:
                files = [Path(scratch) / folder / name for name in slices]
                if not all(file.is_file() for file in files):
                    continue  # the case lacks this sequence
                planes = [cv2.imread(str(file), cv2.IMREAD_GRAYSCALE) for file in files]
                volume = np.stack(planes, axis=2)
                if tag == "seg":
                    volume = (volume > 0).astype(np.uint8)
                image = nib.Nifti1Image(volume, PHANTOM_AFFINE)
                image.header.set_xyzt_units("mm")
                atomic_write_bytes(out_dir / f"{case}_{tag}.nii.gz", nifti_bytes(image, gzipped=True))
    return cases

