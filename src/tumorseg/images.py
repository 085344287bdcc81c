"""The one gate for untrusted image bytes: every command and the web app read images through it.

Width, height, channels and bit depth come from the header (Pillow opens lazily: no pixels are
decoded) and are checked *before* OpenCV decodes anything: a 1 KB run-length-encoded BMP that
declares 20000x20000, or a small PNG of 16-bit RGBA zeros, is refused with a reason instead of
taking gigabytes. Three budgets apply: pixels, file bytes, and the memory that decoding and the
gray conversion take (:attr:`ImageHeader.peak_bytes`, at most :data:`MAX_DECODE_BYTES`). After
decoding, an array that does not match its header (dimensions or size) is refused too.

Ground floor: imported by prepare's worker processes, so no TensorFlow and nothing heavy here.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tumorseg.errors import EMPTY, TOO_LARGE, UNREADABLE, InputImageError  # noqa: F401 - raised here, defined with the other user errors

# Pillow's format name -> the format we report. MPO is a JPEG with extra frames; DIB is a BMP body.
SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "DIB": "BMP", "TIFF": "TIFF"}
_PILLOW_OPENERS = ("PNG", "JPEG", "BMP", "DIB", "TIFF")  # MPO files open through JPEG's opener
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".dib", ".tif", ".tiff"})  # picked up from folders and zips
FORMATS_HINT = "use PNG, JPEG, BMP or TIFF"

DEFAULT_MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 512 * 2**20  # larger files are refused before reading
# Memory one decode may take (ImageHeader.peak_bytes). Holds every 8-bit image up to prepare's 64
# megapixels, 16-bit gray too; 16-bit colour up to ~33 (RGBA) to ~44 (RGB) megapixels.
MAX_DECODE_BYTES = 512 * 2**20
# cv2.imdecode decodes into its own buffer and copies that into the array it returns: its peak is
# twice the array plus ~5.5 MiB (measured: PNG, TIFF, BMP, JPEG; 8/16-bit; gray to RGBA; both flags).
_DECODER_OVERHEAD_BYTES = 8 * 2**20

# Why an input was refused (prepare maps these to its report.json skip reasons).

_STRETCH_STRIP_VALUES = 1 << 20  # 16-bit/float images are stretched in strips of this many values
_GRAY_MODES = {"1", "L", "I", "F"}  # plus every "I;16..." mode
_COLOUR_MODES = {"RGB", "YCbCr", "LAB", "HSV"}


@dataclass(frozen=True)
class ImageHeader:
    """What the header promises: enough to know the cost of decoding before paying it."""

    format: str
    width: int
    height: int
    channels: int  # upper bound of what OpenCV returns (palette and transparency expand to 4)
    sample_bytes: int  # bytes per channel value: 1 (8-bit), 2 (16-bit), 4 (32-bit int/float), 8

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """The array OpenCV returns."""
        return self.pixels * self.channels * self.sample_bytes

    @property
    def peak_bytes(self) -> int:
        """Upper bound of the memory decoding takes: OpenCV's decode (twice the array), then the
        array + what :func:`to_gray_uint8` allocates beside it (the gray plane, the 8-bit result
        of a 16-bit/float plane, float64 strips of the stretch)."""
        decoding = 2 * self.decoded_bytes + _DECODER_OVERHEAD_BYTES
        gray = self.pixels * self.sample_bytes if self.channels > 1 else 0
        stretch = self.pixels + 16 * _STRETCH_STRIP_VALUES if self.sample_bytes > 1 else 0
        return max(decoding, self.decoded_bytes + gray + stretch)

    def describe(self) -> str:
        return f"{self.width}x{self.height}, {self.channels} channel(s) of {8 * self.sample_bytes} bit"


def _mib(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB"


def _sample_bytes(handle) -> int:
    """Bytes per channel value from the mode, the raw mode of the pixel data (``RGBA;16B``: Pillow
    opens 16-bit colour PNGs as 8-bit ``RGBA``) and TIFF's BitsPerSample."""
    bits = [8, getattr(handle, "bits", 8) or 8]
    if handle.mode.startswith("I;16"):
        bits.append(16)
    elif handle.mode in ("I", "F"):
        bits.append(32)
    for tile in handle.tile:
        rawmode = tile.args if isinstance(tile.args, str) else (tile.args[0] if tile.args and isinstance(tile.args[0], str) else "")
        bits += [int(number) for number in re.findall(r";(\d+)", rawmode)]
    tags = getattr(handle, "tag_v2", None)
    if tags is not None:
        declared = tags.get(258, ())  # BitsPerSample
        bits += list(declared) if isinstance(declared, tuple) else [declared]
    return min(8, -(-max(int(b) for b in bits) // 8))


def _decoded_channels(handle) -> int:
    if "transparency" in handle.info:
        return 4  # OpenCV adds an alpha plane for a tRNS chunk
    if handle.mode in _GRAY_MODES or handle.mode.startswith("I;16"):
        return 1
    return 3 if handle.mode in _COLOUR_MODES else 4  # palette, LA, RGBA, CMYK...: at most 4


def _unsupported(data: bytes, name: str) -> InputImageError:
    """Name the format of a file we do not accept (or say it is not an image at all)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as handle:
                found = handle.format
    except Exception:  # any parser failure on untrusted bytes means: not an image we know
        found = None
    if found:
        return InputImageError(f"{name}: unsupported image format {found} ({FORMATS_HINT})")
    return InputImageError(f"{name}: not an image (unrecognised file format, or a variant the header reader lacks such as colour float TIFF; {FORMATS_HINT})")


def list_image_files(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (by extension, :data:`IMAGE_SUFFIXES`), sorted; hidden files
    and folders (``.x``) and macOS ``__MACOSX`` debris are skipped. The one listing rule of
    download, prepare, predict and the export check."""
    root = Path(folder)
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p
        for p in candidates
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)
    )


def read_header(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_bytes: int = MAX_DECODE_BYTES) -> ImageHeader:
    """Check ``data``'s header against the budgets without decoding a pixel; raise InputImageError."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputImageError(f"{name}: empty file (0 bytes)", EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd metadata; a refusal is an exception, not a warning
            # Only our formats' parsers see the bytes: no exotic plugin guesses at random data.
            with Image.open(io.BytesIO(data), formats=_PILLOW_OPENERS) as handle:
                header = ImageHeader(SUPPORTED_FORMATS[handle.format], *handle.size, _decoded_channels(handle), _sample_bytes(handle))
    except Image.DecompressionBombError as exc:  # beyond Pillow's own hard limit (~179 megapixels)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise InputImageError(f"{name}: image dimensions are too large ({size}; the limit is {max_pixels:,})", TOO_LARGE) from None
    except UnidentifiedImageError:
        raise _unsupported(data, name) from None
    except Exception as exc:  # a malformed header can raise anything from a parser: it is corrupt
        raise InputImageError(f"{name}: corrupt image header ({type(exc).__name__}: {str(exc)[:200]})") from None
    if header.width <= 0 or header.height <= 0:
        raise InputImageError(f"{name}: image has no pixels ({header.width}x{header.height})")
    if header.pixels > max_pixels:
        raise InputImageError(
            f"{name}: image dimensions are too large ({header.width}x{header.height} = {header.pixels:,} pixels; the limit is {max_pixels:,})",
            TOO_LARGE,
        )
    if header.peak_bytes > max_decode_bytes:
        raise InputImageError(
            f"{name}: image is too large to decode ({header.describe()} need {_mib(header.peak_bytes)}; the limit is {_mib(max_decode_bytes)})",
            TOO_LARGE,
        )
    return header


def decode_array(
    data: bytes,
    name: str = "upload",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    apply_orientation: bool = True,
) -> np.ndarray:
    """Decode untrusted bytes to OpenCV's array (gray/BGR/BGRA, 8/16-bit/float), after the header
    passed :func:`read_header`. ``apply_orientation``: turn JPEGs by their EXIF orientation (prepare
    keeps the stored orientation, as masks are stored the same way)."""
    header = read_header(data, name, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
    # ANYDEPTH keeps 16-bit; ANYCOLOR keeps gray as gray and applies EXIF orientation; UNCHANGED does not turn.
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR if apply_orientation else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise InputImageError(f"{name}: corrupt {header.format} image ({str(exc).strip().splitlines()[-1][:200]})") from None
    if image is None or image.size == 0:
        raise InputImageError(
            f"{name}: corrupt or truncated {header.format} image (the header says {header.width}x{header.height} but the pixels cannot be decoded)"
        )
    if image.shape[:2] not in ((header.height, header.width), (header.width, header.height)) or image.nbytes > header.decoded_bytes:
        shape = "x".join(str(side) for side in (image.shape[1], image.shape[0], *image.shape[2:]))
        raise InputImageError(f"{name}: header and pixel data disagree (header: {header.describe()}; decoded: {shape} {image.dtype})")
    return image


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """Any decoded image (gray/BGR/BGRA, 8/16-bit/float) -> 8-bit single channel.

    16-bit and float images are stretched min..max to 0..255 (MRI intensities have no fixed scale;
    the models were trained on 8-bit slices that use the full range). The stretch runs in float64
    strips: the same bytes as one float64 copy of the whole image, without that copy.
    """
    if image.ndim == 3:
        if image.shape[2] == 4 and image.dtype != np.float32:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)  # = BGR2GRAY of the colour planes, without copying them
        elif image.shape[2] >= 3:
            image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
        else:
            image = image[:, :, 0]
    if image.dtype == np.uint8:
        return image
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    scale = 255.0 / (high - low)
    gray = np.empty(image.shape, np.uint8)
    rows = max(1, _STRETCH_STRIP_VALUES // max(1, image.shape[1]))
    for start in range(0, image.shape[0], rows):
        gray[start : start + rows] = np.round((image[start : start + rows].astype(np.float64) - low) * scale)
    return gray


def decode_image(data: bytes, name: str = "upload", *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_bytes: int = MAX_DECODE_BYTES) -> np.ndarray:
    """Decode untrusted bytes to a uint8 ``(H, W)`` grayscale image.

    Accepts PNG, JPEG, BMP and TIFF, 8 or 16 bit, gray, RGB or RGBA (JPEG EXIF orientation is
    applied). Raises :class:`InputImageError` naming ``name`` and the reason: empty, not an image,
    unsupported format, too large (checked from the header before decoding), corrupt, truncated,
    or pixels that disagree with the header.
    """
    return to_gray_uint8(decode_array(data, name, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes))


def read_file_bytes(path: str | Path, name: str | None = None, *, max_file_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes, refusing (InputImageError) a folder, an unreadable file or one over the limit
    before reading it. ``name`` is how messages call the file (default: its path)."""
    path = Path(path)
    name = str(path) if name is None else name
    try:
        size = path.stat().st_size
        if path.is_file() and size > max_file_bytes:
            raise InputImageError(f"{name}: file is too large ({_mib(size)}; the limit is {_mib(max_file_bytes)})", TOO_LARGE)
        return path.read_bytes()
    except IsADirectoryError:
        raise InputImageError(f"{name}: is a folder, not an image file") from None
    except OSError as exc:
        raise InputImageError(f"{name}: cannot read the file ({exc.strerror or exc})") from None


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_bytes: int = MAX_DECODE_BYTES) -> np.ndarray:
    """:func:`decode_image` on a file's bytes; a missing or unreadable file is an InputImageError too."""
    return decode_image(read_file_bytes(path), str(path), max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
