"""seg: semantic segmentation with dilated ResNeSt backbones and DeepLabV3.

The package is laid out by job: ``seg.models`` (backbones, heads, registry, weight loading) today; data,
engine (train/eval loops) and the public ``Segmenter`` API join it as they land.
"""

__version__ = "0.1.0"
