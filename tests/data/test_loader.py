"""SeededSampler and build_dataloader: shards are disjoint and complete, augmentation is reproducible from the
seed whatever the number of workers, differs per epoch, and resumes mid-epoch."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from seg.data import build_dataset, train_transforms
from seg.data.loader import SeededSampler, build_dataloader


def test_shards_are_disjoint_cover_the_dataset_and_pad_evenly():
    shards = [list(SeededSampler(10, shuffle=True, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    indices = [i for shard in shards for i, _ in shard]
    assert set(indices) == set(range(10)) and len(indices) == 12  # two padded repeats
    seeds = [seed for shard in shards for _, seed in shard]
    assert len(set(seeds)) == 12  # each position, repeats included, has its own augmentation seed
    dropped = [list(SeededSampler(10, seed=3, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert [len(s) for s in dropped] == [3, 3, 3]


def test_epochs_reshuffle_and_resume_mid_epoch():
    sampler = SeededSampler(20, shuffle=True, seed=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert sorted(i for i, _ in epoch1) == list(range(20))
    sampler.set_epoch(1, start=7)
    assert list(sampler) == epoch1[7:] and len(sampler) == 13
    assert [i for i, _ in SeededSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def batches(workers, epoch=0):
    dataset = build_dataset("toy", "train", size=(48, 48), length=12,
                            transforms=train_transforms(crop_size=32, base_size=48))
    loader = build_dataloader(dataset, batch_size=4, train=True, workers=workers, seed=5)
    loader.sampler.set_epoch(epoch)
    return [(batch["image"], batch["mask"]) for batch in loader]


def test_augmentation_is_reproducible_whatever_the_workers():
    serial, parallel = batches(workers=0), batches(workers=2)
    assert len(serial) == 3 and serial[0][0].shape == (4, 3, 32, 32) and serial[0][1].dtype == torch.int64
    for (image_a, mask_a), (image_b, mask_b) in zip(serial, parallel, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    other_epoch = batches(workers=0, epoch=1)
    assert not torch.equal(serial[0][0], other_epoch[0][0])


class WorkerState(Dataset):
    """Items that report the worker's OpenCV thread count and whether NumPy was seeded from torch's worker seed."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, key):
        worker_seed = torch.initial_seed() % 2**32
        seeded = np.array_equal(np.random.get_state()[1], np.random.RandomState(worker_seed).get_state()[1])
        return {"opencv_threads": cv2.getNumThreads(), "numpy_seeded": seeded}


def test_workers_run_opencv_single_threaded_and_seed_numpy():
    """The workers are the parallelism: each runs OpenCV on one thread, whatever the program set (forked workers
    would inherit it), while the main process keeps its own setting."""
    own = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        loader = build_dataloader(WorkerState(), batch_size=2, train=False, workers=2, seed=0)
        batches = list(loader)
        del loader  # persistent workers end with it
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(own)
    threads = torch.cat([batch["opencv_threads"] for batch in batches])
    assert len(threads) == 6 and threads.eq(1).all(), threads
    assert all(bool(batch["numpy_seeded"].all()) for batch in batches)
