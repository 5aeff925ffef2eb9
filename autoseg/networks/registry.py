"""The architecture registry: a name -> builder table that plugins extend with a decorator.

A builder is any callable ``builder(topology) -> nn.Module`` (a class taking the topology works).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from autoseg.plan import Topology

Builder = Callable[[Topology], nn.Module]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register_network(name: str) -> Callable[[B], B]:
    """Decorator registering a builder under ``name``; returns the builder unchanged.

    Registering a different builder under a taken name is an error (two plugins silently
    replacing each other would make plans mean different things on different machines).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a network name must be a non-empty string, got {name!r}")

    def decorate(builder: B) -> B:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not builder and _qualified(existing) != _qualified(builder):
            raise ValueError(f"network name {name!r} is already registered by {_qualified(existing)}")
        _REGISTRY[name] = builder
        return builder

    return decorate


def unregister_network(name: str) -> None:
    """Remove a registered network (for plugins and tests that register temporarily)."""
    _REGISTRY.pop(name, None)


def _qualified(builder: Builder) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', repr(builder))}"


def available_networks() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get_builder(name: str) -> Builder:
    """The builder registered under ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown network architecture {name!r}; available: "
                         f"{', '.join(available_networks())}") from None
