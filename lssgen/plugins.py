"""One plugin manager for lssgen; built-in adapters load through the same entry points as third-party ones."""

from __future__ import annotations

import importlib
import logging

import pluggy

from . import hookspecs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lssgen"
# Declared as entry points in our own pyproject.toml too; listed here so a source checkout that was never
# installed (no package metadata) still has them.
BUILTIN_PLUGINS = ("lssgen.adapters.flux",)

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
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not break lssgen
            logger.warning(f"lssgen plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error}")
            continue
        if not pm.is_registered(plugin):
            pm.register(plugin, name=entry_point.name)
            dist = getattr(entry_point, "dist", None)
            _plugin_packages[entry_point.name] = dist.name if dist is not None else "?"
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        if not pm.is_registered(module):
            pm.register(module, name=module_name.rsplit(".", 1)[-1])
            _plugin_packages[module_name.rsplit(".", 1)[-1]] = "lssgen"
    return pm


def plugin_package(plugin_name: str) -> str:
    """The distribution that provided a plugin ("lssgen" for built-ins, "runtime" for register_adapter)."""
    return _plugin_packages.get(plugin_name, "runtime")
