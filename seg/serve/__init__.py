"""``python -m seg.serve``: a trained model behind HTTP, with a browser page (``pip install "seg[serve]"``).

    python -m seg.serve --checkpoint outputs/ade20k_resnest101/best.pth      # then open http://127.0.0.1:8000/

Endpoints (:mod:`seg.serve.app`): ``POST /v1/predict`` (an image as the multipart field ``image`` or as the raw
body -> a palette PNG of class ids at the image's size; ``?format=json`` -> per-class pixel shares and Hugging
Face-style segments; ``?ms_flip=true`` -> multi-scale + flip), ``POST /v1/overlay``, ``GET /v1/model`` (the model
card), ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus) and the page at ``/``.

The parts: :mod:`~seg.serve.settings` (the limits), :mod:`~seg.serve.uploads` (reading and checking an upload),
:mod:`~seg.serve.admission` (bounded concurrency and micro-batching), :mod:`~seg.serve.results` (masks as PNG and
JSON), :mod:`~seg.serve.metrics` (Prometheus counters), :mod:`~seg.serve.ray_deployment` (the same app on Ray
Serve, ``pip install "seg[ray]"``). Importing this package imports neither FastAPI nor Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:  # the app needs FastAPI, which only the serve extra installs
    if name == "create_app":
        from seg.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from seg.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'seg.serve' has no attribute {name!r}")
