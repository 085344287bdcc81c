"""The web page in a real browser: headless Chromium (Debian's, driven by Playwright) against a live
uvicorn server on loopback. TestClient (tests/test_serve.py) checks the JSON API; this checks what
a user sees - the page's JavaScript, the rendered images, the numbers and the mask download.

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it): skipped with the
reason when it is absent, except under CI (``CI`` set), where its absence is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from helpers import blob_pair
from tumorseg.inference import Predictor
from tumorseg.serve import create_app, serve_in_background

try:
    from playwright import sync_api
except ImportError:
    sync_api = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if sync_api is None:
    MISSING = "playwright is not installed: pip install -e '.[dev]'"
elif CHROMIUM is None:
    MISSING = "no chromium on PATH: install Debian's browser with `apt-get install chromium` (.ci/run does)"
else:
    MISSING = None
# Decided before any fixture runs (the session's blob model takes seconds to train); under CI the
# browser fixture fails instead.
pytestmark = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))

TIMEOUT_MS = 15_000
# Chrome logs every non-2xx fetch as a console error; the error test expects exactly these.
FAILED_FETCH = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="module")
def server(blob_model):
    """``tumorseg serve`` in-process: the model loaded from its .keras file, uvicorn on a free port."""
    _, path = blob_model
    app = create_app(Predictor.load(str(path)), model_name=path.name)
    with serve_in_background(app, "127.0.0.1", 0) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        pytest.fail(f"CI must run the browser test: {MISSING}")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)  # the first prediction traces the model: seconds on a busy CPU
    with sync_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to run sandboxed as root
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; ``page.console_errors`` collects console errors and uncaught exceptions."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.console_errors = []
    page.on("console", lambda message: page.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.console_errors.append(f"uncaught: {error}"))
    page.goto(server)
    sync_api.expect(page.locator("#model-info")).to_contain_text("blob_unet.keras")  # GET /health went through
    yield page
    context.close()


def api_predict(server: str, name: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(server + "predict", files={"file": (name, data, content_type)}, timeout=30)


def natural_size(page, selector: str) -> tuple[int, int]:
    return tuple(page.eval_on_selector(selector, "img => [img.complete ? img.naturalWidth : -1, img.naturalHeight]"))


def test_upload_shows_outline_gradcam_numbers_and_mask_download(page, server, tmp_path):
    image, truth = blob_pair(96, 5)
    image, truth = cv2.resize(image, (80, 56)), cv2.resize(truth, (80, 56), interpolation=cv2.INTER_NEAREST)
    upload = tmp_path / "slice 5.png"
    assert cv2.imwrite(str(upload), image)
    expected = api_predict(server, upload.name, upload.read_bytes(), "image/png").json()
    assert expected["tumour_present"]

    page.set_input_files("#file", upload)
    sync_api.expect(page.locator("#result")).to_be_visible()
    sync_api.expect(page.locator("#status")).to_have_text("Done: slice 5.png")

    for selector in ("#overlay", "#gradcam"):
        assert page.get_attribute(selector, "src").startswith("data:image/png;base64,")
        page.wait_for_function(f"document.querySelector('{selector}').complete")
        assert natural_size(page, selector) == (80, 56), selector  # decoded and shown at the upload's size
        assert page.locator(selector).bounding_box()["width"] > 0
    assert page.text_content("#gradcam-layer") == f"layer {expected['gradcam_layer']}"

    # the numbers on the page are the API's, and plausible for this disc
    area_text = page.text_content("#area")
    shown = re.fullmatch(r"([\d,]+) px \(([\d.]+) % of the image\)", area_text)
    assert shown, area_text
    area_px, area_pct = int(shown[1].replace(",", "")), float(shown[2])
    assert area_px == expected["area_px"] and area_pct == pytest.approx(expected["area_pct"], abs=0.005)
    true_area = int((truth > 0).sum())
    assert abs(area_px - true_area) <= 0.25 * true_area, (area_px, true_area)
    confidence = float(page.text_content("#confidence"))
    assert confidence == pytest.approx(expected["mean_confidence"], abs=5e-4) and 0.5 < confidence <= 1.0
    assert page.text_content("#present") == "found"
    assert page.text_content("#size").startswith("80 × 56 px")

    # the download link saves the mask: a PNG at the upload's size, the API's mask
    assert page.get_attribute("#download-mask", "href").startswith("data:image/png;base64,")
    with page.expect_download() as download_info:
        page.click("#download-mask")
    download = download_info.value
    assert download.suggested_filename == "slice 5_mask.png"
    mask = cv2.imdecode(np.frombuffer(Path(download.path()).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.shape == (56, 80)
    assert set(np.unique(mask)) <= {0, 255} and int((mask == 255).sum()) == area_px

    assert page.console_errors == []


def test_non_image_upload_shows_the_server_error_and_the_page_recovers(page, server, tmp_path):
    good = tmp_path / "good.png"
    assert cv2.imwrite(str(good), blob_pair(64, 2)[0])
    page.set_input_files("#file", good)
    sync_api.expect(page.locator("#result")).to_be_visible()

    cases = [
        (tmp_path / "notes.txt", b"not an image, just notes", "text/plain", 415),
        (tmp_path / "fake.png", b"GIF89a, or anything else", "image/png", 422),
    ]
    for path, data, content_type, status in cases:
        path.write_bytes(data)
        detail = api_predict(server, path.name, data, content_type).json()["detail"]
        assert path.name in detail  # the server's message names the file
        page.set_input_files("#file", path)
        sync_api.expect(page.locator("#error")).to_have_text(f"Error {status}: {detail}")
        sync_api.expect(page.locator("#result")).to_be_hidden()  # no stale result next to the error
        assert page.text_content("#status") == ""

    # still working: a good upload after the errors clears the message and shows a result
    page.set_input_files("#file", good)
    sync_api.expect(page.locator("#result")).to_be_visible()
    sync_api.expect(page.locator("#error")).to_be_hidden()

    statuses = [FAILED_FETCH.search(text) for text in page.console_errors]
    assert all(statuses), page.console_errors  # nothing but the two failed fetches
    assert sorted(int(match[1]) for match in statuses) == [415, 422]
