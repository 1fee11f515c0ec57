"""seg.serve.ray_deployment: the service on a local Ray cluster with two replicas, and build_app's arguments.

One cluster for the module (its start, two replicas loading torch and the model, and its end take most of the
time): ``ray.init`` of a local cluster asked for 127.0.0.1 (on Linux Ray 2.60 registers the node under the
machine's address anyway; its token, from the environment, keeps others out and nothing is written to ~/.ray), 2
CPUs, no dashboard, no usage statistics, its sessions under a temporary folder; Serve's HTTP proxy on a free port
of 127.0.0.1. Masks that come back are compared with ``Segmenter.predict`` on the same image, pixel for
pixel, and the ``X-Replica`` header shows that both replicas answered.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray Serve (seg[ray], in the test extra) is not installed")
serve = pytest.importorskip("ray.serve", reason="Ray Serve (seg[ray], in the test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")
ray_deployment = pytest.importorskip("seg.serve.ray_deployment",
                                     reason="the service's dependencies (seg[ray]) are not installed")

REAL_IMAGE = ("data", "cityscapes", "leftImg8bit", "val", "frankfurt", "frankfurt_000000_000294_leftImg8bit.png")
REPLICAS = 2
ROUNDS = 6  # of concurrent requests until both replicas have answered one (a router choosing evenly: 2^-23 odds)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _serve_logs(temp: Path, limit: int = 4000) -> str:
    """The end of the replicas' and controller's logs, for a deployment that failed."""
    logs = sorted(temp.glob("session_*/logs/serve/*.log"))
    text = "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-limit:]}" for path in logs)
    return text[-4 * limit:] or f"(no Serve logs under {temp})"


# ------------------------------------------------------------------------------------ arguments (no cluster)
@pytest.mark.parametrize("args, names", [
    ({"num_replica": "2"}, ["unknown argument num_replica", "num_replicas"]),
    ({"num_replicas": "two"}, ["num_replicas", "'two'"]),
    ({"num_replicas": "0"}, ["num_replicas", "greater than 0"]),
    ({"num_replicas": "2", "max_replicas": "4"}, ["num_replicas", "excludes", "autoscaling"]),
    ({"min_replicas": "1"}, ["needs max_replicas"]),
    ({"min_replicas": "3", "max_replicas": "2"}, ["min_replicas (3) exceeds max_replicas (2)"]),
    ({"target_ongoing_requests": "0", "max_replicas": "2"}, ["target_ongoing_requests"]),
    ({"num_cpus": "-1", "concurrency": "many"}, ["num_cpus", "concurrency", "'many'"]),  # every problem at once
    ({"queue_size": "-1"}, ["queue_size must be a number of at least 0"]),  # ServeSettings' own check
    ({"precision": "int8"}, ["precision", "'int8'"]),
    ({"crop_size": "100000"}, ["crop_size"]),
    ({"settings": "{}"}, ["unknown argument settings"]),
    ({"checkpoint": None}, ["checkpoint"]),
    ({"checkpoint": "outputs/missing/best.pth"}, ["outputs/missing/best.pth does not exist"]),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, names):
    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes(b"x")
    given = {"checkpoint": str(checkpoint), **args}
    given = {key: value for key, value in given.items() if value is not None}
    with pytest.raises(ValueError) as caught:
        ray_deployment.build_app(given)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("seg.serve.ray_deployment: "), message
    for name in names:
        assert name in message, message


def test_arguments_become_deployment_options(tmp_path, monkeypatch):
    from ray.serve import Application

    from seg.engine.precision import PRECISIONS

    (tmp_path / "best.pth").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # a relative checkpoint is made absolute: a replica's working directory differs
    fixed = ray_deployment.parse_args({"checkpoint": "best.pth", "num_replicas": "3", "num_cpus": "2.5",
                                       "queue_size": "2", "concurrency": "2", "max_batch": "4", "precision": "fp32"})
    assert fixed.checkpoint == str(tmp_path / "best.pth")
    assert fixed.settings.queue_size == 2 and fixed.settings.concurrency == 2 and fixed.settings.max_batch == 4
    assert fixed.device == "cpu" and fixed.threads == 2 and fixed.precision == "fp32"
    assert fixed.deployment_options() == {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2.5, "num_gpus": 0.0},
                                          "max_ongoing_requests": 2 * 4 + 2 + ray_deployment.PROBE_HEADROOM}
    scaled = ray_deployment.parse_args({"checkpoint": "owner/model", "min_replicas": "0", "max_replicas": "4",
                                        "target_ongoing_requests": "1.5", "num_gpus": "1"})
    assert scaled.checkpoint == "owner/model" and scaled.device == "cuda"  # a Hub repo id is left as it is
    options = scaled.deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 1.5}
    assert ray_deployment.parse_args({"checkpoint": "best.pth"}).deployment_options()["num_replicas"] == 1
    assert isinstance(ray_deployment.build_app({"checkpoint": "best.pth"}), Application)
    # The builder's precisions are the library's, and no ServeSettings field shadows a deployment argument.
    assert all(ray_deployment.parse_args({"checkpoint": "best.pth", "precision": precision}).precision == precision
               for precision in PRECISIONS)
    assert not set(ray_deployment._SETTINGS) & set(ray_deployment.RayServeArgs.model_fields)


def test_seg_serve_imports_no_ray():
    """Importing seg.serve imports no Ray; the deployment module says what to install when Ray is absent."""
    code = ("import sys\n"
            "import seg.serve, seg.serve.settings\n"
            "assert 'ray' not in sys.modules, 'seg.serve imported ray'\n"
            "sys.modules['ray'] = None\n"
            "try:\n"
            "    import seg.serve.ray_deployment\n"
            "except ImportError as error:\n"
            "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'pip install "seg[ray]"' in result.stdout, result.stdout


# ------------------------------------------------------------------------------------------ a local cluster
@pytest.fixture(scope="module")
def service(discriminating_checkpoint):
    """The base URL of the checkpoint's service on a fresh local Ray cluster, 2 replicas of 0.5 CPU each."""
    temp = Path(tempfile.mkdtemp(prefix="segray-"))  # short: Ray's socket paths live under it
    port = _free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Unset, the mode becomes Ray's default for a new local cluster (token), which ray.init then sets; the token
        # comes from here rather than from a new ~/.ray/auth_token.
        env.delenv("RAY_AUTH_MODE", raising=False)
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        env.delenv("RAY_ADDRESS", raising=False)
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     _temp_dir=str(temp), log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # fp32 on one thread, as the reference below: bf16 convolutions choose their padding path by timing
            # (seg.models.conv), so two processes can round differently; fp32 on one thread sums alike.
            application = ray_deployment.build_app({"checkpoint": str(discriminating_checkpoint),
                                                    "num_replicas": str(REPLICAS), "num_cpus": "0.5",
                                                    "precision": "fp32"})
            try:
                serve.run(application, name="seg", route_prefix="/")
            except Exception as error:
                raise AssertionError(f"the deployment failed: {error}\n{_serve_logs(temp)}") from error
            yield f"http://127.0.0.1:{port}"
        finally:
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()
                shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(discriminating_checkpoint):
    from seg.predictor import Segmenter

    return Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu", precision="fp32")


def on_one_thread(segmenter, images):
    """The masks a replica of one thread computes (the same float sums)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [segmenter.predict(image) for image in images]
    finally:
        torch.set_num_threads(threads)


def test_both_replicas_predict_what_the_segmenter_predicts(service, reference, shared):
    from seg.data import build_dataset

    real = np.asarray(Image.open(shared(*REAL_IMAGE)).convert("RGB"))
    scenes = build_dataset("toy", "val")
    images = [real] + [scenes.load(index)["image"] for index in range(3)]
    expected = on_one_thread(reference, images)
    assert len(np.unique(expected[0])) >= 2, "the real image's mask is constant: a weak check"
    bodies = [_png(image) for image in images]

    def post(index: int):
        files = {"image": (f"image{index}.png", bodies[index], "image/png")}
        response = httpx.post(f"{service}/v1/predict", files=files, timeout=120)
        return index, response

    replicas = set()
    with ThreadPoolExecutor(len(images)) as pool:
        for _ in range(ROUNDS):
            for index, response in pool.map(post, range(len(images))):
                assert response.status_code == 200, response.text
                assert response.headers["content-type"] == "image/png"
                mask = _mask(response.content)
                assert mask.mode == "P" and mask.size == (images[index].shape[1], images[index].shape[0])
                np.testing.assert_array_equal(np.asarray(mask), expected[index])
                palette = np.asarray(mask.getpalette()[: 3 * reference.num_classes]).reshape(-1, 3)
                np.testing.assert_array_equal(palette, reference.palette)
                replicas.add(response.headers[ray_deployment.REPLICA_HEADER])
            if len(replicas) == REPLICAS:
                break
    assert len(replicas) == REPLICAS, f"only replica {replicas} answered {ROUNDS} rounds of concurrent requests"
    status = serve.status().applications["seg"]
    assert status.status == "RUNNING"
    assert status.deployments["seg"].replica_states == {"RUNNING": REPLICAS}

    # JSON, with the image as the raw body: the same mask, and the shares of its classes.
    response = httpx.post(f"{service}/v1/predict", params={"format": "json"}, content=bodies[0],
                          headers={"content-type": "image/png"}, timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    np.testing.assert_array_equal(np.asarray(_mask(base64.b64decode(payload["mask"]))), expected[0])
    counts = np.bincount(expected[0].ravel(), minlength=reference.num_classes)
    assert {entry["id"]: entry["share"] for entry in payload["classes"]} == pytest.approx(
        {index: counts[index] / expected[0].size for index in np.flatnonzero(counts)})
    assert payload["latency_ms"] > 0


def test_model_card_and_probes(service, discriminating_checkpoint):
    from seg.predictor import Segmenter
    from seg.serve.app import create_app
    from seg.serve.settings import DEFAULT_MAX_PIXELS, ServeSettings

    # What one replica describes is what the same app describes in this process, for a model loaded the same way.
    local = Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu", max_pixels=DEFAULT_MAX_PIXELS,
                                      precision="fp32")  # as the service fixture deploys it
    expected = json.loads(json.dumps(create_app(local, ServeSettings()).state.service.model_description()))
    response = httpx.get(f"{service}/v1/model", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == expected
    for path in ("/healthz", "/readyz"):
        response = httpx.get(f"{service}{path}", timeout=30)
        assert response.status_code == 200, (path, response.text)
        assert ray_deployment.REPLICA_HEADER in response.headers
    metrics = httpx.get(f"{service}/metrics", timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    missing = httpx.get(f"{service}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
