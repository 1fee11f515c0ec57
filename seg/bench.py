"""``python -m seg.bench``: seg's models side by side with the reference implementations, in one run.

For each case it times seg and every installed reference on the same input, dtype and thread count, and prints
params, GMACs, images/s, median latency, peak memory and the ratio of seg's speed to each reference's (above 1:
seg is faster). References run in whichever memory format is faster for them. ``--quick`` shrinks every size
for a smoke test of the tool (not of the speed); ``--json`` writes the rows.

All contenders of a case are built and warmed up first and then timed in interleaved rounds (the order rotated
each round), so a change in machine load or a first-run penalty falls on all of them alike: the ratios hold on
a shared machine even when the absolute rates do not. Peak memory is the growth of the process's resident set
(CPU; approximate, as the allocator keeps some freed memory) or of allocated memory (CUDA) over the contender's
warm-up run, from before its weights were loaded: weights plus the run's activations.

Cases: ResNeSt-50/101 classification (224, batch 8); dilated output-stride-8 backbones (512x512); DeepLabV3
inference (512x512, and a 1024x2048 frame in slide mode); one DeepLabV3 training step (crop 512, batch 2:
forward, loss with aux, backward, SGD); multi-scale + flip of a 512x683 image against its 12 passes alone.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.cli import ArgumentParser
from seg.engine.inference import (MS_SCALES, InferenceConfig, inference_model, predict_probabilities, scaled_size,
                                  single_scale_probabilities)
from seg.engine.loss import segmentation_loss
from seg.engine.precision import DTYPES, describe_cpu, precision_name
from seg.models import build_backbone, build_segmentor
from seg.models.complexity import count_parameters


@dataclass
class Contender:
    """One implementation of a case: a module and how to run it once on an input."""

    name: str
    build: Callable[[], nn.Module]  # built when its case runs, so idle models do not sit in memory
    run: Callable[[nn.Module, torch.Tensor], object]
    formats: Tuple[bool, ...] = (False, True)  # channels_last off/on: a reference gets its faster one
    versus: str = "seg"  # the seg row its "seg is" ratio is taken against (the one doing the same work)
    # Reduced precision by casting the weights and the input (seg's inference path) instead of autocast.
    casts_weights: bool = False
    # Always float32, whatever --dtype: seg's own fp32 row beside its bf16 one, for the speed-up of the dtype.
    float32: bool = False


@dataclass
class Case:
    title: str
    input_shape: Tuple[int, int, int, int]
    images: int
    contenders: List[Contender] = field(default_factory=list)


# --- what a run is --------------------------------------------------------------------------------------------


def infer(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def features(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module.forward_features(x)


def official_features(module: nn.Module, x: torch.Tensor):
    """The official ResNet's stage outputs (its forward() pools and classifies)."""
    with torch.no_grad():
        x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
        c1 = module.layer1(x)
        c2 = module.layer2(c1)
        c3 = module.layer3(c2)
        return [c1, c2, c3, module.layer4(c3)]


def torchvision_logits(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module(x)["out"]


def train_step_of(outputs_style: str):
    """One SGD step (forward, CE loss + 0.4 x aux, backward, step) on a fixed random target.

    ``outputs_style``: "seg" (a (main, aux) tuple), "torchvision" (a dict with "out" and "aux") or "plain" (one
    tensor, no auxiliary loss). Each module keeps its own optimizer (momentum buffers included) across steps.
    """
    optimizers: "weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer]" = weakref.WeakKeyDictionary()

    def step(module: nn.Module, x: torch.Tensor):
        if module not in optimizers:
            optimizers[module] = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
        optimizer = optimizers[module]
        target = torch.randint(0, 150, (x.shape[0], x.shape[2], x.shape[3]), device=x.device,
                               generator=torch.Generator(device=x.device).manual_seed(0))
        outputs = module(x)
        if outputs_style == "torchvision":
            outputs = (outputs["out"], outputs["aux"])
        loss = segmentation_loss(outputs, target, 0.4 if outputs_style != "plain" else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def official_deeplabv3(depth: int, num_classes: int = 150, aux: bool = True) -> nn.Module:
    """PyTorch-Encoding's DeepLabV3 from public parts: the official dilated ResNeSt under torchvision's heads.

    torchvision's ``DeepLabHead`` (ASPP 12/24/36, 3x3 conv, 1x1 classifier) and ``FCNHead`` on layer3 are the
    same layers as Encoding's DeepLabV3 head and auxiliary head. Without ``aux`` (for inference: torchvision runs
    an auxiliary head even in eval mode, Encoding does not) only the main head is built.
    """
    import resnest.torch as official
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    layers = {"layer3": "aux", "layer4": "out"} if aux else {"layer4": "out"}
    body = IntermediateLayerGetter(getattr(official, f"resnest{depth}")(dilated=True), return_layers=layers)
    return DeepLabV3(body, DeepLabHead(2048, num_classes), FCNHead(1024, num_classes) if aux else None)


def smp_deeplabv3(timm_name: str, num_classes: int = 150) -> nn.Module:
    """segmentation_models_pytorch's DeepLabV3 (output stride 8) on a timm ResNeSt encoder; it has no aux head."""
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3(encoder_name=f"tu-{timm_name}", encoder_weights=None, classes=num_classes)


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def seg_inference(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """seg as its inference entry points prepare it (seg.engine.inference.inference_model: eval mode, batch norm
    folded); ``prepare`` then sets the case's memory format and, under a reduced --dtype, casts it."""
    return lambda: inference_model(build(), "cpu", inplace=True)


# --- the cases -----------------------------------------------------------------------------------------------


def with_float32_rows(cases: List[Case], channels_last: bool) -> None:
    """Beside each seg row of the DeepLabV3 cases, the same seg in float32: under --dtype bf16 the table then shows
    the dtype's own speed-up, measured in the same interleaved rounds ("seg is" < 1 on that row: fp32 is slower)."""
    for case in cases:
        if not case.title.startswith("DeepLabV3"):
            continue
        for contender in [c for c in case.contenders if c.name.startswith("seg")]:
            case.contenders.append(Contender(contender.name.replace("seg", "fp32 seg", 1), contender.build,
                                             contender.run, formats=(channels_last,), versus=contender.name,
                                             float32=True))


def build_cases(quick: bool, train_batch: int = 2) -> List[Case]:
    size = (lambda n: max(32, n // 8)) if quick else (lambda n: n)
    batch = (lambda n: 1) if quick else (lambda n: n)
    cases: List[Case] = []
    try:
        import resnest.torch as official
    except ImportError:
        official = None
    try:
        import timm
    except ImportError:
        timm = None
    import torchvision

    for depth, timm_name in ((50, "resnest50d"), (101, "resnest101e")):
        name = f"resnest{depth}"
        case = Case(f"ResNeSt-{depth} classification {size(224)}, batch {batch(8)}", (batch(8), 3, size(224),
                    size(224)), batch(8))
        case.contenders.append(Contender("seg", seg_inference(lambda name=name: build_backbone(name)), infer,
                                         casts_weights=True))
        if official is not None:
            case.contenders.append(Contender("official resnest", lambda name=name: getattr(official, name)(), infer))
        if timm is not None:
            case.contenders.append(Contender("timm " + timm_name, lambda t=timm_name: timm.create_model(t), infer))
        cases.append(case)

        case = Case(f"ResNeSt-{depth} dilated OS8 features {size(512)}", (1, 3, size(512), size(512)), 1)
        case.contenders.append(Contender("seg", seg_inference(
            lambda name=name: build_backbone(name, output_stride=8, num_classes=0)), features, casts_weights=True))
        if official is not None:
            case.contenders.append(Contender("official dilated=True",
                                             lambda name=name: getattr(official, name)(dilated=True),
                                             official_features))
        if timm is not None:
            case.contenders.append(Contender(f"timm {timm_name} OS8", lambda t=timm_name: timm.create_model(
                t, output_stride=8, features_only=True), infer))
        cases.append(case)

    smp = installed("segmentation_models_pytorch") and timm is not None
    for depth, timm_name in ((50, "resnest50d"), (101, "resnest101e")):
        case = Case(f"DeepLabV3-ResNeSt-{depth} inference {size(512)}", (1, 3, size(512), size(512)), 1)
        case.contenders.append(Contender("seg", seg_inference(
            lambda d=depth: build_segmentor("deeplabv3", backbone=f"resnest{d}", num_classes=150)), infer,
            casts_weights=True))
        if official is not None:
            case.contenders.append(Contender(f"official resnest{depth} + torchvision heads",
                                             lambda d=depth: official_deeplabv3(d, aux=False), torchvision_logits))
        if smp:
            case.contenders.append(Contender(f"smp DeepLabV3 {timm_name}", lambda t=timm_name: smp_deeplabv3(t),
                                             infer))
        case.contenders.append(Contender(f"torchvision deeplabv3_resnet{depth}", lambda d=depth: getattr(
            torchvision.models.segmentation, f"deeplabv3_resnet{d}")(weights=None, weights_backbone=None,
                                                                    num_classes=150), torchvision_logits))
        cases.append(case)

    slide = InferenceConfig(mode="slide", crop_size=size(512))
    case = Case(f"DeepLabV3-ResNeSt-50 slide {size(1024)}x{size(2048)} (Cityscapes frame)",
                (1, 3, size(1024), size(2048)), 1)
    case.contenders.append(Contender(
        "seg", seg_inference(lambda: build_segmentor("deeplabv3", backbone="resnest50", num_classes=19)),
        lambda m, x: predict_probabilities(m, x, slide), casts_weights=True))
    cases.append(case)

    tb = train_batch  # two at least: the references cannot train batch norm on one image
    for depth, timm_name in ((50, "resnest50d"), (101, "resnest101e")):
        case = Case(f"DeepLabV3-ResNeSt-{depth} train step crop {size(512)}, batch {tb}",
                    (tb, 3, size(512), size(512)), tb)
        case.contenders.append(Contender(
            "seg", lambda d=depth: build_segmentor("deeplabv3", backbone=f"resnest{d}", num_classes=150),
            train_step_of("seg")))
        if official is not None:
            case.contenders.append(Contender(f"official resnest{depth} + torchvision heads",
                                             lambda d=depth: official_deeplabv3(d),
                                             train_step_of("torchvision")))
        if smp:
            case.contenders.append(Contender("seg, no aux head", lambda d=depth: build_segmentor(
                "deeplabv3", backbone=f"resnest{d}", num_classes=150, aux=False), train_step_of("plain")))
            case.contenders.append(Contender(f"smp DeepLabV3 {timm_name} (no aux head)",
                                             lambda t=timm_name: smp_deeplabv3(t), train_step_of("plain"),
                                             versus="seg, no aux head"))
        case.contenders.append(Contender(f"torchvision deeplabv3_resnet{depth}", lambda d=depth: getattr(
            torchvision.models.segmentation, f"deeplabv3_resnet{d}")(weights=None, weights_backbone=None,
                                                                    num_classes=150, aux_loss=True),
            train_step_of("torchvision")))
        cases.append(case)
    return cases


def ms_flip_case(quick: bool, device: torch.device, amp: Optional[torch.dtype], channels_last: bool,
                 repeats: int) -> Dict[str, object]:
    """Multi-scale + flip of one 512x683 image against the sum of its 12 forward passes run alone."""
    height, width = (64, 85) if quick else (512, 683)
    crop = 64 if quick else 512
    # As seg.eval runs it: folded, channels_last, its weights in the benchmark's dtype.
    model = inference_model(build_segmentor("deeplabv3", backbone="resnest50", num_classes=150), device,
                            amp or torch.float32)
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    image = torch.randn(1, 3, height, width, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    config = InferenceConfig(mode="slide", crop_size=crop, scales=MS_SCALES["ade20k"], flip=True, base_size=width)
    runs = [lambda: predict_probabilities(model, image, config)]
    for scale in config.scales:
        size = scaled_size(height, width, scale, config.base_size)
        view = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                    align_corners=True)
        for flip in (False, True):
            one = InferenceConfig(mode="slide", crop_size=crop)
            viewed = view.flip(-1) if flip else view
            runs.append(lambda v=viewed, c=one: single_scale_probabilities(model, v, c))
    # Interleaved rounds, as in run_case: the whole evaluation and its passes see the same machine load.
    times: List[List[float]] = [[] for _ in runs]
    with torch.no_grad():
        for run in runs:
            run()  # warm-up
        for _ in range(repeats):
            for index, run in enumerate(runs):
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                times[index].append(time.perf_counter() - start)
    full = statistics.median(times[0])
    alone = sum(statistics.median(t) for t in times[1:])
    return {"case": f"multi-scale + flip {height}x{width} (12 passes)", "seconds": full,
            "passes_alone_seconds": alone, "overhead": full / alone}


# --- measuring -----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], repeats: int, device: Optional[torch.device] = None) -> float:
    device = device or torch.device("cpu")
    run()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The device's own matrix-multiply rate in ``dtype`` (FLOP/s), measured here: the best median of timed square
    products (8192 on a GPU, 4096 on a CPU, where one fp32 product of 4096 already takes a third of a second)."""
    n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(median_seconds(lambda: a @ b, 10 if device.type == "cuda" else 5, device) for _ in range(3))
    return 2 * n**3 / seconds


def release_freed_memory() -> None:
    """Hand memory freed by earlier contenders back to the OS (glibc keeps it otherwise), so each contender's
    resident-set growth is measured from the same floor, whichever runs first."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def resident_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass
class Entry:
    """One contender in one memory format, built and warmed up, waiting for its timed rounds."""

    contender: Contender
    channels_last: bool
    once: Callable[[], None]
    row: Dict[str, object]
    times: List[float] = field(default_factory=list)


def prepare(case: Case, contender: Contender, use_channels_last: bool, device: torch.device,
            amp: Optional[torch.dtype], compile_: bool) -> Entry:
    """Build ``contender``, warm it up, count its FLOPs on a second run and measure its peak memory on a third.

    The peak comes from a plain run: under ``FlopCounterMode`` (a dispatch mode) tensors live longer, and by
    different amounts for different implementations (seg's dilated ResNeSt-50 read 546 MB there, 393 MB plain).
    """
    from torch.utils.flop_counter import FlopCounterMode

    is_seg = contender.name.startswith("seg")
    torch.manual_seed(0)
    release_freed_memory()  # the memory other contenders freed goes back first
    baseline = resident_mb() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
    memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
    module = contender.build().to(device).train("train step" in case.title).to(memory_format=memory_format)
    params = count_parameters(module)
    x = torch.randn(*case.input_shape, device=device).contiguous(memory_format=memory_format)
    amp = None if contender.float32 else amp
    cast = contender.casts_weights and amp is not None
    if cast:  # seg's inference path: weights and input in the dtype (fused bf16 kernels), no autocast
        module, x = module.to(amp), x.to(amp)
    runnable = torch.compile(module) if compile_ and is_seg else module

    def once(run=contender.run, module=runnable, x=x, autocast=amp is not None and not cast):
        with torch.autocast(device.type, dtype=amp, enabled=autocast):
            run(module, x)

    once()  # compile, allocator and kernel-selection warm-up, kept out of the counts below
    synchronize(device)
    counter = FlopCounterMode(display=False)
    with counter:
        once()
    synchronize(device)
    release_freed_memory()  # building's temporaries (e.g. folding batch norm) are not the model's footprint
    reset_peak_memory(device)
    once()
    synchronize(device)
    peak = peak_memory_mb(device) - baseline
    row = {"case": case.title, "implementation": contender.name, "channels_last": use_channels_last,
           "params": params, "gmacs_per_image": counter.get_total_flops() / 2 / case.images / 1e9,
           "peak_memory_mb": peak, "flops": counter.get_total_flops(), "versus": contender.versus,
           "dtype": precision_name(amp), "autocast": amp is not None and not cast}
    return Entry(contender, use_channels_last, once, row)


def warm_up_runtime(device: torch.device) -> None:
    """Initialise the libraries (oneDNN/cuDNN, thread pools, autograd) once, so their one-time memory and time are
    not charged to whichever contender happens to run first."""
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    for channels_last in (False, True):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=memory_format).train()
        main, aux = model(x.contiguous(memory_format=memory_format))
        (main.mean() + aux.mean()).backward()
        with torch.no_grad():
            model.eval()(x.contiguous(memory_format=memory_format))
    synchronize(device)
    del model, x
    release_freed_memory()


def run_case(case: Case, device: torch.device, amp: Optional[torch.dtype], channels_last: bool, compile_: bool,
             repeats: int) -> List[Dict[str, object]]:
    """Every contender of ``case``, each in its faster memory format (seg in the requested one).

    All contenders are built and warmed up first, then timed in interleaved rounds (each round in a rotated
    order), so a change in machine load or a first-run penalty falls on every contender alike and the ratios
    stay meaningful on a shared machine. Peak memory is each one's own, measured on its warm-up run.
    """
    entries: List[Entry] = []
    for contender in case.contenders:
        formats = (channels_last,) if contender.name.startswith("seg") else contender.formats
        for use_channels_last in formats:
            entries.append(prepare(case, contender, use_channels_last, device, amp, compile_))
    for round_index in range(repeats):
        shift = round_index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            synchronize(device)
            start = time.perf_counter()
            entry.once()
            synchronize(device)
            entry.times.append(time.perf_counter() - start)

    rows = []
    for contender in case.contenders:
        best = None
        for entry in (e for e in entries if e.contender is contender):
            seconds = statistics.median(entry.times)
            row = {**entry.row, "latency_s": seconds, "images_per_s": case.images / seconds,
                   "flops_per_s": entry.row["flops"] / seconds, "round_seconds": list(entry.times)}
            if best is None or seconds < best["latency_s"]:
                best = row
        rows.append(best)
    del entries
    release_freed_memory()
    by_name = {row["implementation"]: row for row in rows}
    for row in rows:
        if row["implementation"].startswith("seg"):
            row["seg_speedup"], row["seg_speedup_range"] = 1.0, [1.0, 1.0]
            continue
        seg_row = by_name[row["versus"]]
        row["seg_speedup"] = seg_row["images_per_s"] / row["images_per_s"]
        # The same round's two timings share the machine's state at that moment: their ratios show how far the
        # ratio of medians can be trusted on a noisy machine.
        per_round = [theirs / ours for ours, theirs in zip(seg_row["round_seconds"], row["round_seconds"])]
        row["seg_speedup_range"] = [min(per_round), max(per_round)]
    return rows


def print_table(rows: List[Dict[str, object]], ms_flip: Optional[Dict[str, object]], header: str) -> None:
    print(header)
    mfu = any("mfu" in row for row in rows)
    print(f"| {'case':<56} | {'implementation':<44} | {'params':>8} | {'GMACs':>7} | {'img/s':>8} | "
          f"{'latency':>9} | {'peak MB':>8} |" + (f" {'MFU':>6} |" if mfu else "")
          + f" {'seg is (rounds)':>19} |")
    print("|" + "|".join("-" * w for w in (58, 46, 10, 9, 10, 11, 10) + ((8,) if mfu else ()) + (21,)) + "|")
    for row in rows:
        own = row["implementation"].startswith("seg")
        low, high = row["seg_speedup_range"]
        speed = "" if own else f"{row['seg_speedup']:.2f}x ({low:.2f}-{high:.2f})"
        layout = " (NHWC)" if row["channels_last"] and not own else ""
        print(f"| {row['case']:<56} | {row['implementation'] + layout:<44} | {row['params'] / 1e6:>7.2f}M | "
              f"{row['gmacs_per_image']:>7.2f} | {row['images_per_s']:>8.2f} | {row['latency_s'] * 1000:>7.1f}ms | "
              f"{row['peak_memory_mb']:>8.0f} |" + (f" {row['mfu'] * 100:>5.1f}% |" if mfu else "")
              + f" {speed:>19} |")
    if ms_flip is None:
        return
    print(f"{ms_flip['case']}: {ms_flip['seconds']:.3f} s, its 12 passes alone {ms_flip['passes_alone_seconds']:.3f}"
          f" s: overhead {ms_flip['overhead']:.3f}x")


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m seg.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype for every contender")
    p.add_argument("--channels-last", action="store_true", help="run seg in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile seg's model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every contender")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the tool runs, not the speed")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2, the issue's "
                   "per-device batch; larger batches show a GPU's throughput)")
    p.add_argument("--only", metavar="TEXT", action="append", help="run only the cases whose title contains TEXT "
                   "(repeatable; e.g. 'train step', 'multi-scale')")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.train_batch < 1:
        p.error(f"--train-batch must be positive, got {args.train_batch}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    # --dtype bf16 or fp16: every contender runs under autocast to it (amp), except seg's inference rows, which run
    # as seg's inference entry points do (weights cast to it, batch norm folded; inference_model). fp32: no autocast.
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    amp = None if dtype == torch.float32 else dtype
    torch.manual_seed(0)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    def wanted(title: str) -> bool:
        return not args.only or any(text in title for text in args.only)

    cases = [case for case in build_cases(args.quick, args.train_batch) if wanted(case.title)]
    if amp is not None:
        with_float32_rows(cases, args.channels_last)
    run_ms_flip = wanted("multi-scale + flip")
    if not cases and not run_ms_flip:
        p.error(f"--only {' / '.join(args.only)!r} matches no case")
    if args.quick:  # a smoke test of the tool: one memory format per reference is enough
        for case in cases:
            for contender in case.contenders:
                contender.formats = (False,)

    warm_up_runtime(device)
    rows = []
    for case in cases:
        rows += run_case(case, device, amp, args.channels_last, args.compile, repeats)
        print(f"measured: {case.title}", file=sys.stderr, flush=True)
    ms_flip = ms_flip_case(args.quick, device, amp, args.channels_last, repeats) if run_ms_flip else None
    # MFU: achieved MACs per second over the device's own matmul rate in the benchmark's dtype, measured now.
    peak_flops = matmul_peak_flops(device, dtype) if not args.quick else None
    for row in rows:
        if peak_flops:
            row["mfu"] = row["flops_per_s"] / peak_flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    peak = f"; {args.dtype} matmul {peak_flops / 2e12:.2f} TMAC/s measured" if peak_flops else ""
    header = (f"seg.bench on {device} ({name}; {torch.get_num_threads()} threads), dtype {args.dtype}, "
              f"channels_last {args.channels_last}, compile {args.compile}, torch {torch.__version__}{peak}"
              + (", QUICK sizes (not a speed measurement)" if args.quick else ""))
    print_table(rows, ms_flip, header)
    if args.json:
        report = {"header": header, "repeats": repeats, "rows": rows, "ms_flip": ms_flip,
                  "matmul_peak_flops": peak_flops}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
