"""The plugin contract of lssgen (pluggy project name `lssgen`).

A plugin is a module (or object) with functions marked `@lssgen.hookimpl`, exposed to lssgen through an
entry point in the `lssgen` group of its package:

```toml
[project.entry-points.lssgen]
pixart = "lssgen_adapter_pixart"
```
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("lssgen")
hookimpl = pluggy.HookimplMarker("lssgen")


@hookspec
def register_adapters(register: Callable) -> None:
    """Call `register(adapter)` for every `lssgen.Adapter` instance this plugin provides."""
