"""Name -> factory registries for backbones and segmentors.

One registry per kind of model, so that CLIs, configs and checkpoints refer to architectures by name and a new
architecture becomes available everywhere by decorating its factory function.
"""

from __future__ import annotations

from typing import Callable, Dict, List, TypeVar

import torch.nn as nn

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])


class Registry:
    """A mapping from names to model factory functions.

    Args:
        kind: what the registry holds ("backbone", "segmentor"), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: Dict[str, Callable[..., nn.Module]] = {}

    def register(self, factory: Factory) -> Factory:
        """Decorator: register ``factory`` under its function name."""
        name = factory.__name__
        if name in self._factories:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._factories[name] = factory
        return factory

    def names(self) -> List[str]:
        """Sorted registered names."""
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., nn.Module]:
        """The factory for ``name``; ValueError listing the choices when unknown."""
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._factories


BACKBONES = Registry("backbone")
SEGMENTORS = Registry("segmentor")
