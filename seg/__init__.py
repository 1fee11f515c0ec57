"""seg: semantic segmentation with dilated ResNeSt backbones and DeepLabV3.

Layout: ``seg.models`` (backbones, heads, registry, weight loading), ``seg.data`` (datasets, transforms,
loaders), ``seg.engine`` (training loop, evaluation, inference modes, metrics, checkpoints, distributed),
``seg.card`` (the :class:`~seg.card.ModelCard` describing a trained model), ``seg.hub`` (shared model folders and
Hub repos), ``seg.predictor`` (the :class:`Segmenter` API) and the CLIs ``seg.train``, ``seg.eval``, ``seg.predict``,
``seg.export``.

    >>> from seg import Segmenter
    >>> mask = Segmenter.from_checkpoint("best.pth").predict("image.jpg")
"""

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__"]


def __getattr__(name):
    # Imported on first use, so `import seg` (and the CLIs' argument parsing) stays quick.
    if name == "Segmenter":
        from seg.predictor import Segmenter

        return Segmenter
    raise AttributeError(f"module 'seg' has no attribute {name!r}")
