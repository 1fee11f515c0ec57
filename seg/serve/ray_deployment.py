"""The service of :mod:`seg.serve.app` on Ray Serve: the same FastAPI app on several replicas behind Ray's HTTP
proxy (``pip install "seg[ray]"``: Ray 2.56 or later, whose ingress builds an app on the replica; this text
follows Ray 2.60).

A local cluster, then the application::

    ray get-auth-token --generate > /dev/null      # once: writes ~/.ray/auth_token, so the cluster uses tokens
    ray start --head --node-ip-address=127.0.0.1   # a one-node cluster
    serve run seg.serve.ray_deployment:build_app checkpoint=outputs/ade20k_resnest101/best.pth num_replicas=2
    curl -F image=@room.jpg http://127.0.0.1:8000/v1/predict -o mask.png

``serve run`` finds the cluster that ``ray start`` started on this machine (another one: ``--address HOST:6379``
or ``RAY_ADDRESS``, with ``RAY_AUTH_MODE=token`` in the environment if that cluster uses tokens; no cluster at
all: it starts a private one), deploys, streams the replicas' logs and on Ctrl-C deletes the application and
stops Serve. Stop the cluster itself with ``ray stop``. Ray's HTTP proxy listens on 127.0.0.1:8000 unless ``serve
start --http-host 0.0.0.0 --http-port 8080`` ran first; every response carries ``X-Replica``, the id of the
replica that answered. Ray's own ports are another matter: on Linux Ray 2.60 replaces a loopback
``--node-ip-address`` by the machine's address and its GCS and raylet listen on every interface, so the token
is what keeps others out (without one ``ray start`` runs the cluster unauthenticated, and says so).

Arguments (``key=value`` after the import path, or ``args:`` in a ``serve deploy`` config file); an unknown or
unusable one stops ``serve run`` with a one-line error before anything is deployed:

* ``checkpoint`` (required): a ``seg`` checkpoint file, a :meth:`~seg.predictor.Segmenter.save_pretrained` folder
  or a Hub repo id (``revision``: its branch, tag or commit). A local path is made absolute; on a cluster of
  several machines it must exist on each of them (and ``seg`` be installed on each), or use a Hub repo id.
* A fixed size: ``num_replicas=N`` (default 1) runs N replicas for as long as the application runs.
* Or autoscaling: ``min_replicas`` (default 1; 0 lets the application scale to zero when idle, the next request
  then waits for a replica to load), ``max_replicas`` (required) and ``target_ongoing_requests`` (Ray's default:
  2). Ray Serve adds replicas while the requests running or waiting per replica stay above the target (after
  ``upscale_delay_s``, 30 s) and removes them while below (after ``downscale_delay_s``, 600 s); replicas it cannot
  place wait for resources (or for Ray's cluster autoscaler to add a node). ``num_replicas`` and the autoscaling
  arguments exclude each other.
* ``num_cpus`` (default 1) and ``num_gpus`` (default 0): what Ray reserves for each replica. A replica computes
  with ``max(1, floor(num_cpus))`` threads, on CUDA exactly when ``num_gpus`` > 0 (Ray 2.60 no longer hides the
  GPUs from a replica that reserves none, so the device is set explicitly).
* ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``), ``crop_size`` (the slide window) and ``max_pixels``
  (default :data:`~seg.serve.settings.DEFAULT_MAX_PIXELS`): as the flags of ``python -m seg.serve``.
* The fields of :class:`~seg.serve.settings.ServeSettings`: ``max_upload_bytes``, ``concurrency``,
  ``queue_size``, ``max_batch``, ``batch_wait_ms``, ``retry_after_s``.

Each replica loads its own :class:`~seg.predictor.Segmenter` (in the replica's constructor) and builds its own app
with :func:`~seg.serve.app.create_app`, so each applies its own ServeSettings limits: the cluster admits
``replicas x ServeSettings.admitted`` requests at once (``concurrency x max_batch`` running plus ``queue_size``
waiting, per replica; with autoscaling, replicas = those running now), and a replica that is full answers 503 with
Retry-After as a single process does. Ray Serve sends one replica at most ``max_ongoing_requests`` requests at once;
it is set to ``admitted + 4`` so the replica's own limits are the ones that act (and probes such as ``/healthz``
and ``/metrics`` still get through to a full replica) rather than requests waiting in Ray's proxy, whose queue
(``max_queued_requests``) is unbounded.
``/metrics`` and ``/readyz`` describe the replica that answers; Ray routes only to replicas that are ready.

The app is built when a replica starts, as Ray Serve's ingress supports it: :func:`ray.serve.ingress` without an
app, and the deployment's ``__serve_build_asgi_app__``, which Ray calls after the constructor. The app starts its
work lazily and needs no lifespan events.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Dict, List, Mapping, Optional

try:
    from ray import serve
except ImportError as error:  # pragma: no cover - exercised in a subprocess without ray
    raise ImportError(f"seg.serve.ray_deployment needs Ray Serve: pip install \"seg[ray]\" ({error})") from None

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      TypeAdapter, ValidationError, field_validator)

from seg.cli import MAX_CROP_SIZE, checkpoint_problem
from seg.engine.precision import PRECISIONS
from seg.hub import is_repo_id
from seg.serve.settings import DEFAULT_MAX_PIXELS, ServeSettings

__all__ = ["REPLICA_HEADER", "RayServeArgs", "SegmentationIngress", "build_app", "parse_args"]

REPLICA_HEADER = "X-Replica"
# Requests beyond ServeSettings.admitted that Ray may still hand a replica: its probes and its own 503s.
PROBE_HEADROOM = 4
_SETTINGS = tuple(field.name for field in dataclasses.fields(ServeSettings))


class RayServeArgs(BaseModel):
    """The arguments of :func:`build_app` (module docstring), ServeSettings' fields gathered in ``settings``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    checkpoint: str
    revision: Optional[str] = None
    num_replicas: Optional[PositiveInt] = None
    min_replicas: Optional[NonNegativeInt] = None
    max_replicas: Optional[PositiveInt] = None
    target_ongoing_requests: Optional[PositiveFloat] = None
    num_cpus: NonNegativeFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0
    precision: str = "auto"
    crop_size: Optional[Annotated[int, Field(ge=1, le=MAX_CROP_SIZE)]] = None
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    settings: ServeSettings = ServeSettings()

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value not in PRECISIONS:
            raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
        return value

    @property
    def autoscaling(self) -> bool:
        return any(value is not None for value in (self.min_replicas, self.max_replicas,
                                                   self.target_ongoing_requests))

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.num_cpus))

    def deployment_options(self) -> Dict[str, Any]:
        """The keyword arguments of ``Deployment.options`` for these arguments."""
        options: Dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.settings.admitted + PROBE_HEADROOM,
        }
        if self.autoscaling:
            autoscaling: Dict[str, Any] = {"min_replicas": 1 if self.min_replicas is None else self.min_replicas,
                                           "max_replicas": self.max_replicas}
            if self.target_ongoing_requests is not None:
                autoscaling["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = autoscaling
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


def _problems(error: ValidationError) -> List[str]:
    """pydantic's problems, each one line: ``num_replicas: Input should be a valid integer (got 'two')``."""
    problems = []
    for problem in error.errors():
        message = " ".join(str(problem.get("msg", "invalid")).removeprefix("Value error, ").split())
        if "input" in problem and not isinstance(problem["input"], Mapping):
            message += f" (got {problem['input']!r})"
        where = ".".join(str(part) for part in problem.get("loc", ()))
        problems.append(f"{where}: {message}" if where else message)  # ServeSettings' own checks name the field
    return problems


def parse_args(args: Mapping[str, Any]) -> RayServeArgs:
    """``serve run`` arguments (strings, or typed values from a config file) -> :class:`RayServeArgs`; raises
    ValueError with one line naming every unknown or unusable argument."""
    known = tuple(RayServeArgs.model_fields.keys() - {"settings"}) + _SETTINGS
    unknown = sorted(str(key) for key in args if key not in known)
    if unknown:
        raise ValueError(f"seg.serve.ray_deployment: unknown argument{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")
    problems: List[str] = []
    settings = ServeSettings()
    try:
        settings = TypeAdapter(ServeSettings).validate_python({key: args[key] for key in _SETTINGS if key in args})
    except ValidationError as error:
        problems += _problems(error)
    except ValueError as error:  # a ServeSettings check that pydantic lets through
        problems.append(" ".join(str(error).split()))
    try:
        config = RayServeArgs.model_validate({**{key: value for key, value in args.items() if key not in _SETTINGS},
                                              "settings": settings})
    except ValidationError as error:
        problems += _problems(error)
    if problems:
        raise ValueError(f"seg.serve.ray_deployment: {'; '.join(problems)}")
    if config.num_replicas is not None and config.autoscaling:
        raise ValueError("seg.serve.ray_deployment: num_replicas (a fixed size) excludes min_replicas, max_replicas "
                         "and target_ongoing_requests (autoscaling); give one or the other")
    if config.autoscaling and config.max_replicas is None:
        raise ValueError("seg.serve.ray_deployment: autoscaling needs max_replicas")
    if config.autoscaling and (1 if config.min_replicas is None else config.min_replicas) > config.max_replicas:
        raise ValueError(f"seg.serve.ray_deployment: min_replicas ({config.min_replicas}) exceeds max_replicas "
                         f"({config.max_replicas})")
    return config.model_copy(update={"checkpoint": _model_source(config.checkpoint)})


def _model_source(checkpoint: str) -> str:
    """An existing local path made absolute (a replica's working directory is not the caller's), or a Hub id."""
    path = Path(checkpoint).expanduser()
    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"seg.serve.ray_deployment: checkpoint: {problem}")
    if path.exists():
        return str(path.resolve())
    if is_repo_id(checkpoint):
        return checkpoint
    raise ValueError(f"seg.serve.ray_deployment: checkpoint: {checkpoint} does not exist; expected a checkpoint "
                     f"file, a model folder or a Hub repo id (owner/name)")


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode("latin-1"), replica.encode("latin-1"))

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.ingress()
class SegmentationIngress:
    """One replica: its Segmenter, loaded here, and the app of :func:`~seg.serve.app.create_app` around it."""

    def __init__(self, source: str, revision: Optional[str], device: str, precision: str,
                 crop_size: Optional[int], max_pixels: int, threads: int, settings: ServeSettings) -> None:
        import torch

        from seg.predictor import Segmenter
        from seg.serve.app import create_app

        def load() -> Segmenter:
            return Segmenter.from_pretrained(source, revision, device=device, precision=precision,
                                             max_pixels=max_pixels, crop_size=crop_size)

        torch.set_num_threads(threads)
        # The app loads the model on its prediction thread, where predictions are fastest (seg.serve.app).
        self.service_app = create_app(load, settings)
        self.service_app.add_middleware(_ReplicaHeader, replica=serve.get_replica_context().replica_tag)

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve calls it once, after __init__, on the replica
        return self.service_app


SegmentationDeployment = serve.deployment(name="seg")(SegmentationIngress)


def build_app(args: Dict[str, Any]) -> "serve.Application":
    """The application builder of ``serve run seg.serve.ray_deployment:build_app key=value ...`` (module
    docstring); raises ValueError (one line) for unknown or unusable arguments."""
    config = parse_args(args)
    return SegmentationDeployment.options(**config.deployment_options()).bind(
        config.checkpoint, config.revision, config.device, config.precision, config.crop_size, config.max_pixels,
        config.threads, config.settings)
