"""Load test of ``python -m seg.serve`` on loopback, beside the bare ``Segmenter.predict`` on the same image:
``python bench/serve_load.py``.

Each case starts a fresh service process (uvicorn, the real command line) and drives it from this process with
``--clients`` concurrent clients of ``--requests`` sequential requests each (a 503 is counted and the client goes
on at once). Cases:

- ``sequential``: one client; the service's overhead is each request's round trip minus the model's time in
  the service (its ``Server-Timing: predict``), the median over requests (HTTP, decoding the upload, encoding
  the PNG, threads); the round trip minus the bare predict time is printed too, but it also holds the
  machine's drift between the two measurements (the bare predict is timed before and after the cases);
- ``under the limit``: ``--queue`` >= the clients, so no request may fail;
- ``above the limit``: a queue of 2 for more clients: the surplus must get 503 (and only 503);
- ``micro-batching``: ``--max-batch`` = the clients, concurrent requests in one forward pass.

It prints a table (latency p50/p95, throughput, errors by status, throughput relative to the bare predict loop)
and ``--json`` writes the numbers. Without ``--checkpoint`` the model is DeepLabV3-ResNeSt14 with 150 classes
(ADE20K's) and random weights: speed does not depend on the weights. The image is a real ADE20K validation
photo resized to ``--size`` square when ../shared/data is there, else a toy scene.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "ade20k" / "ADEChallengeData2016" / "images" / "validation" / \
    "ADE_val_00000001.jpg"
CASES = ("sequential", "under the limit", "above the limit", "micro-batching")


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_checkpoint(folder: Path, backbone: str, classes: int, size: int) -> Path:
    """A seg checkpoint of DeepLabV3-``backbone`` with ``classes`` classes and random weights, trained size
    ``size`` (so a ``size`` x ``size`` image is predicted at its own size)."""
    from seg.card import ModelCard
    from seg.engine.checkpoint import save_checkpoint
    from seg.models import build_segmentor

    torch.manual_seed(0)
    card = ModelCard(segmentor="deeplabv3", backbone=backbone, num_classes=classes,
                     classes=[f"class{index}" for index in range(classes)],
                     palette=[((37 * index) % 256, (91 * index) % 256, (173 * index) % 256) for index in range(classes)],
                     dataset="bench", crop_size=size, base_size=size)
    model = build_segmentor(**card.builder_arguments()).eval()
    return save_checkpoint({"model": model.state_dict(), "config": {"dataset": "bench"}, "card": card.to_dict()},
                           folder / "bench.pth")


def bench_image(size: int, sample: Path) -> bytes:
    if sample.is_file():
        image = Image.open(sample).convert("RGB").resize((size, size), Image.BILINEAR)
    else:
        from seg.data import build_dataset

        image = Image.fromarray(build_dataset("toy", "val").load(0)["image"]).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def bare_predict_seconds(checkpoint: Path, data: bytes, repeats: int) -> float:
    """Median seconds of Segmenter.predict on the decoded image (the model's work alone)."""
    from seg.data.io import decode_image
    from seg.predictor import Segmenter

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    rgb = decode_image(data)
    for _ in range(2):
        segmenter.predict(rgb)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        segmenter.predict(rgb)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(checkpoint: Path, port: int, flags: List[str]) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "seg.serve", "--checkpoint", str(checkpoint), "--port",
                                str(port), "--device", "cpu", "--log-level", "warning", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the service did not become ready within 180 s")


async def drive(port: int, data: bytes, clients: int, requests: int) -> Dict[str, object]:
    import httpx

    latencies: List[float] = []
    outside_model: List[float] = []  # round trip minus the model's own time (the service's Server-Timing predict)
    statuses: Dict[int, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as http:
        await http.post("/v1/predict", content=data)  # warm-up, not counted

        async def client() -> None:
            for _ in range(requests):
                started = time.perf_counter()
                response = await http.post("/v1/predict", content=data)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    timings = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
                    outside_model.append(latencies[-1] - float(timings["predict"]) / 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
    ok = statuses.get(200, 0)
    quantiles = np.percentile(latencies, [50, 95]) if latencies else [float("nan")] * 2
    return {"clients": clients, "requests": requests, "ok": ok, "statuses": statuses,
            "p50_ms": float(quantiles[0]) * 1000, "p95_ms": float(quantiles[1]) * 1000, "seconds": wall,
            "outside_model_p50_ms": float(np.median(outside_model)) * 1000 if outside_model else float("nan"),
            "throughput": ok / wall}


def run_case(case: str, checkpoint: Path, data: bytes, clients: int, requests: int) -> Dict[str, object]:
    flags = {"sequential": ["--queue", "1"],
             "under the limit": ["--queue", str(clients)],
             "above the limit": ["--queue", "2"],
             "micro-batching": ["--queue", str(clients), "--max-batch", str(clients), "--batch-wait-ms", "20"]}[case]
    port = free_port()
    process = start_service(checkpoint, port, flags)
    try:
        result = asyncio.run(drive(port, data, 1 if case == "sequential" else clients,
                                   max(requests, 10) if case == "sequential" else requests))
    finally:
        process.terminate()
        process.wait(60)
    return {"case": case, "flags": " ".join(flags), **result}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a seg checkpoint (default: random DeepLabV3-ResNeSt14)")
    p.add_argument("--backbone", default="resnest14")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--size", type=int, default=512, help="the square image side (default 512)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="sequential requests per client (default 50)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="the photo to resize (default: ADE20K's)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown case(s) {', '.join(unknown)}; expected some of {', '.join(CASES)}")

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or bench_checkpoint(Path(folder), args.backbone, args.classes, args.size)
        data = bench_image(args.size, args.sample)
        bare_before = bare_predict_seconds(checkpoint, data, repeats=10)
        rows = [run_case(case, checkpoint, data, args.clients, args.requests) for case in cases]
        bare_after = bare_predict_seconds(checkpoint, data, repeats=10)  # the machine's drift over the run
        bare = (bare_before + bare_after) / 2

    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); {args.size}x{args.size} JPEG, {args.checkpoint or f'DeepLabV3-{args.backbone}, {args.classes} classes'}")
    print(f"bare Segmenter.predict: {bare * 1000:.1f} ms/image = {1 / bare:.2f} images/s (before the cases "
          f"{bare_before * 1000:.1f} ms, after {bare_after * 1000:.1f} ms)")
    print("| case | service flags | clients x requests | 200 | other statuses | p50 ms | p95 ms | images/s | "
          "vs bare predict | p50 outside the model, ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        others = ", ".join(f"{status}: {count}" for status, count in sorted(row["statuses"].items()) if status != 200)
        row["vs_bare"] = row["throughput"] * bare
        print(f"| {row['case']} | {row['flags']} | {row['clients']} x {row['requests']} | {row['ok']} | "
              f"{others or 'none'} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['throughput']:.2f} | "
              f"{row['vs_bare']:.2f} | {row['outside_model_p50_ms']:.1f} |")
    sequential = next((row for row in rows if row["case"] == "sequential"), None)
    if sequential:
        print(f"service overhead per request, sequential: {sequential['outside_model_p50_ms']:.1f} ms outside the "
              f"model (round trip - the service's own predict time, per request); round-trip p50 - bare predict: "
              f"{sequential['p50_ms'] - bare * 1000:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"bare_predict_ms": bare * 1000, "bare_predict_before_ms": bare_before * 1000,
                                         "bare_predict_after_ms": bare_after * 1000, "cases": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
