"""The service's limits, one frozen dataclass that the command line, the app and the Ray deployment share."""

from __future__ import annotations

from dataclasses import dataclass, fields

from seg.config import ConfigError

__all__ = ["DEFAULT_MAX_PIXELS", "ServeSettings"]

# A served image is held as RGB, its mask, and C x H x W float32 probabilities with --ms-flip: 20 megapixels (a
# 5472 x 3648 photo) bounds one request to a few GB with 150 classes. The library's default (100 MP) is for files
# one trusts; an upload is not one.
DEFAULT_MAX_PIXELS = 20_000_000


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one service process (with Ray Serve: of one replica).

    Attributes:
        max_upload_bytes: a larger body is refused with 413 before it is read to the end.
        concurrency: predictions that run at once (threads sharing the model; on a CPU one uses every core).
        queue_size: requests that may wait for a free slot; beyond ``concurrency + queue_size`` the service answers
            503 with Retry-After at once rather than letting clients hang.
        max_batch: above 1, requests that arrive within ``batch_wait_ms`` of each other are predicted in one
            forward pass (micro-batching; bench/RESULTS.md says when it pays).
        batch_wait_ms: how long the first request of a batch waits for company.
        retry_after_s: the Retry-After of a 503.
    """

    max_upload_bytes: int = 32 * 2**20
    concurrency: int = 1
    queue_size: int = 8
    max_batch: int = 1
    batch_wait_ms: float = 5.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            lowest = 0 if field.name in ("queue_size", "batch_wait_ms") else 1
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < lowest:
                raise ConfigError(field.name, f"must be a number of at least {lowest}, got {value!r}")

    @property
    def admitted(self) -> int:
        """Requests in the service at once (running or waiting); one more is answered 503."""
        return self.concurrency * self.max_batch + self.queue_size
