"""Adapters: what lssgen knows about each pipeline family, collected from plugins (built-in ones included)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hookspecs import hookimpl
from ..plugins import load_plugins, plugin_package, pm
from .base import Adapter, Architecture
from .flux import FluxAdapter


@dataclass(frozen=True)
class InstalledAdapter:
    adapter: Adapter
    plugin: str  # the pluggy plugin name that registered it
    package: str  # the distribution providing that plugin


def _check(adapter: Any) -> Adapter:
    if not isinstance(adapter, Adapter):
        raise TypeError(f"Expected an lssgen.adapters.Adapter instance, got {type(adapter).__name__}.")
    if not adapter.name or not adapter.pipeline_classes:
        raise ValueError(f"{type(adapter).__name__} needs a non-empty `name` and `pipeline_classes`.")
    return adapter


def installed_adapters() -> dict[str, InstalledAdapter]:
    """Every registered adapter by name; a later registration of a name replaces an earlier one."""
    found: dict[str, InstalledAdapter] = {}
    for impl in load_plugins().hook.register_adapters.get_hookimpls():

        def register(adapter: Adapter, _plugin: str = impl.plugin_name) -> None:
            found[_check(adapter).name] = InstalledAdapter(adapter, _plugin, plugin_package(_plugin))

        impl.function(register=register)
    return found


class _RuntimePlugin:
    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    @hookimpl
    def register_adapters(self, register):
        register(self.adapter)


def register_adapter(adapter: Adapter) -> Adapter:
    r"""
    Register an adapter in this process, without packaging it as a plugin. Replaces one of the same name.

    Example:

    ```py
    >>> lssgen.register_adapter(MyPixArtAdapter())
    ```
    """
    _check(adapter)
    unregister_adapter(adapter.name)
    load_plugins().register(_RuntimePlugin(adapter), name=f"runtime:{adapter.name}")
    return adapter


def unregister_adapter(name: str) -> None:
    """Remove an adapter added with `register_adapter` (no-op when there is none)."""
    if pm.get_plugin(f"runtime:{name}") is not None:
        pm.unregister(name=f"runtime:{name}")


def find_adapter(pipe: Any, adapter: Adapter | str | None = None) -> Adapter:
    """The adapter for `pipe`: the one given or named, else the installed one that matches it most closely."""
    if isinstance(adapter, Adapter):
        return adapter
    installed = installed_adapters()
    if isinstance(adapter, str):
        if adapter not in installed:
            raise ValueError(f"No lssgen adapter named {adapter!r}; installed: {', '.join(sorted(installed))}.")
        return installed[adapter].adapter
    if adapter is not None:
        raise TypeError(f"`adapter` must be an Adapter, an adapter name or None, got {type(adapter).__name__}.")
    ranked = []
    for order, info in enumerate(installed.values()):
        rank = info.adapter.match_rank(pipe)
        if rank is not None:
            ranked.append((rank, -order, info.adapter))  # closest class first; later registrations win ties
    if ranked:
        return min(ranked, key=lambda item: item[:2])[2]
    supported = "; ".join(
        f"{name} ({', '.join(info.adapter.pipeline_classes)}, from {info.package})" for name, info in installed.items()
    )
    raise ValueError(
        f"lssgen has no adapter for {type(pipe).__name__}. Installed adapters: {supported}. Pass `adapter=` to "
        "lssgen.patch, or write an lssgen.Adapter subclass for this pipeline and register it (a plugin package "
        "with an `lssgen` entry point, or lssgen.register_adapter); see docs/plugins.md in the lssgen repository."
    )


__all__ = [
    "Adapter",
    "Architecture",
    "FluxAdapter",
    "InstalledAdapter",
    "find_adapter",
    "installed_adapters",
    "register_adapter",
    "unregister_adapter",
]
