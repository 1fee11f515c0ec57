"""Prometheus counters of the service, written in the text exposition format by hand (four families do not
justify a client library): requests by path and status, a latency histogram by path, the requests in flight,
and the micro-batches run by size."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

__all__ = ["LATENCY_BUCKETS", "Metrics", "MetricsMiddleware"]

# Seconds: a health check takes a millisecond, a CPU prediction tenths of a second to seconds, ms+flip on a large
# image tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(pairs: Mapping[str, str]) -> str:
    escaped = (f'{key}="{value}"'.replace("\n", " ") for key, value in pairs.items())
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """What ``GET /metrics`` reports. Updated from the event loop only (no locks)."""

    def __init__(self, known_paths: Iterable[str]) -> None:
        self.known_paths = frozenset(known_paths)
        self.requests: Dict[Tuple[str, str, int], int] = defaultdict(int)
        self.latency_counts: Dict[str, List[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.latency_sum: Dict[str, float] = defaultdict(float)
        self.latency_total: Dict[str, int] = defaultdict(int)
        self.in_flight = 0

    def path_label(self, path: str) -> str:
        """The path, or "other" for paths the app does not serve (so scanners cannot grow the label set)."""
        return path if path in self.known_paths else "other"

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        path = self.path_label(path)
        self.requests[(method, path, status)] += 1
        counts = self.latency_counts[path]
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                counts[index] += 1
        self.latency_sum[path] += seconds
        self.latency_total[path] += 1

    def render(self, batch_sizes: Mapping[int, int] = {}, queued: int = 0) -> str:
        lines = ["# HELP seg_http_requests_total HTTP requests answered, by method, path and status.",
                 "# TYPE seg_http_requests_total counter"]
        for (method, path, status), count in sorted(self.requests.items()):
            lines.append(f"seg_http_requests_total{_labels({'method': method, 'path': path, 'status': str(status)})}"
                         f" {count}")
        lines += ["# HELP seg_http_request_duration_seconds Time from a request's arrival to its response, by path.",
                  "# TYPE seg_http_request_duration_seconds histogram"]
        for path in sorted(self.latency_total):
            for bound, count in zip(LATENCY_BUCKETS, self.latency_counts[path]):
                lines.append(f"seg_http_request_duration_seconds_bucket{_labels({'path': path, 'le': f'{bound:g}'})}"
                             f" {count}")
            lines.append(f"seg_http_request_duration_seconds_bucket{_labels({'path': path, 'le': '+Inf'})} "
                         f"{self.latency_total[path]}")
            lines.append(f"seg_http_request_duration_seconds_sum{_labels({'path': path})} {self.latency_sum[path]:.6f}")
            lines.append(f"seg_http_request_duration_seconds_count{_labels({'path': path})} "
                         f"{self.latency_total[path]}")
        lines += ["# HELP seg_http_requests_in_flight Requests being answered now (this one included).",
                  "# TYPE seg_http_requests_in_flight gauge", f"seg_http_requests_in_flight {self.in_flight}",
                  "# HELP seg_predictions_admitted Prediction requests inside the service (running or waiting).",
                  "# TYPE seg_predictions_admitted gauge", f"seg_predictions_admitted {queued}",
                  "# HELP seg_batches_total Forward passes of micro-batched requests, by batch size.",
                  "# TYPE seg_batches_total counter"]
        for size, count in sorted(batch_sizes.items()):
            lines.append(f"seg_batches_total{_labels({'size': str(size)})} {count}")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI middleware that counts every HTTP request into ``metrics`` (errors and refusals included)."""

    def __init__(self, app: Callable, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # a response that never started is the server's failure

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight -= 1
            path, prefix = scope["path"], scope.get("root_path", "")
            if prefix and path.startswith(prefix):  # behind a proxy or Ray Serve's route prefix
                path = path[len(prefix):] or "/"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - started)
