"""Issue 20, trustworthy outputs: one decode gate for untrusted images, and a web app whose memory
is bounded by its worker pool.

The worst inputs are built by hand in a few KB: a run-length-encoded BMP, PNG, TIFF and JPEG
headers that declare huge dimensions, and a PNG of 16-bit RGBA zeros that is small on disk but
large decoded. Each is refused from its header (``cv2.imdecode`` is never called on it) or decoded
within the gate's stated memory bound, in the gate itself, in prepare, in predict and in the web app.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from helpers import PROJECT_ROOT, blob_pair, write_pair
from tumorseg import images

# The hand-made worst inputs are the benchmark's (benchmarks/decode_peak_rss.py measures their cost).
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from decode_peak_rss import jpeg_declaring, png_of_zeros, rle_bmp, tiff_header  # noqa: E402

BOMB_BMP = rle_bmp(20_000, 20_000)
RGBA16_OVER_BUDGET = png_of_zeros(6300, 6300)  # 39.7 MP: under every pixel limit, 635 MB to decode, 317 KB on disk
HUGE_HEADERS = {
    "bomb.bmp": BOMB_BMP,
    "huge.png": png_of_zeros(60_000, 60_000, bit_depth=8, colour_type=0, rows=10),
    "huge.tif": tiff_header(100_000, 100_000),  # beyond Pillow's own hard limit
    "big.tif": tiff_header(9_000, 9_000),  # 81 MP: beyond ours only
    "huge.jpg": jpeg_declaring(60_000, 60_000),
    "big.jpg": jpeg_declaring(9_000, 9_000),
}


@pytest.fixture
def imdecode_spy(monkeypatch):
    """Records the size of every buffer OpenCV decodes; decoding one in ``refuse`` fails the test."""
    real, decoded, refuse = cv2.imdecode, [], set()

    def spy(buffer, flags):
        size = len(np.asarray(buffer).ravel())
        if size in refuse:
            raise AssertionError(f"cv2.imdecode was called on a {size}-byte input that the header should have refused")
        decoded.append(size)
        return real(buffer, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return SimpleNamespace(decoded=decoded, refuse=refuse)


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


def test_one_definition_of_image_suffixes_listing_and_gray_conversion():
    import re

    from tumorseg import inference
    from tumorseg.data import prepare

    assert inference.IMAGE_SUFFIXES is images.IMAGE_SUFFIXES
    package = PROJECT_ROOT / "src" / "tumorseg"
    for path in package.rglob("*.py"):
        if path.name != "images.py":
            text = path.read_text()
            suffix_list = re.search(r'"\.(?:png|jpe?g|bmp|tiff?)"\s*,\s*"\.(?:png|jpe?g|bmp|tiff?)"', text)
            assert not suffix_list, f"{path}: an image suffix list of its own (use tumorseg.images.IMAGE_SUFFIXES)"
            assert "COLOR_BGR2GRAY" not in text and "COLOR_RGB2GRAY" not in text, f"{path}: a gray conversion of its own (use tumorseg.images.to_gray_uint8)"
            assert "in IMAGE_SUFFIXES" not in text or path.name == "batch.py", f"{path}: an image listing of its own (use tumorseg.images.list_image_files)"
    assert prepare.to_gray_uint8 is images.to_gray_uint8 and inference.to_gray_uint8 is images.to_gray_uint8
    assert inference.InputImageError is images.InputImageError and inference.decode_image is images.decode_image


def test_the_handmade_bmp_is_a_real_rle_bmp():
    """The bomb is refused for its size, not for being malformed: a small one decodes."""
    small = rle_bmp(64, 48)
    assert len(BOMB_BMP) < 1100
    assert images.read_header(small, "small.bmp").format == "BMP"
    assert images.decode_image(small, "small.bmp").shape == (48, 64)


@pytest.mark.parametrize("name", sorted(HUGE_HEADERS))
def test_huge_declared_dimensions_are_refused_before_decoding(name, imdecode_spy):
    data = HUGE_HEADERS[name]
    imdecode_spy.refuse.add(len(data))
    with pytest.raises(images.InputImageError, match="too large") as caught:
        images.decode_image(data, name)
    assert caught.value.kind == images.TOO_LARGE
    message = str(caught.value)
    assert message.startswith(f"{name}: ") and "\n" not in message


def test_16_bit_rgba_over_the_memory_budget_is_refused_before_decoding(imdecode_spy):
    imdecode_spy.refuse.add(len(RGBA16_OVER_BUDGET))
    header = images.read_header(RGBA16_OVER_BUDGET, "x", max_decode_bytes=2**40)
    assert (header.width, header.height, header.channels, header.sample_bytes) == (6300, 6300, 4, 2)  # 16 bit from the header
    assert header.pixels < images.DEFAULT_MAX_PIXELS and header.peak_bytes > images.MAX_DECODE_BYTES
    assert len(RGBA16_OVER_BUDGET) < 400_000
    with pytest.raises(images.InputImageError, match="too large to decode.*6300x6300, 4 channel.*16 bit") as caught:
        images.decode_image(RGBA16_OVER_BUDGET, "rgba16.png")
    assert caught.value.kind == images.TOO_LARGE


PEAK_OF_DECODE = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from decode_peak_rss import png_of_zeros
import PIL.Image
from tumorseg import images
data = png_of_zeros(3000, 3000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gray = images.decode_image(data, "rgba16.png")
assert gray.shape == (3000, 3000) and gray.dtype.name == "uint8"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, images.read_header(data, "rgba16.png").peak_bytes)
"""


def test_16_bit_rgba_under_the_budget_decodes_within_the_stated_bound():
    """The peak resident memory of a decode (fresh process) stays under ``peak_bytes``: OpenCV's
    decode at twice the array, then the gray conversion without the former float64 copy of the
    whole image (and of its colour planes), which took the old code past the bound."""
    result = subprocess.run([sys.executable, "-c", PEAK_OF_DECODE, str(PROJECT_ROOT / "benchmarks")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, bound = (int(value) for value in result.stdout.split())
    assert bound <= 2 * 3000 * 3000 * 8 + 8 * 2**20  # twice the decoded RGBA16 array + the decoder's few MiB
    assert peak <= bound, f"decoding took {peak / 2**20:.0f} MiB, the gate promises at most {bound / 2**20:.0f} MiB"


def test_header_and_data_that_disagree_are_refused(monkeypatch):
    data = cv2.imencode(".png", np.zeros((20, 30), np.uint8))[1].tobytes()
    monkeypatch.setattr(cv2, "imdecode", lambda buffer, flags: np.zeros((2000, 3000), np.uint8))
    with pytest.raises(images.InputImageError, match="header and pixel data disagree"):
        images.decode_image(data, "liar.png")


def test_gray_conversion_gives_the_same_bytes_as_before():
    """Same bytes as the former whole-image float64 stretch (prepare's outputs stay identical);
    alpha is dropped without copying the colour planes; several strips are stitched exactly."""

    def former(image: np.ndarray) -> np.ndarray:
        if image.ndim == 3:
            image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY) if image.shape[2] >= 3 else image[:, :, 0]
        if image.dtype == np.uint8:
            return image
        image = image.astype(np.float64)
        low, high = float(image.min()), float(image.max())
        return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)

    rng = np.random.default_rng(7)
    for shape, dtype in [((1200, 1000, 4), np.uint16), ((37, 53, 4), np.uint8), ((900, 1300), np.uint16), ((31, 17, 3), np.uint16), ((64, 48), np.float32)]:
        image = (rng.random(shape) * 60_000).astype(dtype) if dtype is np.float32 else rng.integers(0, np.iinfo(dtype).max, shape).astype(dtype)
        np.testing.assert_array_equal(images.to_gray_uint8(image), former(image), err_msg=str((shape, dtype)))


# --------------------------------------------------------------------------------------------
# prepare and predict use the gate
# --------------------------------------------------------------------------------------------


def test_prepare_skips_the_rle_bmp_bomb_as_too_large_without_decoding_it(tmp_path: Path, imdecode_spy):
    from tumorseg.data.prepare import prepare_dataset

    root = tmp_path / "pairs"
    for index in range(1, 5):
        write_pair(root, f"{index}.png", *blob_pair(64, index))
    (root / "images" / "bomb.bmp").write_bytes(BOMB_BMP)
    cv2.imwrite(str(root / "masks" / "bomb.png"), blob_pair(64, 9)[1])
    (root / "images" / "rgba16.png").write_bytes(RGBA16_OVER_BUDGET)
    cv2.imwrite(str(root / "masks" / "rgba16.png"), blob_pair(64, 10)[1])
    imdecode_spy.refuse |= {len(BOMB_BMP), len(RGBA16_OVER_BUDGET)}

    out = tmp_path / "out"
    report = prepare_dataset(root / "images", root / "masks", out, size=32, workers=1, progress=False, val_fraction=0.25, test_fraction=0.25, group_by="none")
    assert report.valid_pairs == 4
    stored = json.loads((out / "report.json").read_text())
    assert stored["skipped_by_reason"] == {"too_large": 2}
    skipped = {item["file"]: item for item in stored["skipped"]}
    assert set(skipped) == {"bomb.bmp", "rgba16.png"}
    assert "bomb.bmp" in skipped["bomb.bmp"]["detail"] and "400,000,000 pixels" in skipped["bomb.bmp"]["detail"]
    assert "16 bit" in skipped["rgba16.png"]["detail"]


class _ZeroModel:
    """Stands in for a Keras model: 32x32 input, probability 0 everywhere."""

    input_shape = (None, 32, 32, 1)
    name = "zero"

    def predict_on_batch(self, batch):
        return np.zeros(batch.shape, np.float32)


def _bombs_beside_a_good_slice(inputs: Path, size: int, imdecode_spy) -> Path:
    """A folder with both bombs and one good ``size``² slice; the spy fails the test if a bomb is decoded."""
    inputs.mkdir()
    (inputs / "bomb.bmp").write_bytes(BOMB_BMP)
    (inputs / "rgba16.png").write_bytes(RGBA16_OVER_BUDGET)
    cv2.imwrite(str(inputs / "good.png"), blob_pair(size, 1)[0])
    imdecode_spy.refuse |= {len(BOMB_BMP), len(RGBA16_OVER_BUDGET)}
    return inputs


def test_predict_refuses_the_bombs_before_decoding_and_keeps_going(tmp_path: Path, imdecode_spy):
    from tumorseg.inference import Predictor, predict_files

    inputs = _bombs_beside_a_good_slice(tmp_path / "in", 40, imdecode_spy)

    report = predict_files(Predictor(_ZeroModel()), [inputs], tmp_path / "out", progress=False)
    rows = {Path(row["file"]).name: row for row in report.rows}
    assert rows["good.png"]["status"] == "ok"
    for name in ("bomb.bmp", "rgba16.png"):
        assert rows[name]["status"] == "failed" and "too large" in rows[name]["reason"], rows[name]


def test_explain_reads_through_the_same_gate(tmp_path: Path, blob_model, imdecode_spy):
    from tumorseg.explain import explain_files
    from tumorseg.inference import Predictor

    inputs = _bombs_beside_a_good_slice(tmp_path / "in", 32, imdecode_spy)

    report = explain_files([inputs], Predictor(blob_model[0]), tmp_path / "out")
    assert [path.name for path in report.written] == ["good_gradcam.png"]
    reasons = {Path(name).name: reason for name, reason in report.skipped}
    assert set(reasons) == {"bomb.bmp", "rgba16.png"} and all("too large" in reason for reason in reasons.values())


# --------------------------------------------------------------------------------------------
# The web app
# --------------------------------------------------------------------------------------------


class BlockingPredictor:
    """A predictor (no Keras model, so no Grad-CAM) whose predictions wait until ``release`` is set:
    the test decides when the worker is busy, without timing races."""

    model = None
    input_size = 32
    threshold = 0.5
    tta = False
    name = "blocking"

    def __init__(self) -> None:
        self.entered, self.release, self.warmed_up = threading.Event(), threading.Event(), False

    def predict(self, batch):
        from tumorseg.inference import summarise

        if self.warmed_up:  # the first call is create_app's warm-up
            self.entered.set()
            assert self.release.wait(30), "the test never released the worker"
        self.warmed_up = True
        return [summarise(np.zeros(image.shape, np.float32), self.threshold) for image in batch]


PNG_UPLOAD = cv2.imencode(".png", blob_pair(32, 1)[0])[1].tobytes()


def _upload(client, name: str = "a.png", data: bytes = PNG_UPLOAD):
    return client.post("/predict?gradcam=false", files={"file": (name, data, "image/png")})


def _wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_full_queue_is_answered_503_with_retry_after(monkeypatch):
    from fastapi.testclient import TestClient

    from tumorseg import serve

    threads_that_decoded = []
    real_decode = serve.decode_image
    monkeypatch.setattr(serve, "decode_image", lambda *a, **k: threads_that_decoded.append(threading.current_thread().name) or real_decode(*a, **k))
    predictor = BlockingPredictor()
    app = serve.create_app(predictor, workers=1, queue_limit=1, retry_after_s=7)
    pool = app.state.pool
    with TestClient(app, raise_server_exceptions=False) as client:
        answers: dict[str, int] = {}
        running = threading.Thread(target=lambda: answers.__setitem__("running", _upload(client).status_code))
        waiting = threading.Thread(target=lambda: answers.__setitem__("waiting", _upload(client).status_code))
        try:
            running.start()
            assert predictor.entered.wait(20), "the first upload never reached the worker"
            waiting.start()
            _wait_until(lambda: pool.admitted == 2, "the second upload is queued")

            busy = _upload(client)
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "7"
            assert busy.headers["content-type"] == "application/json"
            assert "\n" not in busy.text and "busy" in busy.json()["detail"]
        finally:
            predictor.release.set()
            running.join(30)
            waiting.join(30)
        assert answers == {"running": 200, "waiting": 200}
        _wait_until(lambda: pool.admitted == 0, "the slots are given back")
        assert _upload(client).status_code == 200
    assert threads_that_decoded and all(name.startswith("tumorseg-analyse") for name in threads_that_decoded)  # decoded inside the pool


def test_the_web_app_refuses_the_bombs_before_decoding(imdecode_spy):
    from fastapi.testclient import TestClient

    from tumorseg.serve import create_app

    predictor = BlockingPredictor()
    predictor.release.set()
    imdecode_spy.refuse |= {len(BOMB_BMP), len(RGBA16_OVER_BUDGET)}
    with TestClient(create_app(predictor), raise_server_exceptions=False) as client:
        for name, data in (("bomb.bmp", BOMB_BMP), ("rgba16.png", RGBA16_OVER_BUDGET)):
            response = _upload(client, name, data)
            assert response.status_code == 422 and "too large" in response.json()["detail"], (name, response.text)


def test_head_health_and_docs_without_a_cdn():
    from fastapi.testclient import TestClient

    from tumorseg.serve import create_app

    predictor = BlockingPredictor()
    with TestClient(create_app(predictor), raise_server_exceptions=False) as client:
        assert client.head("/health").status_code == 200
        assert client.get("/health").status_code == 200
        for path in ("/docs", "/redoc"):
            page = client.get(path)
            assert "cdn.jsdelivr" not in page.text and "unpkg" not in page.text
            assert page.status_code == 404 and "/openapi.json" in page.json()["detail"]  # off, and says so
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and "/docs) are off" in schema.json()["info"]["description"]
        assert 'href="docs"' not in client.get("/").text
