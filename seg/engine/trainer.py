"""The training loop: DeepLabV3 with SGD + poly LR, gradient accumulation, AMP, DDP with synchronised BN,
periodic validation, atomic checkpoints and exact resume.

Read top to bottom: build data, the model card, the model and its optimiser; resume if asked (or fit the schedule
to a time budget); then iterate optimizer steps, each over ``accum`` micro-batches, saving ``last.pth`` every
``checkpoint_every`` steps and ``best.pth`` by validation mIoU. Everything that determines the next step (weights,
optimiser and LR state, scaler, RNG states, position in the epoch) is in the checkpoint (the training section of
:mod:`seg.engine.checkpoint`), so a killed run resumed with ``resume = "auto"`` ends with the same weights. Under
``torchrun --max-restarts`` the same setting makes restarted workers continue from ``last.pth``.

The side concerns are collaborators of their own: :class:`~seg.engine.run_log.RunLog` (``log.jsonl``, TensorBoard),
:class:`~seg.engine.loss_guard.LossGuard` (a non-finite loss stops the run before anything is saved),
:class:`~seg.engine.skipped_files.SkippedFiles` (``skip_bad_samples``) and
:class:`~seg.engine.stop_signals.StopSignals` (SIGTERM/SIGINT, agreed by every rank). :attr:`Trainer.after_step_hooks`
is the extension point after each optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from seg.card import CardMetrics, ModelCard
from seg.config import TrainConfig, resolve_pretrained
from seg.data import build_dataset, eval_transforms, train_transforms
from seg.data.class_weights import resolve_class_weights
from seg.data.loader import SeededSampler, build_dataloader
from seg.models import build_segmentor, set_dropblock_progress

from .budget_probe import fit_to_time_budget
from .checkpoint import (
    ensure_writable_directory,
    every_rank_rng_state,
    load_checkpoint,
    remove_partial_checkpoints,
    restore_training_checkpoint,
    save_checkpoint,
    scheduled_iterations,
    training_checkpoint,
)
from .determinism import enable_determinism
from .distributed import DistributedContext, init_distributed, synchronise_batchnorm
from .errors import TrainingError
from .evaluator import evaluate
from .inference import InferenceOptions, describe_inference, resolve_inference, test_scales_for
from .loss import Ohem, segmentation_loss
from .loss_guard import LossGuard
from .lr_schedule import poly_schedule
from .metrics import format_metrics_table
from .precision import autocast_dtype, precision_name
from .run_log import RunLog
from .run_pictures import draw_run_pictures
from .skipped_files import SkippedFiles
from .stop_signals import StopSignals

__all__ = ["Trainer", "TrainingError", "parameter_groups"]

# The segmentor trained here (backbone, output stride and auxiliary head are settings); the model card names it.
SEGMENTOR = "deeplabv3"


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """The backbone at the base lr, the heads at ``head_lr_mult`` x (the paper's recipe)."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return [{"params": backbone, "lr": cfg.lr}, {"params": heads, "lr": cfg.lr * cfg.head_lr_mult}]


class Trainer:
    """One training run of ``cfg`` (see the module docstring).

    ``after_step_hooks``: callables ``hook(trainer)`` run after every optimizer step, once ``trainer.iteration``
    counts it and before that step's stop vote, log, validation and checkpoint (a hook that ends the process
    therefore leaves the previous checkpoint as the last one). The class attribute holds process-wide hooks, run by
    every trainer (a script around ``seg.train.main`` appends to it); assign a list to one trainer for its own.
    """

    after_step_hooks: List[Callable[["Trainer"], None]] = []

    def __init__(self, cfg: TrainConfig, context: Optional[DistributedContext] = None,
                 started_at: Optional[float] = None) -> None:
        """``started_at``: the ``time.monotonic()`` from which ``cfg.time_budget`` counts (default: now)."""
        self.started_at = time.monotonic() if started_at is None else started_at
        self.context = ctx = context or init_distributed(cfg.device)
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
                f"{cfg.batch_size * cfg.accum * ctx.world_size}; lower batch_size or accum"
            )
        self.output_dir = Path(cfg.output_dir)
        if ctx.is_main:  # before the model is built or weights downloaded: fail in seconds, not at the first save
            ensure_writable_directory(self.output_dir, label="output_dir")

        # What the model is: it is built from its card, and every checkpoint carries the card.
        self.card = ModelCard.for_dataset(
            self.train_set, segmentor=SEGMENTOR, backbone=cfg.backbone, output_stride=cfg.output_stride, aux=cfg.aux,
            crop_size=cfg.crop_size, base_size=cfg.base_size, test_scales=test_scales_for(cfg.dataset),
        )
        model = build_segmentor(**self.card.builder_arguments(), pretrained_backbone=resolve_pretrained(cfg))
        if ctx.world_size > 1:
            model = synchronise_batchnorm(model, ctx.device)
        model.to(ctx.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(parameter_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = poly_schedule(self.optimizer, cfg.iters, cfg.poly_power, cfg.warmup_iters)
        self.amp_dtype = autocast_dtype(cfg.amp, ctx.device)  # auto: bf16 where there are bf16 units, else fp32
        # Validation (and the pictures): whole images at the training scale, scored at the labels' resolution.
        self.validation_inference = resolve_inference(self.card, InferenceOptions(amp_dtype=self.amp_dtype))
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
        self.history: Dict[str, List[Tuple[float, float]]] = {"loss": [], "lr": [], "val mIoU": []}
        self.last_metrics: Optional[Dict[str, Any]] = None  # of the latest validation, for the pictures
        self.last_metrics_iteration = 0
        self.run_log = RunLog(self.output_dir, enabled=ctx.is_main)
        self.loss_guard = LossGuard(ctx.world_size, self.output_dir)
        self.skipped = SkippedFiles(cfg.skip_bad_samples, ctx.world_size, ctx.is_main, self.run_log.write)
        self.stop_signals = StopSignals(ctx.world_size)  # a collective under DDP, as DDP's construction above
        self.sampler = SeededSampler(len(self.train_set), shuffle=True, seed=cfg.seed, drop_last=True)
        self.loader = build_dataloader(self.train_set, cfg.batch_size, train=True, workers=cfg.workers,
                                       seed=cfg.seed, sampler=self.sampler, skip_bad_samples=cfg.skip_bad_samples)

    # --- checkpoints ------------------------------------------------------------------------------------

    def save(self, name: str) -> Optional[Path]:
        """Write the training checkpoint ``output_dir/name`` on rank 0 (every rank joins the RNG gather)."""
        rng = every_rank_rng_state(self.context.world_size)
        if not self.context.is_main:
            return None
        payload = training_checkpoint(
            card=self.card, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            iteration=self.iteration, rng=rng, best_miou=self.best_miou, skipped_files=self.skipped.reported,
            history=self.history, config=self.cfg.to_dict(),
        )
        return save_checkpoint(payload, self.output_dir / name)

    def resume(self, source: str) -> bool:
        """Load ``last.pth`` (``auto``, if present) or the given file; False when ``auto`` finds nothing."""
        path = self.output_dir / "last.pth" if source == "auto" else Path(source)
        if source == "auto" and not path.is_file():
            return False
        payload = load_checkpoint(path)
        if self.cfg.time_budget is not None:  # the schedule its probe fixed, not a new one
            self.set_schedule(scheduled_iterations(payload))
        progress = restore_training_checkpoint(
            payload, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            rank=self.context.rank, world_size=self.context.world_size, source=path,
        )
        self.iteration, self.best_miou, self.history = progress.iteration, progress.best_miou, progress.history
        self.skipped.reported = progress.skipped_files
        self.card = self.card.replace(metrics=progress.metrics)  # the latest validation's, until the next one
        set_dropblock_progress(self.model, self.iteration / self.cfg.iters)
        return True

    # --- the schedule -----------------------------------------------------------------------------------

    def config_for(self, iters: int) -> TrainConfig:
        """The resolved config of this run with ``iters`` steps (its validation and checkpoint intervals)."""
        return dataclasses.replace(self._requested, iters=iters, epochs=None).resolved(
            len(self.train_set), self.context.world_size)

    def set_schedule(self, iters: int) -> None:
        """Switch to ``iters`` steps (config and lr schedule); only before the first step. A time budget's probe
        (:mod:`seg.engine.budget_probe`) and resuming a budgeted run set it."""
        self.cfg = self.config_for(iters)
        self.scheduler = poly_schedule(self.optimizer, self.cfg.iters, self.cfg.poly_power, self.cfg.warmup_iters)

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        """Train to ``cfg.iters``; returns the final iteration, skipped-file count and last validation's metrics,
        or ``{"interrupted": signal, "iteration": ...}`` when a SIGTERM/SIGINT stopped it (``last.pth`` saved)."""
        cfg, ctx = self.cfg, self.context
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)  # left by a save that was killed; never loaded
        resumed = self.resume(cfg.resume) if cfg.resume else False
        if cfg.time_budget is not None and not resumed:
            fit_to_time_budget(self)
        if ctx.is_main:
            self._announce(resumed)
        try:
            with self.stop_signals:
                return self._train()
        finally:
            self.run_log.close()

    def _announce(self, resumed: bool) -> None:
        cfg, ctx = self.cfg, self.context
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

    def _train(self) -> Dict[str, Any]:
        """The optimizer steps from ``self.iteration`` to the end (or to an agreed stop), then the pictures."""
        cfg, ctx = self.cfg, self.context
        metrics: Dict[str, Any] = {}
        stopping: Optional[int] = None
        self.network.train()
        bar = tqdm(total=cfg.iters, initial=self.iteration, desc="train", unit="it", disable=not ctx.is_main,
                   dynamic_ncols=True)
        try:
            while self.iteration < cfg.iters and stopping is None:
                epoch, step = divmod(self.iteration, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start=step * cfg.batch_size * cfg.accum)
                batches = iter(self.loader)
                tick, steps_since_tick = time.perf_counter(), 0
                for _ in range(step, self.steps_per_epoch):
                    loss = self.train_step(batches)
                    self.loss_guard.note(loss, self.iteration + 1)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.scheduler.step()
                    self.iteration += 1
                    steps_since_tick += 1
                    set_dropblock_progress(self.model, self.iteration / cfg.iters)
                    for hook in self.after_step_hooks:
                        hook(self)

                    stopping = self.stop_signals.agreed()
                    done = self.iteration == cfg.iters
                    evaluate_now = self.iteration % cfg.eval_every == 0 or done
                    save_now = self.iteration % cfg.checkpoint_every == 0 or done or stopping is not None
                    log_now = self.iteration % cfg.log_every == 0 or done
                    if log_now or evaluate_now or save_now:
                        self.loss_guard.check()  # nothing is logged or saved after a non-finite loss
                        self.skipped.report(self.iteration)
                    if log_now:
                        now = time.perf_counter()
                        self._log_step(epoch, loss, cfg.total_batch * steps_since_tick / max(now - tick, 1e-9), bar)
                        tick, steps_since_tick = now, 0
                    bar.update(1)
                    if evaluate_now:
                        metrics = self.validate()
                    if save_now:
                        self.save("last.pth")
                    if evaluate_now or save_now:  # throughput counts training steps only
                        tick, steps_since_tick = time.perf_counter(), 0
                    if stopping is not None or done:
                        break
        finally:
            bar.close()
        if stopping is not None:
            self.stop_signals.wait_for_all()
            if ctx.is_main:
                print(f"stopped by signal {stopping} at iteration {self.iteration}; "
                      f"{self.output_dir / 'last.pth'} saved; continue with --resume auto", flush=True)
            return {"interrupted": stopping, "iteration": self.iteration}
        self.finish()
        return {"iteration": self.iteration, "skipped_files": len(self.skipped), **metrics}

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over ``accum`` micro-batches; returns the mean loss (a 0-d tensor)."""
        cfg, device = self.cfg, self.context.device
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(cfg.accum):
            batch = next(batches)
            self.skipped.met(batch["skipped"])
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

    def _log_step(self, epoch: int, loss: torch.Tensor, images_per_s: float, bar: tqdm) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        value = loss.item()
        self.history["loss"].append((self.iteration, value))
        self.history["lr"].append((self.iteration, lr))
        self.run_log.write({"iteration": self.iteration, "epoch": epoch, "loss": value, "lr": lr,
                            "images_per_s": images_per_s})
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")

    def validate(self) -> Dict[str, Any]:
        """Evaluate on the validation set (sharded over the ranks), log it, put it on the card, and save
        ``best.pth`` when the mIoU is the best so far."""
        cfg, ctx = self.cfg, self.context
        metrics = evaluate(self.model, self.val_set, ctx.device, self.validation_inference,
                           workers=min(cfg.workers, 2), channels_last=cfg.channels_last, progress=ctx.is_main)
        self.history["val mIoU"].append((self.iteration, metrics["mIoU"]))
        self.last_metrics, self.last_metrics_iteration = metrics, self.iteration
        self.card = self.card.with_metrics(CardMetrics(
            dataset=cfg.dataset, split="val", mIoU=float(metrics["mIoU"]), pixAcc=float(metrics["pixAcc"]),
            inference=describe_inference(self.validation_inference), precision=precision_name(self.amp_dtype),
            iteration=self.iteration))
        summary = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}
        self.run_log.write({"iteration": self.iteration, **summary,
                            "per_class_IoU": {k: v["IoU"] for k, v in metrics["per_class"].items()}})
        if ctx.is_main:
            tqdm.write(f"validation at iteration {self.iteration}:\n{format_metrics_table(metrics)}")
        if metrics["mIoU"] > self.best_miou and not math.isnan(metrics["mIoU"]):
            self.best_miou = metrics["mIoU"]
            self.save("best.pth")
        self.model.train()
        return metrics

    def draw_pictures(self, directory: Path) -> List[str]:
        """The run's pictures into ``directory`` (:func:`~seg.engine.run_pictures.draw_run_pictures`); their names."""
        validation = None if self.last_metrics is None else (self.last_metrics, self.last_metrics_iteration)
        return draw_run_pictures(directory, history=self.history, validation=validation, model=self.model,
                                 val_set=self.val_set, inference=self.validation_inference,
                                 device=self.context.device, iteration=self.iteration)

    def finish(self) -> None:
        """The pictures and the closing summary (rank 0)."""
        if not self.context.is_main:
            return
        pictures = self.draw_pictures(self.output_dir)
        if len(self.skipped):
            print(f"skipped {len(self.skipped)} unreadable training file(s) (skip_bad_samples); they are "
                  f"listed in {self.output_dir / 'log.jsonl'}", flush=True)
        if self.cfg.time_budget is not None:
            elapsed = time.monotonic() - self.started_at
            print(f"finished in {elapsed / 60:.2f} of the {self.cfg.time_budget:g} min budget", flush=True)
        print(f"best validation mIoU {100 * self.best_miou:.2f}; wrote {self.output_dir / 'best.pth'}, "
              f"{self.output_dir / 'last.pth'}, {', '.join(pictures)}, log.jsonl", flush=True)
