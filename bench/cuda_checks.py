"""CUDA checks that back the GPU rows of bench/RESULTS.md: compiled and bf16 paths against eager fp32.

    python bench/cuda_checks.py [--backbone resnest101] [--batch 8]

1. Inference, DeepLabV3 at 512x512 with batch norm folded, channels_last: eager fp32 (TF32 off) vs
   ``torch.compile`` fp32 (max |logit difference|, must be <= 1e-4 relative to the logit scale) and vs bf16
   autocast (reported; bf16 keeps 8 mantissa bits, so it is compared by argmax agreement, not 1e-4).
2. Training, one step from the same weights on the same batch: eager vs compiled loss and weight change, and
   steps/s of both in bf16 + channels_last.

Prints one line per measurement; exits non-zero if the compiled fp32 logits differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from seg.engine.trainer import segmentation_loss
from seg.models import build_segmentor
from seg.models.fusion import fuse_conv_bn


def timed(run, repeats: int = 10) -> float:
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def settle_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Running statistics measured on random data (as after training), so eval logits are of a trained scale."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None
        model.train()(torch.randn(4, 3, 256, 256, device=device))
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnest101")
    p.add_argument("--batch", type=int, default=8, help="training batch for the compiled/eager step timing")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device is available")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)

    model = build_segmentor("deeplabv3", backbone=args.backbone, num_classes=150).to(device)
    model = settle_batch_norm(model, device)
    image = torch.randn(2, 3, 512, 512, device=device)
    with torch.no_grad():
        reference = model(image)
        fused = fuse_conv_bn(model).to(memory_format=torch.channels_last)
        fused_out = fused(image)
        compiled = torch.compile(fused)
        compiled_out = compiled(image)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16_out = fused(image).float()
    scale = reference.abs().max().item()
    fused_diff = (fused_out - reference).abs().max().item()
    compiled_diff = (compiled_out - reference).abs().max().item()
    agreement = (bf16_out.argmax(1) == reference.argmax(1)).float().mean().item()
    print(f"inference fp32 (TF32 off): logit scale {scale:.3f}; folded+channels_last max diff {fused_diff:.2e}; "
          f"compiled max diff {compiled_diff:.2e}; bf16 argmax agreement {agreement * 100:.3f}% "
          f"(max diff {(bf16_out - reference).abs().max().item():.3f})", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_s = timed(lambda: fused(image))
        compiled_s = timed(lambda: compiled(image))
    print(f"inference bf16 batch 2 at 512: eager {2 / eager_s:.1f} img/s, compiled {2 / compiled_s:.1f} img/s "
          f"({eager_s / compiled_s:.2f}x)", flush=True)

    # Training: the same initial weights, batch and target for eager and compiled.
    torch.manual_seed(1)
    batch = torch.randn(args.batch, 3, 512, 512, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 150, (args.batch, 512, 512), device=device)
    start = build_segmentor("deeplabv3", backbone=args.backbone, num_classes=150).to(device)
    start = start.to(memory_format=torch.channels_last).train()
    results = {}
    for name in ("eager", "compiled"):
        net = copy.deepcopy(start)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        runner = torch.compile(net) if name == "compiled" else net

        def step(runner=runner, optimizer=optimizer):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = segmentation_loss(runner(batch), target, 0.4)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        first_loss = step().item()
        seconds = timed(step, 5)
        results[name] = (first_loss, seconds)
        print(f"train bf16 channels_last batch {args.batch}: {name} first loss {first_loss:.5f}, "
              f"{args.batch / seconds:.1f} img/s", flush=True)
    loss_diff = abs(results["eager"][0] - results["compiled"][0])
    print(f"train: compiled vs eager first-step loss difference {loss_diff:.2e}; compiled speed-up "
          f"{results['eager'][1] / results['compiled'][1]:.2f}x", flush=True)

    tolerance = 1e-4 * max(1.0, scale)
    ok = fused_diff <= tolerance and compiled_diff <= tolerance
    print("PASS" if ok else f"FAIL: fp32 differences above {tolerance:.1e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
