"""The model registries: backbones and segmentors by name (see ``seg.registry``)."""

from seg.registry import Registry

BACKBONES = Registry("backbone")
SEGMENTORS = Registry("segmentor")
