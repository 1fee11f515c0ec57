"""Two CPU processes (gloo) with batch 2 each train exactly like one process with batch 4: same loss, same updated
weights and BatchNorm statistics after a step (synchronised BN, DDP gradient averaging).

The step runs in float64. In float32 the losses already agree to 1e-7, but at this test's tiny feature maps
(6x6 in the dilated stages) BatchNorm amplifies rounding: the two float32 computations of the same step differ
by up to ~3 % on a few gradients, in both directions, while in float64 they agree to ~1e-7 relative. float64
shows the arithmetic is the same; float32 would only measure the conditioning of a 48x48 toy input.

This builds its own step from seg's parts; that ``seg.train`` itself converts its model and reaches the same
weights under ``torchrun`` is tested in test_torchrun.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from seg.engine.distributed import synchronise_batchnorm
from seg.engine.loss import segmentation_loss
from seg.models import build_segmentor


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=3, output_stride=8)
    for module in model.modules():  # dropout draws random masks per process; switch it off to compare exactly
        if isinstance(module, (nn.Dropout, nn.Dropout2d)):
            module.p = 0.0
    return model.train().double()


def make_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 48, 48, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 3, (4, 48, 48), generator=generator)


def one_step(model: nn.Module, network: nn.Module, images, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss = segmentation_loss(network(images), targets, aux_weight=0.4)
    loss.backward()
    optimizer.step()
    return loss.detach()


def worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = synchronise_batchnorm(make_model(), torch.device("cpu"))
    network = nn.parallel.DistributedDataParallel(model)
    images, targets = make_batch()
    shard = slice(2 * rank, 2 * rank + 2)
    loss = one_step(model, network, images[shard], targets[shard])
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(losses, loss)
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "state": model.state_dict()}, out_file)
    dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    torch.set_num_threads(1)
    model = make_model()
    images, targets = make_batch()
    loss = one_step(model, model, images, targets)

    out_file = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=True)

    torch.testing.assert_close(ddp["loss"], loss, rtol=0, atol=1e-5)
    reference = model.state_dict()
    assert ddp["state"].keys() == reference.keys()
    compared_stats = 0
    for key, value in reference.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(ddp["state"][key], value), key
            continue
        torch.testing.assert_close(ddp["state"][key], value, rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        compared_stats += key.endswith("running_var")
    # BatchNorm statistics of every layer were compared, the pooled ones (ASPP image pool, attention gates) included.
    assert compared_stats == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 31
