"""The web app: one HTML page and a small JSON API around a :class:`~tumorseg.inference.Predictor`.

``create_app(predictor)`` builds the FastAPI application (tests use it with ``TestClient``, no
network); ``tumorseg serve`` loads the model once and runs it with uvicorn.

Endpoints::

    GET  /              the page: upload a slice, see outline, Grad-CAM, area, confidence, mask download
    POST /predict       multipart form field ``file`` (PNG/JPEG/BMP/TIFF) -> JSON, see PredictResponse
    GET  /health        model name, back-end, input size, threshold, tumorseg version (HEAD too)
    GET  /openapi.json  the OpenAPI schema; /docs is off (Swagger UI loads from a CDN: blank offline)

Every error is JSON ``{"detail": "<one readable sentence>"}``: 413 upload too large, 415 not a
multipart upload or not an image content type, 422 missing ``file`` field or undecodable image,
503 busy (with ``Retry-After``), 500 (generic message; the traceback goes to the server log only).
The images in the answer are base64-encoded PNGs, so the server keeps no state between requests.

Decoding and inference run in a bounded pool (:class:`AnalysisPool`: ``workers`` threads, at most
``queue_limit`` uploads waiting) off the event loop, so memory is bounded by the pool, not by the
number of clients: each upload passes the decode gate (:mod:`tumorseg.images`) inside a worker,
and a full queue is answered 503 at once. Prediction is also serialised by a lock: a Keras model
(and its Grad-CAM function) is not guaranteed to be thread-safe, and on a CPU one request at a time
already uses every core.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import cv2
import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tumorseg import __version__
from tumorseg.images import DEFAULT_MAX_PIXELS, MAX_DECODE_BYTES, InputImageError, decode_image, to_gray_uint8
from tumorseg.inference import Predictor
from tumorseg.io import encode_png
from tumorseg.overlays import PREDICTION_BGR, overlay_outline

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0
# Browsers send image/* for known image files and application/octet-stream for unknown ones
# (e.g. some .tif); the bytes are checked by decode_image either way.
ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream")
OUTLINE_BGR = PREDICTION_BGR  # predicted outline: red, as in every picture tumorseg draws
DEFAULT_WORKERS = 1  # one analysis at a time already uses every CPU core (see the module doc)
DEFAULT_QUEUE_LIMIT = 8  # uploads waiting for a worker; each holds its bytes (<= max_upload_mb)
DEFAULT_RETRY_AFTER_S = 5
DOCS_OFF = (
    "interactive API docs (/docs) are off: Swagger UI would load from a CDN and show a blank page offline; "
    "the OpenAPI schema is at /openapi.json"
)


class PredictResponse(BaseModel):
    """Answer of ``POST /predict``; ``*_png`` fields are base64-encoded PNG files."""

    filename: str = Field(description="name of the uploaded file")
    width: int = Field(description="image width in pixels (the upload's own size)")
    height: int = Field(description="image height in pixels")
    tumour_present: bool = Field(description="any pixel above the threshold")
    area_px: int = Field(description="predicted tumour area in pixels of the uploaded image")
    area_pct: float = Field(description="predicted tumour area as a percentage of the image")
    mean_confidence: float = Field(description="mean tumour probability over the predicted region (0 when empty)")
    threshold: float = Field(description="probability threshold of the mask")
    overlay_png: str = Field(description="base64 PNG: the image with the predicted outline (green)")
    mask_png: str = Field(description="base64 PNG: the binary mask, 0 / 255, at the image's size")
    gradcam_png: str | None = Field(description="base64 PNG: Seg-Grad-CAM heat map over the image (null when not asked for or unavailable)")
    gradcam_layer: str | None = Field(description="layer the Grad-CAM map was computed at")
    elapsed_ms: float = Field(description="server time for segmentation and Grad-CAM")


class HealthResponse(BaseModel):
    status: str
    model: str
    backend: str
    input_size: int
    threshold: float
    tta: bool
    gradcam_layer: str | None
    max_upload_mb: float
    version: str
    sequences: list[str] = Field(default_factory=list, description="a multi-sequence model's upload fields, in channel order; [] = one image in 'file'")


def _b64_png(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def _web_file(name: str) -> str:
    return resources.files("tumorseg").joinpath("web", name).read_text(encoding="utf-8")


def _require_multipart(request: Request) -> None:
    """415 before form parsing when the request is not a multipart upload (e.g. raw bytes or JSON)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPException(
            415,
            f"expected a multipart/form-data upload with the image in the field 'file', got content type {content_type or 'none'!r}",
        )


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, before form parsing.

    A declared Content-Length over the limit is answered at once (nothing is read); a body without
    one (chunked) is counted as it streams in. The answer is JSON like every other error (the
    limiter built into FastAPI/Starlette answers in plain text).
    """

    def __init__(self, app: ASGIApp, max_mb: float) -> None:
        self.app = app
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 1024 * 1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": _too_large(self.max_mb)}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _too_large(self.max_mb))  # rendered by the app's handler
            return message

        await self.app(scope, limited_receive, send)


def _too_large(max_mb: float) -> str:
    return f"upload too large: the limit is {max_mb:g} MB (tumorseg serve --max-upload-mb)"


class ServerBusy(HTTPException):
    """503 with ``Retry-After``: every worker is busy and the queue is full."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        detail = f"server busy: {capacity} uploads are being analysed or waiting; retry in {retry_after_s} s"
        super().__init__(503, detail, headers={"Retry-After": str(retry_after_s)})


class AnalysisPool:
    """``workers`` threads for decoding and prediction, at most ``queue_limit`` jobs waiting.

    Without a bound every concurrent upload is decoded at once and memory grows with the number
    of clients; here it grows with ``workers`` (each decode is itself bounded by the gate).
    """

    def __init__(self, workers: int, queue_limit: int, retry_after_s: int) -> None:
        if workers < 1 or queue_limit < 0 or retry_after_s < 1:
            raise ValueError(f"workers must be at least 1, queue_limit at least 0, retry_after_s at least 1; got {workers}, {queue_limit}, {retry_after_s}")
        self.capacity = workers + queue_limit
        self.retry_after_s = retry_after_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tumorseg-analyse")
        self._lock = threading.Lock()  # slots are given back from worker threads
        self.admitted = 0  # jobs running + waiting

    def admit(self) -> None:
        """Take a slot for a job, or raise :class:`ServerBusy` (never waits)."""
        with self._lock:
            if self.admitted >= self.capacity:
                raise ServerBusy(self.capacity, self.retry_after_s)
            self.admitted += 1

    def release(self) -> None:
        """Give back an admitted job's slot (done by :meth:`run` when the job ends)."""
        with self._lock:
            self.admitted -= 1

    async def run(self, job: Callable[..., Any], *args: Any) -> Any:
        """Run an admitted job in a worker. Its slot is freed when the job ends, not when the caller
        stops waiting: a client that hangs up cannot free a slot while its image is still in memory."""
        future = self._executor.submit(job, *args)
        future.add_done_callback(lambda _: self.release())
        return await asyncio.wrap_future(future)


class Analyser:
    """Segmentation + Grad-CAM + images for the answer, one request at a time (see module doc)."""

    def __init__(self, predictor: Predictor, gradcam_layer: str | None, max_pixels: int, max_decode_bytes: int = MAX_DECODE_BYTES) -> None:
        self.predictor = predictor
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self._lock = threading.Lock()
        self.gradcam = None
        if predictor.model is not None:
            from tumorseg.explain import GradCam

            self.gradcam = GradCam(predictor.model, gradcam_layer, threshold=predictor.threshold)
        elif gradcam_layer:
            raise ValueError("--layer needs a Keras model: an exported .tflite/.onnx model has no Grad-CAM")
        # Trace the graphs now: the first request would otherwise wait seconds for it.
        side = predictor.input_size
        self.sequences: tuple[str, ...] = tuple(getattr(predictor, "sequences", ()))  # () = one grayscale image
        blank = np.zeros((side, side, len(self.sequences)) if self.sequences else (side, side), np.uint8)
        predictor.predict([blank])
        if self.gradcam is not None:
            self.gradcam(blank)

    def decode(self, data: bytes | dict[str, tuple[bytes, str]], filename: str) -> np.ndarray:
        """The upload as the model takes it: one image, or one per sequence stacked in the model's
        order (each through the decode gate; sizes must agree). InputImageError -> 422."""
        if isinstance(data, bytes):
            return decode_image(data, filename, max_pixels=self.max_pixels, max_decode_bytes=self.max_decode_bytes)
        planes = []
        for sequence in self.sequences:
            content, name = data[sequence]
            plane = to_gray_uint8(decode_image(content, f"{sequence} ({name})", max_pixels=self.max_pixels, max_decode_bytes=self.max_decode_bytes))
            if planes and plane.shape != planes[0].shape:
                raise InputImageError(
                    f"{sequence} ({name}) is {plane.shape[1]}x{plane.shape[0]} but {self.sequences[0]} is {planes[0].shape[1]}x{planes[0].shape[0]}: "
                    "upload the same slice of every sequence"
                )
            planes.append(plane)
        return np.stack(planes, axis=-1)

    def __call__(self, data: bytes | dict[str, tuple[bytes, str]], filename: str, with_gradcam: bool) -> dict[str, Any]:
        image = self.decode(data, filename)
        started = time.perf_counter()
        with self._lock:
            prediction = self.predictor.predict([image])[0]
            heat = self.gradcam(image) if with_gradcam and self.gradcam is not None else None
        gradcam_png = None
        if heat is not None:
            from tumorseg.explain import heatmap_overlay, sequence_mean

            rgb = heatmap_overlay(sequence_mean(image), heat, mask=prediction.mask)
            gradcam_png = _b64_png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        height, width = image.shape[:2]
        return {
            "filename": filename,
            "width": width,
            "height": height,
            **prediction.summary(),
            "threshold": self.predictor.threshold,
            "overlay_png": _b64_png(overlay_outline(image if image.ndim == 2 else np.ascontiguousarray(image[..., 0]), prediction.mask, OUTLINE_BGR)),
            "mask_png": _b64_png(prediction.mask),
            "gradcam_png": gradcam_png,
            "gradcam_layer": self.gradcam.layer if gradcam_png else None,
            "elapsed_ms": 1000.0 * (time.perf_counter() - started),
        }


def create_app(
    predictor: Predictor,
    *,
    model_name: str | None = None,
    gradcam_layer: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    workers: int = DEFAULT_WORKERS,
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
    retry_after_s: int = DEFAULT_RETRY_AFTER_S,
) -> FastAPI:
    """The web app around an already loaded ``predictor`` (loaded once, shared by all requests).

    ``max_upload_mb``: larger request bodies get 413 (see :class:`BodyLimit`).
    ``max_pixels``, ``max_decode_bytes``: the decode gate's budgets (:mod:`tumorseg.images`).
    ``workers``, ``queue_limit``: uploads analysed at once and waiting; beyond that 503 with
    ``Retry-After: retry_after_s`` (see :class:`AnalysisPool`).
    ``gradcam_layer``: see :mod:`tumorseg.explain` (default: the stride-2 decoder stage).
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    pool = AnalysisPool(workers, queue_limit, retry_after_s)
    analyse = Analyser(predictor, gradcam_layer, max_pixels, max_decode_bytes)
    name = model_name or (predictor.model.name if predictor.model is not None else predictor.name)
    app = FastAPI(
        title="tumorseg",
        version=__version__,
        description=f"Brain-tumour segmentation of MRI slices, with Seg-Grad-CAM explanations. Research use only - not a medical device. Note: {DOCS_OFF}.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_mb=max_upload_mb)
    app.state.analyser = analyse
    app.state.pool = pool

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            if error.get("type") == "missing" and where == "file":
                problems.append("missing form field 'file': upload the image as multipart/form-data field 'file'")
            else:
                problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error (logged on the server)"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"))

    @app.get("/docs", include_in_schema=False)
    @app.get("/redoc", include_in_schema=False)
    async def docs_off() -> JSONResponse:
        return JSONResponse({"detail": DOCS_OFF}, status_code=404)

    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        """Load balancers and uptime checks ask with HEAD: same status, no body."""
        return Response(status_code=200, media_type="application/json")

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "backend": predictor.name,
            "input_size": predictor.input_size,
            "threshold": predictor.threshold,
            "tta": predictor.tta,
            "gradcam_layer": analyse.gradcam.layer if analyse.gradcam is not None else None,
            "max_upload_mb": max_upload_mb,
            "version": __version__,
            "sequences": list(analyse.sequences),
        }

    if analyse.sequences:
        _add_sequence_endpoint(app, analyse.sequences, pool, analyse)
        app.mount("/static", StaticFiles(packages=[("tumorseg", "web/static")]), name="static")
        return app

    @app.post(
        "/predict",
        response_model=PredictResponse,
        dependencies=[Depends(_require_multipart)],
        responses={
            413: {"description": "upload larger than --max-upload-mb"},
            415: {"description": "not a multipart upload, or the file is not an image content type"},
            422: {"description": "missing field 'file', or the file is not a decodable image"},
            503: {"description": "busy: every worker is analysing and the queue is full; retry after the Retry-After header's seconds"},
        },
    )
    async def predict(
        file: UploadFile = File(description="an MRI slice: PNG, JPEG, BMP or TIFF, gray or colour, 8 or 16 bit"),
        gradcam: bool = Query(True, description="also compute the Grad-CAM map (costs about as much as the segmentation)"),
    ) -> dict[str, Any]:
        content_type = (file.content_type or "").lower()
        filename = file.filename or "upload"
        if content_type and not content_type.startswith(ACCEPTED_CONTENT_TYPES):
            raise HTTPException(415, f"{filename}: content type {content_type!r} is not an image; upload a PNG, JPEG, BMP or TIFF file")
        pool.admit()  # 503 before the upload's bytes are loaded (Starlette has spooled bodies over 1 MB to disk)
        try:
            data = await file.read()
        except BaseException:
            pool.release()
            raise
        try:
            return await pool.run(analyse, data, filename, gradcam)
        except InputImageError as exc:
            raise HTTPException(422, str(exc)) from None
        except Exception:
            log.exception("prediction failed for %s", filename)
            raise HTTPException(500, "internal server error while analysing the image (logged on the server)") from None

    app.mount("/static", StaticFiles(packages=[("tumorseg", "web/static")]), name="static")
    return app


def _add_sequence_endpoint(app: FastAPI, sequences: tuple[str, ...], pool: AnalysisPool, analyse: Analyser) -> None:
    """``POST /predict`` of a multi-sequence model: one multipart field per sequence, named by it."""
    fields = ", ".join(sequences)
    schema = {
        "type": "object",
        "required": list(sequences),
        "properties": {sequence: {"type": "string", "format": "binary", "description": f"the {sequence} image of the slice"} for sequence in sequences},
    }

    @app.post(
        "/predict",
        response_model=PredictResponse,
        dependencies=[Depends(_require_multipart)],
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}},
        responses={
            413: {"description": "upload larger than --max-upload-mb"},
            415: {"description": "not a multipart upload, or a file is not an image content type"},
            422: {"description": f"a missing field ({fields}), an undecodable image, or sequences of different sizes"},
            503: {"description": "busy: every worker is analysing and the queue is full; retry after the Retry-After header's seconds"},
        },
    )
    async def predict(
        request: Request,
        gradcam: bool = Query(True, description="also compute the Grad-CAM map (costs about as much as the segmentation)"),
    ) -> dict[str, Any]:
        form = await request.form()
        uploads = {}
        for sequence in sequences:
            item = form.get(sequence)
            if item is None or isinstance(item, str):
                raise HTTPException(422, f"missing form field {sequence!r}: the model takes one image per sequence, in the fields {fields}")
            content_type = (item.content_type or "").lower()
            if content_type and not content_type.startswith(ACCEPTED_CONTENT_TYPES):
                raise HTTPException(415, f"{sequence} ({item.filename}): content type {content_type!r} is not an image; upload a PNG, JPEG, BMP or TIFF file")
            uploads[sequence] = item
        pool.admit()
        try:
            data = {sequence: (await item.read(), item.filename or sequence) for sequence, item in uploads.items()}
        except BaseException:
            pool.release()
            raise
        filename = uploads[sequences[0]].filename or "upload"
        try:
            return await pool.run(analyse, data, filename, gradcam)
        except InputImageError as exc:
            raise HTTPException(422, str(exc)) from None
        except Exception:
            log.exception("prediction failed for %s", filename)
            raise HTTPException(500, "internal server error while analysing the image (logged on the server)") from None


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` with uvicorn; warns when reachable from other machines."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "binding to %s: the app is reachable from other machines and has no authentication; "
            "use 127.0.0.1 unless that is what you want",
            host,
        )
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextlib.contextmanager
def serve_in_background(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port/``).

    For the browser test and ``scripts/screenshot_webapp.py``: a real HTTP server in this process
    (the model stays loaded once) that is always stopped on leaving the block. ``port=0`` takes a
    free port: the socket is bound here, before uvicorn starts, so no other process can take it
    in between. Returns only once ``GET /health`` answers.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}; choose another port") from exc
    bound_port = sock.getsockname()[1]
    url = f"http://[{host}]:{bound_port}/" if family == socket.AF_INET6 else f"http://{host}:{bound_port}/"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tumorseg-serve", daemon=True)
    thread.start()
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    try:
        deadline = time.monotonic() + timeout
        while True:
            if not thread.is_alive():
                raise RuntimeError(f"the web server on {url} stopped while starting (see the log above)")
            try:
                with direct.open(url + "health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the web server on {url} did not answer GET /health within {timeout:g} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
