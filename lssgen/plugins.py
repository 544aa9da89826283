"""One plugin manager for lssgen; built-in adapters load through the same entry points as third-party ones."""

from __future__ import annotations

import functools
import importlib
import logging

import pluggy

from . import hookspecs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lssgen"
# Declared as entry points in our own pyproject.toml too; listed here so a source checkout that was never
# installed (no package metadata) still has them.
BUILTIN_PLUGINS = (
    "lssgen.adapters.flux",
    "lssgen.adapters.flux2",
    "lssgen.adapters.sd3",
    "lssgen.adapters.sdxl",
    "lssgen.adapters.sd",
    "lssgen.adapters.cogview4",
    "lssgen.adapters.chroma",
    "lssgen.adapters.qwenimage",
    "lssgen.adapters.zimage",
    "lssgen.adapters.wan",
)

pm = pluggy.PluginManager("lssgen")
pm.add_hookspecs(hookspecs)
_loaded = False
_plugin_packages: dict[str, str] = {}  # plugin name -> distribution that provided it


def load_plugins() -> pluggy.PluginManager:
    """Load the built-in and installed plugins once; later calls return the same manager."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(entry_point.name) is None and not pm.is_blocked(entry_point.name):
            dist = getattr(entry_point, "dist", None)
            _register(entry_point.name, entry_point.load, dist.name if dist is not None else "?")
    for module_name in BUILTIN_PLUGINS:
        _register(module_name.rsplit(".", 1)[-1], functools.partial(importlib.import_module, module_name), "lssgen")
    return pm


def _register(name: str, load, package: str) -> None:
    try:
        plugin = load()
    except Exception as error:  # a broken plugin must not take the others down with it
        logger.warning(f"lssgen plugin {name!r} from {package} failed to load and is skipped: {error}")
        return
    if not pm.is_registered(plugin):
        pm.register(plugin, name=name)
        _plugin_packages[name] = package


def plugin_package(plugin_name: str) -> str:
    """The distribution that provided a plugin ("lssgen" for built-ins, "runtime" for register_adapter)."""
    return _plugin_packages.get(plugin_name, "runtime")
