"""The HTTP service in-process (FastAPI's app through httpx): its answers are Segmenter's, byte for byte; bad
uploads get one-line 4xx JSON; a full service answers 503 at once; micro-batches give the same masks; the counters
count. tests/serve/test_server_process.py runs the real server process (SIGTERM, ports, the command line)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED
from png_files import blank_png

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="httpx (the test client) is not installed: pip install -e '.[test]'")

from seg.card import ModelCard  # noqa: E402
from seg.predictor import Segmenter  # noqa: E402
from seg.serve.app import create_app  # noqa: E402
from seg.serve.settings import ServeSettings  # noqa: E402

ADE_IMAGES = SHARED / "data" / "ade20k" / "ADEChallengeData2016" / "images" / "validation"
CITYSCAPES_VAL = SHARED / "data" / "cityscapes" / "leftImg8bit" / "val" / "frankfurt"


def real_samples() -> list:
    samples = sorted(ADE_IMAGES.glob("*.jpg")) + sorted(CITYSCAPES_VAL.glob("*.png"))
    if not samples:
        pytest.skip(f"real samples absent: {ADE_IMAGES} and {CITYSCAPES_VAL} hold no image (../shared/data)")
    return samples


@pytest.fixture(scope="module")
def segmenter(discriminating_checkpoint) -> Segmenter:
    return Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu")


def client(app) -> "httpx.AsyncClient":
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")


def call(app, method: str, url: str, **kwargs) -> "httpx.Response":
    async def once():
        async with client(app) as http:
            return await http.request(method, url, **kwargs)

    return asyncio.run(once())


def png_of(response: "httpx.Response") -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def decode_base64_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_predict_returns_the_segmenters_mask_as_a_palette_png(segmenter):
    app = create_app(segmenter)
    for path in real_samples():
        expected = segmenter.predict(path)
        assert len(np.unique(expected)) >= 2, path  # a mask that can be wrong
        data = path.read_bytes()
        for upload in ({"files": {"image": (path.name, data, "image/jpeg")}}, {"content": data}):
            image = png_of(call(app, "POST", "/v1/predict", **upload))
            assert image.mode == "P" and image.size == Image.open(path).size
            assert np.array_equal(np.asarray(image), expected), path
            palette = np.asarray(image.getpalette()[: 3 * segmenter.num_classes], np.uint8).reshape(-1, 3)
            assert np.array_equal(palette, segmenter.palette)
    # curl --data-binary labels the raw image application/x-www-form-urlencoded: it is still the image.
    response = call(app, "POST", "/v1/predict", content=data,
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert np.array_equal(np.asarray(png_of(response)), expected)


def test_json_gives_class_shares_and_hugging_face_style_segments(segmenter):
    path = real_samples()[0]
    expected = segmenter.predict(path)
    response = call(app := create_app(segmenter), "POST", "/v1/predict?format=json",
                    files={"image": (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["height"], result["width"]) == expected.shape and result["latency_ms"] > 0
    timings = {name: float(value) for name, value in (part.strip().split(";dur=")
                                                      for part in response.headers["server-timing"].split(","))}
    assert list(timings) == ["wait", "predict", "total"] and timings["predict"] > 0
    assert timings["total"] >= timings["wait"] + timings["predict"]
    counts = np.bincount(expected.ravel(), minlength=segmenter.num_classes)
    present = [int(i) for i in np.flatnonzero(counts)]
    assert sorted(entry["id"] for entry in result["classes"]) == present
    shares = [entry["share"] for entry in result["classes"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0)
    for entry, segment in zip(result["classes"], result["segments"]):
        assert entry["label"] == segment["label"] == segmenter.classes[entry["id"]]
        assert entry["color"] == list(segmenter.palette[entry["id"]])
        assert entry["share"] == pytest.approx(counts[entry["id"]] / expected.size) == segment["score"]
        binary = np.asarray(decode_base64_png(segment["mask"]))
        assert np.array_equal(binary, np.where(expected == entry["id"], 255, 0)), entry["label"]
    assert np.array_equal(np.asarray(decode_base64_png(result["mask"])), expected)
    assert app.state.service.admission.inside == 0


def test_ms_flip_and_overlay(segmenter):
    path = real_samples()[-1]
    app = create_app(segmenter)
    multi_scale = segmenter.predict(path, ms_flip=True)
    single = segmenter.predict(path)
    assert (multi_scale != single).any()  # the query option reached the model
    response = call(app, "POST", "/v1/predict?ms_flip=true", content=path.read_bytes())
    assert np.array_equal(np.asarray(png_of(response)), multi_scale)
    overlay = png_of(call(app, "POST", "/v1/overlay?alpha=0.25", content=path.read_bytes()))
    assert np.array_equal(np.asarray(overlay), np.asarray(segmenter.overlay(path, single, 0.25)))


def test_model_endpoint_is_the_card_and_probes_answer(segmenter):
    app = create_app(segmenter, ServeSettings(concurrency=2, queue_size=3))
    description = call(app, "GET", "/v1/model").json()
    serving = description.pop("serving")
    assert ModelCard.from_dict(description, "GET /v1/model") == segmenter.card
    assert serving["precision"] == segmenter.precision and serving["queue_size"] == 3
    assert call(app, "GET", "/healthz").json() == {"status": "ok"}
    assert call(app, "GET", "/readyz").json() == {"status": "ready"}
    app.state.service.draining = True  # what SIGTERM sets
    response = call(app, "GET", "/readyz")
    assert response.status_code == 503 and "shutting down" in response.json()["error"]
    assert call(app, "GET", "/healthz").status_code == 200
    page = call(app, "GET", "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]


def jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_bad_requests_get_a_one_line_json_error_never_a_500(segmenter, tmp_path):
    app = create_app(segmenter, ServeSettings(max_upload_bytes=200_000))
    segmenter_limit = Segmenter(segmenter.model, segmenter.card, device="cpu", max_pixels=1_000_000)
    limited = create_app(segmenter_limit, ServeSettings(max_upload_bytes=200_000))
    jpeg = jpeg_bytes()
    png = blank_png(tmp_path / "small.png", 300, 200).read_bytes()

    async def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(30):
            yield b"\0" * 10_000

    cases = [
        (app, "POST", "/v1/predict", {"content": b""}, 400, "empty upload"),
        (app, "POST", "/v1/predict", {"content": b"GIF? no: plain text"}, 415, "not an image"),
        (app, "POST", "/v1/predict", {"content": b"/etc/passwd"}, 415, "not an image"),
        (app, "POST", "/v1/predict", {"content": jpeg[: len(jpeg) // 2]}, 400, "truncated"),
        (app, "POST", "/v1/predict", {"content": png[:-30]}, 400, "truncated"),
        (app, "POST", "/v1/predict", {"files": {"picture": ("a.jpg", jpeg)}}, 400, "no file field 'image'"),
        (app, "POST", "/v1/predict", {"content": b"--x\r\nbroken", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400, ""),
        (app, "POST", "/v1/predict", {"content": b"\0" * 300_000}, 413, "larger than the limit of 200000 bytes"),
        (app, "POST", "/v1/predict", {"content": chunks()}, 413, "larger than the limit"),
        # 20000 x 20000 declared in a 6 kB PNG: refused from its header, before 1.2 GB are decoded.
        (limited, "POST", "/v1/predict", {"content": blank_png(tmp_path / "huge.png", 20000, 20000).read_bytes()}, 413, "20000x20000"),
        (app, "POST", "/v1/predict?ms_flip=maybe", {"content": jpeg}, 422, "ms_flip"),
        (app, "POST", "/v1/predict?format=tiff", {"content": jpeg}, 422, "format"),
        (app, "POST", "/v1/overlay?alpha=2", {"content": jpeg}, 422, "alpha"),
        (app, "GET", "/v1/predict", {}, 405, ""),
        (app, "GET", "/v2/anything", {}, 404, "no such endpoint"),
    ]
    for target, method, url, kwargs, status, words in cases:
        response = call(target, method, url, **kwargs)
        assert response.status_code == status, (url, status, response.text)
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]
        assert words in body["error"], (words, body)
    assert app.state.service.admission.inside == 0  # every refusal left the admission count as it found it


def test_no_request_can_name_a_file_or_a_model_to_load(segmenter):
    """The only inputs a request has are the upload and three query options, none of them a path."""
    spec = call(create_app(segmenter), "GET", "/openapi.json").json()
    parameters = {parameter["name"] for path in spec["paths"].values() for operation in path.values()
                  for parameter in operation.get("parameters", [])}
    assert parameters == {"format", "ms_flip", "alpha"}
    assert set(spec["paths"]) == {"/v1/predict", "/v1/overlay", "/v1/model", "/healthz", "/readyz", "/metrics"}


class BlockingPredictions:
    """Wraps Segmenter.predict so each call waits until the test releases it (a slow model on demand)."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.predict = segmenter.predict
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.release()
        assert self.release.wait(30)
        return self.predict(*args, **kwargs)


def test_a_full_service_answers_503_with_retry_after_at_once(segmenter, monkeypatch):
    blocking = BlockingPredictions(segmenter)
    monkeypatch.setattr(segmenter, "predict", blocking)
    app = create_app(segmenter, ServeSettings(concurrency=1, queue_size=1, retry_after_s=7))
    path = real_samples()[-1]
    data = path.read_bytes()

    async def scenario():
        async with client(app) as http:
            running = asyncio.ensure_future(http.post("/v1/predict", content=data))
            while app.state.service.admission.inside < 1:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(http.post("/v1/predict", content=data))
            while app.state.service.admission.inside < 2:
                await asyncio.sleep(0.01)
            refused = await asyncio.wait_for(http.post("/v1/predict", content=data), 5)  # answered at once
            metrics = (await http.get("/metrics")).text
            blocking.release.set()
            return await running, await waiting, refused, metrics

    running, waiting, refused, metrics = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
    assert "limit of 2 requests" in refused.json()["error"]
    expected = blocking.predict(path)
    for response in (running, waiting):
        assert np.array_equal(np.asarray(png_of(response)), expected)
    assert "seg_predictions_admitted 2" in metrics and "seg_http_requests_in_flight 3" in metrics
    assert app.state.service.admission.inside == 0


def test_micro_batching_predicts_concurrent_requests_in_one_pass_with_the_same_masks(segmenter, monkeypatch):
    from seg.data import build_dataset

    scenes = build_dataset("toy", "val")
    images = [scenes.load(index)["image"] for index in range(4)]
    uploads = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        uploads.append(buffer.getvalue())
    alone = [segmenter.predict(image) for image in images]
    alone_ms = segmenter.predict(images[0], ms_flip=True)
    batches = []
    predict_batch = segmenter.predict_batch
    monkeypatch.setattr(segmenter, "predict_batch", lambda images, **options: batches.append(
        (len(images), options)) or predict_batch(images, **options))
    app = create_app(segmenter, ServeSettings(max_batch=4, batch_wait_ms=500))

    async def scenario():
        async with client(app) as http:
            requests = [http.post("/v1/predict", content=data) for data in uploads]
            requests.append(http.post("/v1/predict?ms_flip=true", content=uploads[0]))
            responses = await asyncio.gather(*requests)
            return responses, (await http.get("/metrics")).text

    responses, metrics = asyncio.run(scenario())
    for index, response in enumerate(responses[:4]):
        assert np.array_equal(np.asarray(png_of(response)), alone[index]), index
    assert np.array_equal(np.asarray(png_of(responses[4])), alone_ms)
    # The four single-scale requests went through the network together; the ms+flip one in a batch of its own.
    assert sorted(batches, key=lambda batch: batch[0]) == [(1, {"ms_flip": True}), (4, {"ms_flip": False})]
    assert 'seg_batches_total{size="4"} 1' in metrics and 'seg_batches_total{size="1"} 1' in metrics


def test_metrics_count_requests_by_status_with_a_latency_histogram(segmenter):
    app = create_app(segmenter)
    data = real_samples()[-1].read_bytes()

    async def scenario():
        async with client(app) as http:
            for _ in range(2):
                assert (await http.post("/v1/predict", content=data)).status_code == 200
            assert (await http.post("/v1/predict", content=b"")).status_code == 400
            assert (await http.get("/nowhere")).status_code == 404
            return (await http.get("/metrics"))

    response = asyncio.run(scenario())
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['seg_http_requests_total{method="POST",path="/v1/predict",status="200"}'] == 2
    assert values['seg_http_requests_total{method="POST",path="/v1/predict",status="400"}'] == 1
    assert values['seg_http_requests_total{method="GET",path="other",status="404"}'] == 1
    histogram = 'seg_http_request_duration_seconds_{}{{path="/v1/predict"{}}}'
    assert values[histogram.format("count", "")] == 3 == values[histogram.format("bucket", ',le="+Inf"')]
    buckets = [value for name, value in values.items() if name.startswith('seg_http_request_duration_seconds_bucket'
                                                                          '{path="/v1/predict"')]
    assert buckets == sorted(buckets) and values[histogram.format("sum", "")] > 0
    assert values["seg_http_requests_in_flight"] == 1  # the metrics request itself
