"""Name -> factory registries (backbones, segmentors, datasets).

One registry per kind of thing, so that CLIs, configs and checkpoints refer to it by name and a new one becomes
available everywhere by decorating its factory function.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, TypeVar

Factory = TypeVar("Factory", bound=Callable[..., object])


class Registry:
    """A mapping from names to factory functions.

    Args:
        kind: what the registry holds ("backbone", "dataset"), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: Dict[str, Callable[..., object]] = {}

    def register(self, factory: Factory) -> Factory:
        """Decorator: register ``factory`` under its function name."""
        name = factory.__name__
        if name in self._factories:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._factories[name] = factory
        return factory

    def names(self) -> List[str]:
        """Registered names in natural order (resnest14 before resnest101)."""
        return sorted(self._factories, key=_natural_key)

    def get(self, name: str) -> Callable[..., object]:
        """The factory for ``name``; ValueError listing the choices when unknown."""
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._factories


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

