"""The service's FastAPI app: :func:`create_app` turns a loaded :class:`~seg.predictor.Segmenter` into the
endpoints. The model is loaded by the caller, once (the command line, a test, a Ray Serve replica); no request
names a file or a model to load.

Every error is a JSON body ``{"error": "one line"}`` with a 4xx status for the client's mistakes (400 empty,
truncated or malformed upload, 413 above the byte or pixel limit, 415 not an image, 404/405/422 wrong path,
method or query) and 503 with Retry-After when the service is full or shutting down.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from seg import __version__
from seg.engine.inference import describe_inference
from seg.predictor import Segmenter
from seg.serve.admission import Admission, MicroBatcher, Overloaded
from seg.serve.metrics import Metrics, MetricsMiddleware
from seg.serve.results import mask_json, mask_png, overlay_png
from seg.serve.settings import ServeSettings
from seg.serve.uploads import UploadError, decode_upload, read_upload

__all__ = ["ServeSettings", "create_app"]

logger = logging.getLogger("seg.serve")

PATHS = ("/", "/v1/predict", "/v1/overlay", "/v1/model", "/healthz", "/readyz", "/metrics")
# The page loads nothing from elsewhere; the policy makes a browser refuse it if it ever tried (offline use).
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'; connect-src 'self'")


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    """FastAPI's list of validation problems as one line: ``query ms_flip: Input should be a valid boolean``."""
    problems = []
    for problem in error.errors():
        where = " ".join(str(part) for part in problem.get("loc", ()))
        problems.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request"


class ServiceState:
    """What the endpoints share: the model, the limits, the admission, the counters and the drain flag."""

    def __init__(self, segmenter: Union[Segmenter, Callable[[], Segmenter]], settings: ServeSettings) -> None:
        self.settings = settings
        self.admission = Admission(settings.admitted, settings.concurrency)
        if not isinstance(segmenter, Segmenter):
            # Loaded on the prediction thread: once any other thread has run a parallel torch operation (loading
            # a model does), each of the thread's predictions on the CPU takes longer (measured in bf16: 1.6x on
            # 64 x 64 images, 1.14x on 512 x 512; bench/RESULTS.md).
            segmenter = self.admission.executor.submit(segmenter).result()
        self.segmenter = segmenter
        self.batcher = (MicroBatcher(self._predict_many, self.admission, settings.max_batch,
                                     settings.batch_wait_ms / 1000.0, settings.concurrency)
                        if settings.max_batch > 1 else None)
        self.metrics = Metrics(PATHS)
        self.draining = False  # set on SIGTERM: /readyz then says 503, requests in flight finish

    def _predict_many(self, ms_flip: bool, images: List[np.ndarray]) -> List[np.ndarray]:
        return self.segmenter.predict_batch(images, ms_flip=ms_flip)

    async def predict(self, request: Request, ms_flip: bool) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
        """(RGB image, mask, timings) of the request's upload, within the service's limits. Timings (seconds):
        ``wait`` from the decoded image to a prediction thread (a free slot, a batch), ``predict`` the model's
        work (for a micro-batch, the whole batch's)."""
        self.admission.enter()
        try:
            data, name = await read_upload(request, self.settings.max_upload_bytes)
            rgb = await run_in_threadpool(decode_upload, data, name, self.segmenter.max_pixels)
            decoded = time.perf_counter()
            if self.batcher is not None:
                mask, started, ended = await self.batcher.submit(ms_flip, rgb)
            else:
                mask, started, ended = await self.admission.run(self.segmenter.predict, rgb, ms_flip)
            return rgb, mask, {"wait": started - decoded, "predict": ended - started}
        finally:
            self.admission.leave()

    def model_description(self) -> Dict[str, Any]:
        segmenter, settings = self.segmenter, self.settings
        return {**segmenter.card.to_dict(), "serving": {
            "seg_version": __version__, "device": str(segmenter.device), "precision": segmenter.precision,
            "inference": describe_inference(segmenter.inference_config(ms_flip=False)),
            "ms_flip_inference": describe_inference(segmenter.inference_config(ms_flip=True)),
            "max_pixels": segmenter.max_pixels, "max_upload_bytes": settings.max_upload_bytes,
            "concurrency": settings.concurrency, "queue_size": settings.queue_size, "max_batch": settings.max_batch,
        }}


def server_timing(timings: Dict[str, float], started: float) -> Dict[str, str]:
    """The ``Server-Timing`` header (milliseconds; browsers' developer tools show it): ``wait``, ``predict`` and
    ``total`` (from the request's arrival to its response body, the upload's transfer included)."""
    parts = [f"{name};dur={seconds * 1000.0:.1f}" for name, seconds in timings.items()]
    parts.append(f"total;dur={(time.perf_counter() - started) * 1000.0:.1f}")
    return {"Server-Timing": ", ".join(parts)}


def _page() -> str:
    return resources.files("seg.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(segmenter: Union[Segmenter, Callable[[], Segmenter]],
               settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The HTTP app for ``segmenter`` (module docstring), or for the Segmenter that calling it returns: the
    service then loads it on its prediction thread, where it is fastest (:class:`ServiceState`); what loading
    raises, this raises. ``app.state.service`` is its :class:`ServiceState` (``draining`` is what SIGTERM sets)."""
    # No /docs page: Swagger UI loads its scripts from a CDN, and the service must work offline. /openapi.json stays.
    app = FastAPI(title="seg", version=__version__, docs_url=None, redoc_url=None)
    service = ServiceState(segmenter, settings)
    segmenter = service.segmenter
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    page = _page()

    @app.exception_handler(UploadError)
    async def refused(request: Request, error: UploadError) -> JSONResponse:
        return _error(error.status, error.message)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded) -> JSONResponse:
        return _error(503, str(error), {"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"no such endpoint: {request.url.path}" if error.status_code == 404 else error.detail
        return _error(error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(error))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(error).__name__}); the service log has the details")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.post("/v1/predict", summary="Mask of an image (multipart field 'image', or the raw body)")
    async def predict(request: Request, format: Literal["png", "json"] = "png",
                      ms_flip: bool = Query(False, description="multi-scale + flip inference")) -> Response:
        started = time.perf_counter()
        _, mask, timings = await service.predict(request, ms_flip)
        if format == "json":
            payload = await run_in_threadpool(mask_json, segmenter, mask)
            payload["latency_ms"] = (time.perf_counter() - started) * 1000.0
            return JSONResponse(payload, headers=server_timing(timings, started))
        body = await run_in_threadpool(mask_png, segmenter, mask)
        return Response(body, media_type="image/png", headers=server_timing(timings, started))

    @app.post("/v1/overlay", summary="The image with its coloured mask blended over it, as PNG")
    async def overlay(request: Request, alpha: float = Query(0.5, ge=0.0, le=1.0),
                      ms_flip: bool = Query(False, description="multi-scale + flip inference")) -> Response:
        started = time.perf_counter()
        rgb, mask, timings = await service.predict(request, ms_flip)
        body = await run_in_threadpool(overlay_png, segmenter, rgb, mask, alpha)
        return Response(body, media_type="image/png", headers=server_timing(timings, started))

    @app.get("/v1/model", summary="The model card, and how this service runs it")
    async def model() -> Dict[str, Any]:
        return service.model_description()

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and the service takes requests")
    async def readyz() -> Response:
        if service.draining:
            return _error(503, "shutting down: finishing the requests in flight")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    async def metrics() -> PlainTextResponse:
        batch_sizes = service.batcher.batch_sizes if service.batcher is not None else {}
        return PlainTextResponse(service.metrics.render(batch_sizes, service.admission.inside),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
