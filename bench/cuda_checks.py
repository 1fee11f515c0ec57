"""GPU measurements and parity checks behind the CUDA rows of bench/RESULTS.md (DeepLabV3-ResNeSt-101 by default).

    python bench/cuda_checks.py [--backbone resnest101] [--batch 8] [--size 512]
    python bench/cuda_checks.py --device cpu --backbone resnest14 --batch 2 --size 64   # smoke test of the script

1. Parity, fp32 with TF32 off, on a well-conditioned network (trained-like batch-norm statistics): logits of the
   folded + channels_last model against the plain eager model (max |difference| <= 1e-4 x max(1, logit
   scale)); bf16 compared by argmax agreement.
2. Speed at crop ``--size`` and ``--batch`` images: inference (folded, channels_last) and one training step
   (forward, loss with aux, backward, SGD) in fp32 (TF32 on, PyTorch's default for convolutions), bf16 autocast
   and bf16 compiled: images/s, and model FLOP utilisation against the bf16 matmul rate measured in the same run.
3. Multi-scale + flip (6 ADE20K scales, slide windows) of one 512x683 image in bf16: seconds per image.
4. ``torch.compile``: parity of the compiled inference model (as in 1) and of one compiled training
   forward/backward (loss and every gradient, dropout off, same weights and batch) against eager, then the
   compiled bf16 speed rows.

Each line is printed as soon as it is measured (the most wanted first), so a run cut short still reports.
Exits non-zero if a parity check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from seg.bench import matmul_peak_flops, median_seconds
from seg.engine.inference import MS_SCALES, InferenceConfig, predict_probabilities
from seg.engine.loss import segmentation_loss
from seg.models import build_segmentor
from seg.models.fusion import fuse_conv_bn


def flops_of(run) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def trained_like_batch_norm(model: torch.nn.Module, device: torch.device, size: int) -> torch.nn.Module:
    """Random affine BN parameters (small ones at the end of residual branches) and statistics measured on data,
    as in tests/conftest.py: activations stay normalised, so fp32 rounding is not amplified into the logits."""
    generator = torch.Generator().manual_seed(0)
    norms = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n, end = module.num_features, name.endswith("bn3")
                module.weight.copy_(torch.rand(n, generator=generator) * (0.3 if end else 1.0) + (0.0 if end else 0.5))
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.reset_running_stats()
                module.momentum = None  # cumulative average: the running statistics become this batch's
                norms.append(module)
        model.train()(torch.randn(4, 3, size, size, generator=generator).to(device))
    for module in norms:
        module.momentum = 0.1  # the default again, so training steps trace without a graph break
    return model.eval()


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode with every dropout layer in eval mode: eager and compiled draw different random masks."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()
    return model


def training_parity(model: torch.nn.Module, device: torch.device, size: int) -> float:
    """Largest relative difference, compiled vs eager, over the loss and every parameter gradient of one step."""
    image = torch.randn(2, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(1))
    target = torch.randint(0, 150, (2, size, size), device=device, generator=torch.Generator(device).manual_seed(2))
    results = []
    for compile_ in (False, True):
        net = without_dropout(copy.deepcopy(model))
        runner = torch.compile(net, dynamic=False) if compile_ else net
        loss = segmentation_loss(runner(image), target, 0.4)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    worst = ((compiled_loss - eager_loss).abs() / eager_loss.abs()).item()
    # Some gradients are zero in exact arithmetic (the bias of a convolution feeding a training-mode batch norm,
    # e.g. split attention's fc1): both paths give rounding noise there, so each tensor is measured against at
    # least 1 % of the largest gradient magnitude in the network rather than against its own noise.
    floor = 1e-2 * max(grad.abs().max().item() for grad in eager_grads if grad is not None)
    for eager, compiled in zip(eager_grads, compiled_grads):
        if eager is None or compiled is None:
            continue
        scale = max(eager.abs().max().item(), floor)
        worst = max(worst, (compiled - eager).abs().max().item() / scale)
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnest101")
    p.add_argument("--batch", type=int, default=8, help="images per inference batch and per training step")
    p.add_argument("--size", type=int, default=512, help="crop side for the speed measurements")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke test of this script")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds after which the compiled sections that have not started are skipped")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is available")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    began = time.perf_counter()
    torch.manual_seed(0)
    parity_size = min(args.size, 256)

    # 1. Parity, fp32 without TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = trained_like_batch_norm(build_segmentor("deeplabv3", backbone=args.backbone, num_classes=150).to(device),
                                    device, parity_size)
    image = torch.randn(2, 3, parity_size, parity_size, device=device)
    fused = fuse_conv_bn(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(image)
        fused_diff = (fused(image) - reference).abs().max().item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16_out = fused(image).float()
    scale = reference.abs().max().item()
    tolerance = 1e-4 * max(1.0, scale)
    agreement = (bf16_out.argmax(1) == reference.argmax(1)).float().mean().item()
    print(f"parity fp32 (TF32 off), logit scale {scale:.2f}: folded+channels_last {fused_diff:.2e} (tolerance "
          f"{tolerance:.1e}); bf16 argmax agreement {agreement * 100:.2f}%", flush=True)
    failures = [] if fused_diff <= tolerance else [f"folded logits differ by {fused_diff:.2e}"]

    # 2. Speed.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    peak = None
    if cuda:
        peak = matmul_peak_flops(device)
        print(f"{torch.cuda.get_device_name(device)}: bf16 matmul {peak / 1e12:.0f} TFLOP/s measured", flush=True)
    batch = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last)
    target = torch.randint(0, 150, (args.batch, args.size, args.size), device=device)

    def report(what, seconds, flops, base=None):
        speedup = f", {base / seconds:.2f}x fp32" if base else ""
        mfu = f", MFU {flops / seconds / peak * 100:.1f}%" if peak else ""
        memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
        print(f"{what}: {args.batch / seconds:.1f} img/s{mfu}{speedup}{memory}", flush=True)

    with torch.no_grad():
        infer_flops = flops_of(lambda: fused(batch))
        fp32_s = median_seconds(lambda: fused(batch), 10, device)
        report(f"inference fp32 batch {args.batch} at {args.size}", fp32_s, infer_flops)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            report(f"inference bf16 batch {args.batch} at {args.size}",
                   median_seconds(lambda: fused(batch), 10, device), infer_flops, fp32_s)

    start = build_segmentor("deeplabv3", backbone=args.backbone, num_classes=150).to(device)
    start = start.to(memory_format=torch.channels_last).train()

    def train_row(name: str, amp: bool, compile_: bool, base=None) -> float:
        net = copy.deepcopy(start)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        runner = torch.compile(net, dynamic=False) if compile_ else net

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = segmentation_loss(runner(batch), target, 0.4)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step()  # warm-up (and compilation) outside the FLOP count
        train_flops = flops_of(step)
        seconds = median_seconds(step, 5, device)
        report(f"train step {name} batch {args.batch} at {args.size}", seconds, train_flops, base)
        return seconds

    fp32_train = train_row("fp32", amp=False, compile_=False)
    train_row("bf16", amp=True, compile_=False, base=fp32_train)

    # 3. Multi-scale + flip of an ADE20K-sized image.
    height, width, crop = (512, 683, 512) if args.size >= 512 else (args.size, args.size * 4 // 3, args.size)
    config = InferenceConfig(mode="slide", crop_size=crop, scales=MS_SCALES["ade20k"], flip=True, base_size=width,
                             amp_dtype=torch.bfloat16)
    ade_image = torch.randn(1, 3, height, width, device=device)
    print(f"multi-scale + flip {height}x{width} bf16: "
          f"{median_seconds(lambda: predict_probabilities(fused, ade_image, config), 5, device):.3f} s per image",
          flush=True)

    # 4. torch.compile, last: compilation takes the longest. Each part is skipped once --deadline has passed.
    compiled = torch.compile(fused, dynamic=False)

    def compiled_inference_parity():
        with torch.no_grad():
            difference = (compiled(image) - reference).abs().max().item()
        print(f"parity compiled inference fp32 (TF32 off): {difference:.2e} (tolerance {tolerance:.1e})", flush=True)
        if difference > tolerance:
            failures.append(f"compiled logits differ by {difference:.2e}")

    def compiled_inference_speed():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            report(f"inference bf16 compiled batch {args.batch} at {args.size}",
                   median_seconds(lambda: compiled(batch), 10, device), infer_flops, fp32_s)

    def compiled_training_parity():
        difference = training_parity(model, device, parity_size)
        print(f"parity compiled training step fp32 (TF32 off): largest relative difference over the loss and all "
              f"gradients {difference:.2e} (tolerance 1e-3)", flush=True)
        if difference > 1e-3:
            failures.append(f"compiled training differs by {difference:.2e}")

    parts = (("inference parity", compiled_inference_parity, False),
             ("inference speed", compiled_inference_speed, True),
             ("training parity", compiled_training_parity, False),
             ("training speed", lambda: train_row("bf16 compiled", amp=True, compile_=True, base=fp32_train), True))
    for name, run, tf32 in parts:
        if args.skip_compile or time.perf_counter() - began > args.deadline:
            print(f"compiled {name}: skipped ({'--skip-compile' if args.skip_compile else '--deadline reached'})",
                  flush=True)
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32  # parity without TF32, speed with PyTorch's defaults
        torch.backends.cudnn.allow_tf32 = tf32
        run()

    print("PASS" if not failures else "FAIL: " + "; ".join(failures), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
