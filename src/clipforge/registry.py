"""A small named registry used for models, losses and datasets.

One instance per kind of thing (``MODELS``, ``LOSSES``, ``DATASETS``); no global
mutable state beyond those explicit tables.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes, factories or configs) of one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(o: T) -> T:
            if name in self._items and not overwrite:
                raise KeyError(f"{self.kind} '{name}' is already registered; pass overwrite=True to replace it")
            self._items[name] = o
            return o

        if obj is None:
            return _add
        return _add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{name}'. Available: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def build_from(registry: Registry[Callable[..., T]], name: str, **kwargs) -> T:
    return registry.get(name)(**kwargs)
