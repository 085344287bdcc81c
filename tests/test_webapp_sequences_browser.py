"""The web page of a multi-sequence model in headless Chromium: one file input per sequence (built
from ``/health``), the analysis starting once every sequence is chosen, and the answer the API gives.

Skipped like tests/test_webapp_browser.py without Chromium (a failure under CI).
"""

from __future__ import annotations

import os

import cv2
import httpx
import numpy as np
import pytest

from test_webapp_browser import CHROMIUM, MISSING, TIMEOUT_MS, sync_api
from tumorseg.inference import Predictor
from tumorseg.serve import create_app, serve_in_background

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))]
SEQUENCES = ("t1", "flair", "t1ce")


def flair_model(size: int = 32):
    """A 3-sequence model that calls tumour where FLAIR is bright: its answer is known without training."""
    import keras

    inputs = keras.Input((size, size, len(SEQUENCES)), name="image__" + "__".join(SEQUENCES))
    pick_flair = keras.initializers.Constant(np.array([0.0, 1.0, 0.0]).reshape(1, 1, 3, 1))
    flair = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer=pick_flair, name="flair")(inputs)
    constant = keras.initializers.Constant
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=constant(0.2), bias_initializer=constant(-30.0))(flair)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def server():
    app = create_app(Predictor([flair_model()]), model_name="flair-model")
    with serve_in_background(app, "127.0.0.1", 0) as url:
        yield url


def test_one_input_per_sequence_and_the_apis_answer(server, tmp_path):
    if MISSING:
        pytest.fail(f"CI must run the browser test: {MISSING}")
    disc = np.zeros((48, 64), np.uint8)
    cv2.circle(disc, (40, 20), 8, 255, -1)
    files = {}
    for sequence in SEQUENCES:
        image = np.full((48, 64), 60, np.uint8)
        if sequence == "flair":
            image[disc > 0] = 250
        files[sequence] = tmp_path / f"{sequence}.png"
        assert cv2.imwrite(str(files[sequence]), image)
    expected = httpx.post(
        server + "predict", files={s: (p.name, p.read_bytes(), "image/png") for s, p in files.items()}, timeout=30
    ).json()
    assert expected["tumour_present"] and abs(expected["area_px"] - int((disc > 0).sum())) <= 0.1 * (disc > 0).sum()

    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server)
        for sequence in SEQUENCES:
            sync_api.expect(page.locator(f"#file-{sequence}")).to_be_visible()
        sync_api.expect(page.locator("#file")).to_be_hidden()
        page.set_input_files("#file-t1", files["t1"])
        page.set_input_files("#file-flair", files["flair"])
        assert page.locator("#result").is_hidden()  # not before every sequence is chosen
        page.set_input_files("#file-t1ce", files["t1ce"])
        sync_api.expect(page.locator("#result")).to_be_visible()
        area = page.text_content("#area")
        assert area.startswith(f"{expected['area_px']:,} px"), area
        assert page.text_content("#size").startswith("64 × 48 px")
        assert errors == []
        browser.close()
