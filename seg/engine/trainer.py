"""The training loop: DeepLabV3 with SGD + poly LR, gradient accumulation, AMP, DDP with synchronised BN,
periodic validation, atomic checkpoints and exact resume.

Read top to bottom: build data, model, optimiser; resume if asked; then iterate optimizer steps, each over
``accum`` micro-batches, saving ``last.pth`` every ``checkpoint_every`` steps and ``best.pth`` by validation
mIoU. Everything that determines the next step (weights, optimiser and LR state, scaler, RNG states, position
in the epoch) is in the checkpoint, so a killed run resumed with ``--resume auto`` ends with the same weights.
Under ``torchrun --max-restarts`` the same ``--resume auto`` makes restarted workers continue from ``last.pth``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from seg.config import TrainConfig, resolve_pretrained
from seg.data import build_dataset, eval_transforms, train_transforms
from seg.data.class_weights import resolve_class_weights
from seg.data.loader import SeededSampler, build_dataloader
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from seg.models import build_segmentor, set_dropblock_progress

from .checkpoint import (
    describe,
    ensure_writable_directory,
    load_checkpoint,
    remove_partial_checkpoints,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from .determinism import enable_determinism
from .distributed import DistributedContext, StopVote, init_distributed, synchronise_batchnorm
from .evaluator import evaluate
from .inference import InferenceConfig, predict_probabilities
from .loss import Ohem, segmentation_loss
from .lr_schedule import poly_schedule
from .metrics import format_metrics_table
from .plots import (overlay, save_confusion_matrix, save_per_class_iou, save_prediction_panels,
                    save_training_curves)
from .precision import AMP_DTYPES, precision_name, resolve_precision
from .time_budget import BudgetTooShortError, ProbeTimes, events_of_schedule, fit_iterations_to_budget


# Seconds a validation's DataLoader takes to start its workers (not measured by the probe, which runs without).
LOADER_START_S = 1.0

# Test hook, read only by crash_iteration_for_tests(): the tests of torchrun's restarts set it to make one worker die.
TEST_CRASH_VARIABLE = "SEG_TEST_CRASH_AT_ITERATION"


def tensorboard_writer(output_dir: Path):
    """A SummaryWriter into ``output_dir/tensorboard`` when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a dataset smaller than a batch); the message says why."""


def crash_iteration_for_tests(context: DistributedContext) -> Optional[int]:
    """The iteration after which this process must SIGKILL itself, for tests of recovery; None normally.

    Only when ``SEG_TEST_CRASH_AT_ITERATION`` is set, only in the last rank, and only in the first attempt
    (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so the worker ``torchrun`` restarts runs to the end.
    """
    value = os.environ.get(TEST_CRASH_VARIABLE)
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{TEST_CRASH_VARIABLE} must be an iteration number, got {value!r}")
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    return int(value) if first_attempt and context.rank == context.world_size - 1 else None


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """The backbone at the base lr, the heads at ``head_lr_mult`` x (the paper's recipe)."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return [{"params": backbone, "lr": cfg.lr}, {"params": heads, "lr": cfg.lr * cfg.head_lr_mult}]


class Trainer:
    """One training run of ``cfg`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, context: Optional[DistributedContext] = None,
                 started_at: Optional[float] = None) -> None:
        """``started_at``: the ``time.monotonic()`` from which ``cfg.time_budget`` counts (default: now)."""
        self.started_at = time.monotonic() if started_at is None else started_at
        self.context = context or init_distributed(cfg.device)
        ctx = self.context
        if cfg.deterministic:
            enable_determinism(ctx.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank

        self.train_set = build_dataset(
            cfg.dataset, "train", root=cfg.data_root,
            transforms=train_transforms(cfg.crop_size, cfg.base_size, tuple(cfg.scale_range), cfg.cat_max_ratio,
                                        photometric=cfg.photometric),
        )
        self.val_set = build_dataset(cfg.dataset, "val", root=cfg.data_root, transforms=eval_transforms())
        if cfg.val_limit is not None:
            self.val_set.samples = self.val_set.samples[: cfg.val_limit]
        self._requested = cfg  # before derivation: a time budget re-derives the schedule from its probe
        self.cfg = cfg = cfg.resolved(len(self.train_set), ctx.world_size)
        self.steps_per_epoch = (len(self.train_set) // ctx.world_size) // (cfg.batch_size * cfg.accum)
        if self.steps_per_epoch < 1:
            raise TrainingError(
                f"the {cfg.dataset} train split has {len(self.train_set)} images, fewer than one step's "
                f"{cfg.batch_size * cfg.accum * ctx.world_size}; lower --batch-size or --accum"
            )
        self.output_dir = Path(cfg.output_dir)
        if ctx.is_main:  # before the model is built or weights downloaded: fail in seconds, not at the first save
            ensure_writable_directory(self.output_dir, label="--output-dir")

        model = build_segmentor(
            "deeplabv3", backbone=cfg.backbone, num_classes=self.train_set.num_classes,
            output_stride=cfg.output_stride, aux=cfg.aux, pretrained_backbone=resolve_pretrained(cfg),
        )
        if ctx.world_size > 1:
            model = synchronise_batchnorm(model, ctx.device)
        model.to(ctx.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(parameter_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = poly_schedule(self.optimizer, cfg.iters, cfg.poly_power, cfg.warmup_iters)
        if cfg.amp == "auto":  # bf16 where the CPU or GPU has bf16 matrix units, else fp32
            precision = resolve_precision("auto", ctx.device)
            self.amp_dtype = None if precision == torch.float32 else precision
        else:
            self.amp_dtype = AMP_DTYPES[cfg.amp]
        weights, self.class_weights_source = resolve_class_weights(cfg.class_weights, self.train_set,
                                                                   progress=ctx.is_main)
        self.class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32,
                                                                       device=ctx.device) ** cfg.class_weights_power
        self.ohem = Ohem(cfg.ohem_threshold, cfg.ohem_min_kept) if cfg.ohem else None
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
        self.network: nn.Module = model
        if ctx.world_size > 1:
            self.network = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                                   else None)
        if cfg.compile:
            self.network = torch.compile(self.network)

        self.iteration = 0
        self.best_miou = -1.0
        self.last_metrics: Optional[Dict[str, Any]] = None  # of the latest validation, for the pictures
        self.last_metrics_iteration = 0
        self.history: Dict[str, List[Tuple[float, float]]] = {"loss": [], "lr": [], "val mIoU": []}
        self.stop_signal: Optional[int] = None  # set by the handler of this process's SIGTERM/SIGINT
        self._stop_vote = StopVote(ctx.world_size)
        self._first_bad: Optional[torch.Tensor] = None  # first iteration with a non-finite loss (0: none yet)
        self._bad_loss: Optional[torch.Tensor] = None
        self.tensorboard = None  # created on the first log line, on rank 0
        # Unreadable training files replaced under --skip-bad-samples: all of them (reported, in the checkpoint)
        # and this rank's not yet reported ones.
        self.skipped_files: List[str] = []
        self._skipped_unreported: List[str] = []
        self._crash_at = crash_iteration_for_tests(ctx)
        self.sampler = SeededSampler(len(self.train_set), shuffle=True, seed=cfg.seed, drop_last=True)
        self.loader = build_dataloader(self.train_set, cfg.batch_size, train=True, workers=cfg.workers,
                                       seed=cfg.seed, sampler=self.sampler, skip_bad_samples=cfg.skip_bad_samples)

    # --- checkpoints ------------------------------------------------------------------------------------

    def checkpoint_payload(self) -> Dict[str, Any]:
        cfg = self.cfg
        states = [rng_state()]
        if self.context.world_size > 1:
            states = [None] * self.context.world_size
            dist.all_gather_object(states, rng_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "rng": states,
            "best_miou": self.best_miou,
            "skipped_files": list(self.skipped_files),
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
            "config": cfg.to_dict(),
            # What inference needs, so a checkpoint alone rebuilds the predictor.
            "model_config": {"segmentor": "deeplabv3", "backbone": cfg.backbone,
                             "num_classes": self.train_set.num_classes, "output_stride": cfg.output_stride,
                             "aux": cfg.aux},
            "classes": list(self.train_set.classes),
            "palette": self.train_set.palette.tolist(),
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "dataset": cfg.dataset,
        }

    def save(self, name: str) -> Optional[Path]:
        payload = self.checkpoint_payload()  # every rank joins the RNG gather
        if not self.context.is_main:
            return None
        return save_checkpoint(payload, self.output_dir / name)

    def resume(self, source: str) -> bool:
        """Load ``last.pth`` (``auto``, if present) or the given file; False when ``auto`` finds nothing."""
        path = self.output_dir / "last.pth" if source == "auto" else Path(source)
        if source == "auto" and not path.is_file():
            return False
        payload = load_checkpoint(path)
        if self.cfg.time_budget is not None:  # the schedule its probe fixed, not a new one
            self._set_schedule(int(payload["config"]["iters"]))
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.iteration = int(payload["iteration"])
        self.best_miou = float(payload["best_miou"])
        self.skipped_files = list(payload.get("skipped_files", []))
        self.history = {k: [tuple(p) for p in v] for k, v in payload["history"].items()}
        states = payload["rng"]
        if len(states) == self.context.world_size:
            restore_rng_state(states[self.context.rank])
        set_dropblock_progress(self.model, self.iteration / self.cfg.iters)
        return True

    # --- the time budget --------------------------------------------------------------------------------

    def _set_schedule(self, iters: int) -> None:
        """Re-derive the config for ``iters`` steps (validation and checkpoint intervals) and rebuild the lr
        schedule; only before the first step."""
        requested = dataclasses.replace(self._requested, iters=iters, epochs=None)
        self.cfg = requested.resolved(len(self.train_set), self.context.world_size)
        self.scheduler = poly_schedule(self.optimizer, self.cfg.iters, self.cfg.poly_power, self.cfg.warmup_iters)

    def _probe_times(self, warmup_steps: int = 2, timed_steps: int = 6, timed_images: int = 4) -> ProbeTimes:
        """Measure a step, a validation and a checkpoint save on the real model and data, then put back the
        weights, optimiser, scaler and RNG states, so the run starts as if the probe had not happened."""
        cfg, ctx = self.cfg, self.context
        saved_rng = rng_state()
        saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                 copy.deepcopy(self.scaler.state_dict()))
        self.network.train()
        self.sampler.set_epoch(0)
        batches = iter(self.loader)
        step_times = []
        for _ in range(min(warmup_steps + timed_steps, self.steps_per_epoch)):
            tick = time.perf_counter()
            loss = self.train_step(batches)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss.item()  # waits for the device
            step_times.append(time.perf_counter() - tick)
        # The mean, not the median: a step that waits for data counts (the loader's workers share the cores).
        step = statistics.mean(step_times[warmup_steps:] or step_times)
        del batches

        # A validation: after a warm-up pass (first-call costs: kernel choices, padding timings), a few images in
        # the main process give the cost per image (decoding included, which the real validation's workers
        # overlap: an overestimate on the safe side); the largest shard decides, plus the workers' start-up.
        def validation_seconds(count: int) -> float:
            subset = copy.copy(self.val_set)
            subset.samples = self.val_set.samples[:count]
            tick = time.perf_counter()
            self.last_metrics = evaluate(self.model, subset, ctx.device, self._validation_inference(), workers=0,
                                         channels_last=cfg.channels_last, progress=False)
            return time.perf_counter() - tick

        validation_seconds(1)
        count = min(timed_images, len(self.val_set))
        per_image = validation_seconds(count) / count
        validation = per_image * math.ceil(len(self.val_set) / ctx.world_size) + LOADER_START_S
        self.network.train()

        tick = time.perf_counter()
        probe_file = self.save("probe.pth")
        save = time.perf_counter() - tick
        if probe_file is not None:
            probe_file.unlink(missing_ok=True)

        tick = time.perf_counter()
        if ctx.is_main:
            with tempfile.TemporaryDirectory(dir=self.output_dir) as scratch:
                self.draw_pictures(Path(scratch))  # all of them: last_metrics holds the probe's validation
        pictures = time.perf_counter() - tick
        self.last_metrics = None

        self.model.load_state_dict(saved[0])
        self.optimizer.load_state_dict(saved[1])
        self.scaler.load_state_dict(saved[2])
        restore_rng_state(saved_rng)
        return ProbeTimes(step=step, validation=validation, save=save, pictures=pictures,
                          elapsed=time.monotonic() - self.started_at)

    def fit_to_time_budget(self) -> None:
        """Fix ``iters`` so the run, its validations and checkpoints included, ends within ``cfg.time_budget``
        minutes (the rank-0 estimate, shared by every rank)."""
        budget_s = 60.0 * self.cfg.time_budget
        times = self._probe_times()

        def events_for(iters: int) -> Tuple[int, int]:
            planned = dataclasses.replace(self._requested, iters=iters, epochs=None).resolved(
                len(self.train_set), self.context.world_size)
            return events_of_schedule(iters, planned.eval_every, planned.checkpoint_every)

        try:
            iters = fit_iterations_to_budget(budget_s, times, events_for)
        except BudgetTooShortError as error:
            raise TrainingError(str(error)) from None
        if self.context.world_size > 1:
            shared = torch.tensor([iters], dtype=torch.long, device=self.context.device)
            dist.broadcast(shared, src=0)
            iters = int(shared.item())
        self._set_schedule(iters)
        validations, _ = events_for(iters)
        if self.context.is_main:
            print(f"time budget {self.cfg.time_budget:g} min: {times.describe()}, {times.elapsed:.0f} s spent "
                  f"on start-up and the probe -> {iters} iterations, {validations} validation(s)", flush=True)
        self.log({"iteration": 0, "time_budget_min": self.cfg.time_budget, "probe_step_s": times.step,
                  "probe_validation_s": times.validation, "probe_save_s": times.save, "probe_pictures_s": times.pictures,
                  "probe_elapsed_s": times.elapsed, "iters": iters})

    # --- the loop ---------------------------------------------------------------------------------------

    def log(self, record: Dict[str, Any]) -> None:
        """Append ``record`` to log.jsonl (and its numbers to TensorBoard, when installed); rank 0 only."""
        if not self.context.is_main:
            return
        path = self.output_dir / "log.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise TrainingError(f"cannot append to {path}: {describe(error)}") from None
        if self.tensorboard is None:
            self.tensorboard = tensorboard_writer(self.output_dir) or False
        if self.tensorboard:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["iteration"])
            self.tensorboard.flush()

    def _request_stop(self, signum, _frame) -> None:
        self.stop_signal = signum

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over ``accum`` micro-batches; returns the mean loss (a 0-d tensor)."""
        cfg, device = self.cfg, self.context.device
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(cfg.accum):
            batch = next(batches)
            self._skipped_unreported += batch["skipped"]
            image = batch["image"].to(device, non_blocking=True)
            target = batch["mask"].to(device, non_blocking=True)
            if cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            sync = micro == cfg.accum - 1 or not isinstance(self.network, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.network.no_sync():
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = segmentation_loss(self.network(image), target, cfg.aux_weight if cfg.aux else 0.0,
                                             self.class_weights, self.ohem)
                self.scaler.scale(loss / cfg.accum).backward()
            total += loss.detach()
        return total / cfg.accum

    def run(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.context
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)  # left by a save that was killed; never loaded
        resumed = self.resume(cfg.resume) if cfg.resume else False
        if cfg.time_budget is not None and not resumed:
            self.fit_to_time_budget()
        cfg = self.cfg
        if ctx.is_main:
            start = f"resumed at iteration {self.iteration}" if resumed else "from scratch"
            print(f"training DeepLabV3-{cfg.backbone} on {cfg.dataset} ({len(self.train_set)} train / "
                  f"{len(self.val_set)} val images) {start}; total batch {cfg.total_batch} = {cfg.batch_size} "
                  f"x {ctx.world_size} process(es) x {cfg.accum} accumulation, lr {cfg.lr:g} (heads x"
                  f"{cfg.head_lr_mult:g}), {cfg.iters} iterations ({cfg.epochs} epochs), device {ctx.device}, "
                  f"{precision_name(self.amp_dtype)}, backbone {resolve_pretrained(cfg) or 'from random init'}, "
                  f"output {self.output_dir}", flush=True)
            if self.class_weights is not None:
                shown = ", ".join(f"{name} {w:.2f}" for name, w in zip(self.train_set.classes,
                                                                         self.class_weights.tolist()))
                power = f", to the power {cfg.class_weights_power:g}" if cfg.class_weights_power != 1 else ""
                print(f"class weights ({self.class_weights_source}{power}): {shown}", flush=True)
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _loop(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.context
        self.network.train()
        bar = tqdm(total=cfg.iters, initial=self.iteration, desc="train", unit="it", disable=not ctx.is_main,
                   dynamic_ncols=True)
        try:
            return self._iterate(bar)
        finally:
            bar.close()

    def _note_if_not_finite(self, loss: torch.Tensor) -> None:
        """Remember the first iteration whose loss is not finite, on the device: no host sync per iteration."""
        if self._first_bad is None:
            self._first_bad = torch.zeros((), dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        first = (~torch.isfinite(loss)) & (self._first_bad == 0)
        self._first_bad = torch.where(first, self.iteration + 1, self._first_bad)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)

    def _stop_if_loss_was_not_finite(self) -> None:
        """Raise if any rank saw a non-finite loss since the start; runs before every log, validation and save,
        so no checkpoint ever holds the weights that followed it."""
        if self._first_bad is None:
            return
        first_bad = self._first_bad.clone()
        if self.context.world_size > 1:
            # The earliest bad iteration of any rank (0 means none): max over ranks of -iteration, 0 left as 0.
            encoded = torch.where(first_bad > 0, -first_bad, torch.full_like(first_bad, -(2**62)))
            dist.all_reduce(encoded, op=dist.ReduceOp.MAX)
            first_bad = torch.where(encoded > -(2**62), -encoded, torch.zeros_like(encoded))
        iteration = int(first_bad.item())
        if iteration:
            value = self._bad_loss.item() if self._first_bad.item() == iteration else float("nan")
            raise TrainingError(
                f"the loss became {value} at iteration {iteration}; stopped without saving "
                f"(the last good checkpoint in {self.output_dir} is intact); try a lower --lr or --amp off"
            )

    def _report_skipped_files(self) -> None:
        """Log each file replaced under --skip-bad-samples once (stderr and log.jsonl, rank 0, whichever rank met
        it), with the running count. Called by every rank at the same iterations (it gathers across them)."""
        if not self.cfg.skip_bad_samples:
            return
        met = [self._skipped_unreported]
        if self.context.world_size > 1:
            met = [None] * self.context.world_size
            dist.all_gather_object(met, self._skipped_unreported)
        self._skipped_unreported = []
        for message in (m for rank_messages in met for m in rank_messages):
            if message in self.skipped_files:
                continue
            self.skipped_files.append(message)
            if self.context.is_main:
                tqdm.write(f"warning: skipped an unreadable training sample: {message}", file=sys.stderr)
            self.log({"iteration": self.iteration, "skipped_file": message,
                      "skipped_files": len(self.skipped_files)})

    def _iterate(self, bar: tqdm) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.context
        images_per_step = cfg.total_batch
        metrics: Dict[str, Any] = {}
        while self.iteration < cfg.iters:
            epoch, step = divmod(self.iteration, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start=step * cfg.batch_size * cfg.accum)
            batches = iter(self.loader)
            tick, steps_since_tick = time.perf_counter(), 0
            for _ in range(step, self.steps_per_epoch):
                loss = self.train_step(batches)
                self._note_if_not_finite(loss)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.iteration += 1
                steps_since_tick += 1
                set_dropblock_progress(self.model, self.iteration / cfg.iters)
                if self.iteration == self._crash_at:  # test hook: die before this iteration's checkpoint
                    os.kill(os.getpid(), signal.SIGKILL)

                # The signal as every rank sees it: one that arrives after this vote is acted on at the next one.
                stopping = self._stop_vote.agree(self.stop_signal)
                done = self.iteration == cfg.iters
                evaluate_now = self.iteration % cfg.eval_every == 0 or done
                save_now = self.iteration % cfg.checkpoint_every == 0 or done or stopping is not None
                log_now = self.iteration % cfg.log_every == 0 or done
                if log_now or evaluate_now or save_now:
                    self._stop_if_loss_was_not_finite()
                    self._report_skipped_files()

                if log_now:
                    now = time.perf_counter()
                    speed = images_per_step * steps_since_tick / max(now - tick, 1e-9)
                    tick, steps_since_tick = now, 0
                    lr = self.optimizer.param_groups[0]["lr"]
                    value = loss.item()
                    self.history["loss"].append((self.iteration, value))
                    self.history["lr"].append((self.iteration, lr))
                    self.log({"iteration": self.iteration, "epoch": epoch, "loss": value, "lr": lr,
                              "images_per_s": speed})
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                bar.update(1)

                paused = False
                if evaluate_now:
                    metrics = self.validate()
                    paused = True
                if save_now:
                    self.save("last.pth")
                    paused = True
                if paused:  # throughput counts training steps only
                    tick, steps_since_tick = time.perf_counter(), 0
                if stopping is not None:
                    self._stop_vote.wait_for_all()
                    bar.close()
                    if ctx.is_main:
                        print(f"stopped by signal {stopping} at iteration {self.iteration}; "
                              f"{self.output_dir / 'last.pth'} saved; continue with --resume auto", flush=True)
                    return {"interrupted": stopping, "iteration": self.iteration}
                if done:
                    break
        bar.close()
        self.finish()
        return {"iteration": self.iteration, "skipped_files": len(self.skipped_files), **metrics}

    def _validation_inference(self) -> InferenceConfig:
        """Whole images at the training scale (long side = base size), scored at the labels' resolution."""
        return InferenceConfig(amp_dtype=self.amp_dtype, base_size=self.cfg.base_size)

    def validate(self) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.context
        metrics = evaluate(self.model, self.val_set, ctx.device, self._validation_inference(),
                           workers=min(cfg.workers, 2), channels_last=cfg.channels_last, progress=ctx.is_main)
        self.history["val mIoU"].append((self.iteration, metrics["mIoU"]))
        self.last_metrics, self.last_metrics_iteration = metrics, self.iteration
        summary = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}
        self.log({"iteration": self.iteration, **summary,
                  "per_class_IoU": {k: v["IoU"] for k, v in metrics["per_class"].items()}})
        if ctx.is_main:
            tqdm.write(f"validation at iteration {self.iteration}:\n{format_metrics_table(metrics)}")
        if metrics["mIoU"] > self.best_miou and not math.isnan(metrics["mIoU"]):
            self.best_miou = metrics["mIoU"]
            self.save("best.pth")
        self.model.train()
        return metrics

    def draw_pictures(self, directory: Path) -> List[str]:
        """The pictures people judge a run by, into ``directory``: training curves, the last validation's per-class
        IoU and confusion matrix, and image | ground truth | prediction for the first validation image (plus its
        overlay). Returns the file names written."""
        names = ["curves.png"]
        save_training_curves(self.history, directory / "curves.png")
        if self.last_metrics is not None:
            per_class = {name: values["IoU"] for name, values in self.last_metrics["per_class"].items()}
            title = f"validation at iteration {self.last_metrics_iteration}"
            save_per_class_iou(per_class, directory / "per_class_iou.png", title=title)
            save_confusion_matrix(self.last_metrics["confusion_matrix"], self.val_set.classes,
                                  directory / "confusion_matrix.png")
            names += ["per_class_iou.png", "confusion_matrix.png"]
        sample = self.val_set.load(0)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            image = eval_transforms()(sample)["image"][None].to(self.context.device)
            probabilities = predict_probabilities(self.model, image, self._validation_inference())
            prediction = probabilities.argmax(1)[0].cpu().numpy()
        self.model.train(was_training)
        save_prediction_panels(sample["image"], prediction, self.val_set.palette, self.val_set.classes,
                               directory / "prediction_panels.png", ground_truth=sample["mask"],
                               title=f"{Path(sample['path']).name}, iteration {self.iteration}")
        overlay(sample["image"], prediction, self.val_set.palette).save(directory / "prediction_overlay.png")
        return names + ["prediction_panels.png", "prediction_overlay.png"]

    def finish(self) -> None:
        """The pictures and the closing summary (rank 0)."""
        if not self.context.is_main:
            return
        pictures = self.draw_pictures(self.output_dir)
        if self.skipped_files:
            print(f"skipped {len(self.skipped_files)} unreadable training file(s) (--skip-bad-samples); they are "
                  f"listed in {self.output_dir / 'log.jsonl'}", flush=True)
        if self.cfg.time_budget is not None:
            elapsed = time.monotonic() - self.started_at
            print(f"finished in {elapsed / 60:.2f} of the {self.cfg.time_budget:g} min budget", flush=True)
        print(f"best validation mIoU {100 * self.best_miou:.2f}; wrote {self.output_dir / 'best.pth'}, "
              f"{self.output_dir / 'last.pth'}, {', '.join(pictures)}, log.jsonl", flush=True)
