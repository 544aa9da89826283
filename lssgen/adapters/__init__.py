"""Built-in adapters and the registry that picks one for a pipeline."""

from __future__ import annotations

from typing import Any

from .base import Adapter
from .flux import FluxAdapter

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Make `adapter` available to `lssgen.patch`; a later adapter of the same name replaces the earlier one."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"Expected an lssgen.adapters.Adapter instance, got {type(adapter).__name__}.")
    if not adapter.name:
        raise ValueError(f"{type(adapter).__name__} needs a non-empty `name`.")
    _REGISTRY[adapter.name] = adapter
    return adapter


def installed_adapters() -> dict[str, Adapter]:
    return dict(_REGISTRY)


def find_adapter(pipe: Any, adapter: Adapter | str | None = None) -> Adapter:
    """The adapter for `pipe`: the one named or given, else the first registered one that matches."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in _REGISTRY:
            raise ValueError(f"No lssgen adapter named {adapter!r}; installed: {', '.join(sorted(_REGISTRY))}.")
        return _REGISTRY[adapter]
    if adapter is not None:
        raise TypeError(f"`adapter` must be an Adapter, an adapter name or None, got {type(adapter).__name__}.")
    for candidate in _REGISTRY.values():
        if candidate.matches(pipe):
            return candidate
    supported = ", ".join(f"{a.name} ({', '.join(a.pipeline_classes)})" for a in _REGISTRY.values())
    raise ValueError(
        f"lssgen has no adapter for {type(pipe).__name__}. Installed adapters: {supported}. "
        "Pass `adapter=` to lssgen.patch, or write an Adapter subclass for this pipeline and register it "
        "with lssgen.adapters.register_adapter."
    )


register_adapter(FluxAdapter())

__all__ = ["Adapter", "FluxAdapter", "find_adapter", "installed_adapters", "register_adapter"]
