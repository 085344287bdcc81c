"""The web app's API through FastAPI's TestClient (no network): a good upload and every bad one; and the
background server (serve_in_background) on loopback."""

from __future__ import annotations

import base64
import logging
import re
import threading
import time

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers import blob_pair
from tumorseg import __version__
from tumorseg.inference import Predictor
from tumorseg.serve import create_app, run_server, serve_in_background

MAX_UPLOAD_MB = 0.1


@pytest.fixture(scope="module")
def app(blob_model):
    model, _ = blob_model
    return create_app(Predictor(model), model_name="blob_unet.keras", max_upload_mb=MAX_UPLOAD_MB)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def png_bytes(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def decode_b64_png(text: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


def test_good_upload_returns_measurements_and_images(client):
    image, truth = blob_pair(96, 5)
    image, truth = cv2.resize(image, (80, 56)), cv2.resize(truth, (80, 56), interpolation=cv2.INTER_NEAREST)
    response = client.post("/predict", files={"file": ("slice 5.png", png_bytes(image), "image/png")})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["filename"], answer["width"], answer["height"]) == ("slice 5.png", 80, 56)
    assert answer["tumour_present"] is True
    true_area = int((truth > 0).sum())
    assert abs(answer["area_px"] - true_area) <= 0.25 * true_area, (answer["area_px"], true_area)
    assert answer["area_pct"] == pytest.approx(100.0 * answer["area_px"] / (80 * 56))
    assert 0.5 < answer["mean_confidence"] <= 1.0
    assert answer["threshold"] == 0.5 and answer["gradcam_layer"] == "dec2"

    mask = decode_b64_png(answer["mask_png"])
    assert mask.shape == (56, 80) and set(np.unique(mask)) <= {0, 255}
    assert int((mask == 255).sum()) == answer["area_px"]
    overlay = decode_b64_png(answer["overlay_png"])
    assert overlay.shape == (56, 80, 3)
    red = (overlay[..., 2] == 255) & (overlay[..., 1] == 0) & (overlay[..., 0] == 0)  # BGR (cv2): predictions are red
    assert red.any() and not red[mask == 0].any()  # the outline lies on the predicted mask's edge
    gradcam = decode_b64_png(answer["gradcam_png"])
    assert gradcam.shape == (56, 80, 3)

    # warmer Grad-CAM colours (JET: more red, less blue) on the tumour than on the background
    b, _, r = (gradcam[..., i].astype(int) for i in range(3))
    redness = r - b
    assert redness[truth > 0].mean() > redness[truth == 0].mean()


def test_gradcam_can_be_skipped_and_colour_and_16_bit_inputs_work(client):
    image, _ = blob_pair(64, 9)
    image[0, :2] = (0, 255)  # full range: 16-bit inputs are stretched min..max, so this one maps back exactly
    colour = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    answer = client.post("/predict?gradcam=false", files={"file": ("c.png", png_bytes(colour), "image/png")}).json()
    assert answer["gradcam_png"] is None and answer["gradcam_layer"] is None and answer["tumour_present"]
    sixteen = client.post("/predict", files={"file": ("d.tif", cv2.imencode(".tiff", image.astype(np.uint16) * 257)[1].tobytes(), "image/tiff")})
    assert sixteen.status_code == 200 and sixteen.json()["area_px"] == answer["area_px"]


def test_health_index_static_and_openapi(client):
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "model": "blob_unet.keras",
        "backend": "keras",
        "input_size": 32,
        "threshold": 0.5,
        "tta": False,
        "gradcam_layer": "dec2",
        "max_upload_mb": MAX_UPLOAD_MB,
        "version": __version__,
        "sequences": [],  # a grayscale model: one image in the field 'file'
    }
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'type="file"' in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):  # favicon: no 404 in the console
        response = client.get(asset)
        assert response.status_code == 200
        # self-contained: nothing loaded from another host (no CDN; the app must work offline)
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", response.text + page.text)
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body


def _multipart(name: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "tumorsegboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


GOOD_PNG = png_bytes(blob_pair(32, 1)[0])


@pytest.mark.parametrize(
    ("case", "status", "detail"),
    [
        ("text file", 415, "content type 'text/plain' is not an image"),
        ("raw body, not multipart", 415, "expected a multipart/form-data upload"),
        ("json body", 415, "expected a multipart/form-data upload"),
        ("no body at all", 415, "expected a multipart/form-data upload"),
        ("missing field", 422, "missing form field 'file'"),
        ("not an image", 422, "not an image"),
        ("empty file", 422, "empty file"),
        ("truncated png", 422, "corrupt"),
        ("declared too large", 413, f"the limit is {MAX_UPLOAD_MB:g} MB"),
        ("streamed too large", 413, f"the limit is {MAX_UPLOAD_MB:g} MB"),
    ],
)
def test_bad_uploads_get_a_clear_json_error(client, case, status, detail):
    big = b"\0" * int(MAX_UPLOAD_MB * 1024 * 1024 + 1000)
    if case == "text file":
        response = client.post("/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    elif case == "raw body, not multipart":
        response = client.post("/predict", content=GOOD_PNG, headers={"content-type": "image/png"})
    elif case == "json body":
        response = client.post("/predict", json={"file": "x"})
    elif case == "no body at all":
        response = client.post("/predict")
    elif case == "missing field":
        response = client.post("/predict", files={"image": ("a.png", GOOD_PNG, "image/png")})
    elif case == "not an image":
        response = client.post("/predict", files={"file": ("a.png", b"GIF89a, or anything else", "image/png")})
    elif case == "empty file":
        response = client.post("/predict", files={"file": ("a.png", b"", "image/png")})
    elif case == "truncated png":
        response = client.post("/predict", files={"file": ("a.png", GOOD_PNG[: len(GOOD_PNG) // 2], "image/png")})
    elif case == "declared too large":
        response = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    else:  # no Content-Length: the body is counted as it streams in
        body, content_type = _multipart("file", "big.png", big, "image/png")
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
        response = client.post("/predict", content=chunks, headers={"content-type": content_type})
        assert "content-length" not in response.request.headers
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["detail"], str) and detail in response.json()["detail"]


def test_unexpected_errors_are_a_generic_json_500_and_logged(app, client, monkeypatch, caplog):
    def broken(images):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.analyser.predictor, "predict", broken)
    with caplog.at_level(logging.ERROR, logger="tumorseg.serve"):
        response = client.post("/predict", files={"file": ("a.png", GOOD_PNG, "image/png")})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error while analysing the image (logged on the server)"}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internals" in caplog.text  # the traceback went to the server log


def test_inference_runs_off_the_event_loop_and_one_at_a_time(app, client, monkeypatch):
    """A slow prediction neither blocks other requests (thread pool) nor overlaps another one (lock)."""
    predictor = app.state.analyser.predictor
    original, active, peak = predictor.predict, [0], [0]

    def slow(images):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.8)
        active[0] -= 1
        return original(images)

    monkeypatch.setattr(predictor, "predict", slow)
    results = []

    def upload():
        results.append(client.post("/predict?gradcam=false", files={"file": ("a.png", GOOD_PNG, "image/png")}).status_code)

    workers = [threading.Thread(target=upload) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert client.get("/health").status_code == 200
    health_seconds = time.perf_counter() - started
    for worker in workers:
        worker.join()
    assert results == [200, 200]
    assert peak[0] == 1  # serialised
    assert health_seconds < 0.8  # answered while a prediction was sleeping


def test_binding_beyond_loopback_warns(monkeypatch, caplog):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    with caplog.at_level(logging.WARNING, logger="tumorseg.serve"):
        run_server(object(), host="127.0.0.1", port=8123)
        assert "reachable from other machines" not in caplog.text
        run_server(object(), host="0.0.0.0", port=8123)
    assert "0.0.0.0" in caplog.text and "reachable from other machines" in caplog.text
    assert [c["host"] for c in calls] == ["127.0.0.1", "0.0.0.0"]


def test_create_app_validates_its_settings(blob_model):
    model, _ = blob_model
    with pytest.raises(ValueError, match="max_upload_mb"):
        create_app(Predictor(model), max_upload_mb=0)
    with pytest.raises(ValueError, match="not a feature map"):
        create_app(Predictor(model), gradcam_layer="nope")


def test_serve_in_background_listens_on_a_free_port_and_always_stops(app):
    with serve_in_background(app) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}/" and port > 0
        assert httpx.get(url + "health").json()["model"] == "blob_unet.keras"
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"), serve_in_background(app, port=port):
            pass  # the port is taken: a clear error, not a hang
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "health")
    assert not any(thread.name == "tumorseg-serve" for thread in threading.enumerate())

    with pytest.raises(RuntimeError, match="inside"), serve_in_background(app):
        raise RuntimeError("inside")  # an error in the block stops the server too
    assert not any(thread.name == "tumorseg-serve" for thread in threading.enumerate())


def test_the_model_is_warmed_up_before_the_first_request(blob_model, monkeypatch):
    model, _ = blob_model
    predictor = Predictor(model)
    seen: list[tuple[int, ...]] = []
    original = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda images: seen.append(images[0].shape) or original(images))
    create_app(predictor)
    assert seen == [(predictor.input_size, predictor.input_size)]  # traced at start-up, not on a user's upload
