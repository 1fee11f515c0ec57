"""The dataset registry: adapters by name (see ``seg.registry``)."""

from seg.registry import Registry

DATASETS = Registry("dataset")
