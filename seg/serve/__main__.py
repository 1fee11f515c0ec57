"""``python -m seg.serve --checkpoint PATH_OR_HUB_ID``: serve a model over HTTP, with its page at ``/``.

Loads the model once, before listening. SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests
in flight (up to ``--drain-timeout`` seconds), then exits. Usage mistakes (a flag's value, the checkpoint, a port
in use, the serve extra not installed) are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
from pathlib import Path

from seg.card import ModelCardError
from seg.cli import ArgumentParser, checkpoint_problem, crop_size_type, flag_message, int_in_range
from seg.config import ConfigError
from seg.engine.checkpoint import CheckpointError
from seg.engine.precision import PRECISIONS
from seg.hub import HubError
from seg.serve.settings import DEFAULT_MAX_PIXELS, ServeSettings

PROG = "python -m seg.serve"
DEFAULTS = ServeSettings()


def positive_megabytes(text: str) -> float:
    """argparse type: a positive number of MiB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of MiB, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of MiB, got {text!r}")
    return value


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--checkpoint", required=True, help="a seg checkpoint, a shared model folder or a Hugging Face Hub repo id")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    add("--port", type=int_in_range(0, 65535), default=8000, help="port (default 8000; 0: any free port)")
    add("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add("--precision", choices=PRECISIONS, default="auto", help="what the model computes in (default auto: bf16 on "
        "CPUs with AMX / AVX-512 BF16 and on bf16 GPUs, else fp32)")
    add("--crop-size", type=crop_size_type, help="slide window for ms+flip and large images (default: the "
        "training crop)")
    add("--max-pixels", type=int_in_range(1), default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images (413), read from the header before decoding (default {DEFAULT_MAX_PIXELS})")
    add("--max-upload-mb", type=positive_megabytes, default=DEFAULTS.max_upload_bytes / 2**20,
        help=f"refuse larger uploads (413) before reading them whole (default {DEFAULTS.max_upload_bytes // 2**20})")
    add("--concurrency", type=int_in_range(1), default=DEFAULTS.concurrency,
        help=f"predictions at once (default {DEFAULTS.concurrency}: on a CPU one uses every core)")
    add("--queue", type=int_in_range(0), default=DEFAULTS.queue_size,
        help=f"requests that may wait; more get 503 with Retry-After (default {DEFAULTS.queue_size})")
    add("--max-batch", type=int_in_range(1), default=DEFAULTS.max_batch,
        help="micro-batching: predict up to this many concurrent requests in one forward pass (default 1: off)")
    add("--batch-wait-ms", type=float, default=DEFAULTS.batch_wait_ms,
        help=f"how long a batch's first request waits for others (default {DEFAULTS.batch_wait_ms:g})")
    add("--drain-timeout", type=int_in_range(1), default=30,
        help="on SIGTERM, seconds to let requests in flight finish (default 30)")
    add("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
        help="uvicorn's log level; info logs each request (default info)")
    return p


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the model loads, so a port in use is a one-line error at once, not after a minute."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror})") from None
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        import uvicorn

        from seg.serve.app import create_app
    except ImportError as error:
        print(f"error: {PROG} needs the serve extra ({error.name} is missing): pip install \"seg[serve]\"",
              file=sys.stderr)
        return 2
    problem = checkpoint_problem(Path(args.checkpoint))
    if problem:
        p.error(f"--checkpoint {problem}")
    try:
        settings = ServeSettings(max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)),
                                 concurrency=args.concurrency, queue_size=args.queue, max_batch=args.max_batch,
                                 batch_wait_ms=args.batch_wait_ms)
    except ConfigError as error:
        p.error(flag_message(error, {"queue_size": "--queue"}))
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from seg.predictor import Segmenter

    def load() -> Segmenter:
        return Segmenter.from_pretrained(args.checkpoint, device=args.device, precision=args.precision,
                                         max_pixels=args.max_pixels, crop_size=args.crop_size)

    try:
        app = create_app(load, settings)  # loads the model once, on the prediction thread
    except (CheckpointError, HubError, ModelCardError) as error:
        print(f"error: --checkpoint: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"error: {flag_message(error)}", file=sys.stderr)
        return 2
    service = app.state.service
    segmenter = service.segmenter

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose SIGTERM also turns /readyz to 503 while the requests in flight finish."""

        def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
            service.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            server_header=False)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {segmenter.dataset or 'a'} model ({segmenter.num_classes} classes, {segmenter.precision} on "
          f"{segmenter.device}) at http://{url_host}:{port}/ (open it in a browser; POST images to /v1/predict)",
          flush=True)
    DrainingServer(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
