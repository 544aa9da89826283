"""lssgen: faster text-to-image generation by denoising the early steps at a lower resolution (LSSGen).

`import lssgen` loads nothing else: each public name loads its submodule on first use (as `import diffusers`
does), so the command line and tools that need one name do not pay for torch and diffusers' pipelines up front.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule defining it. A new public name is a line here, in the import block below and in
# `__all__`.
_LAZY_NAMES = {
    "Adapter": "lssgen.adapters",
    "find_adapter": "lssgen.adapters",
    "installed_adapters": "lssgen.adapters",
    "register_adapter": "lssgen.adapters",
    "unregister_adapter": "lssgen.adapters",
    "hookimpl": "lssgen.hookspecs",
    "hires_fix": "lssgen.hires",
    "image_to_image_pipeline": "lssgen.hires",
    "inpainting_pipeline": "lssgen.hires",
    "ModelDefaults": "lssgen.loading",  # a model folder's lssgen.json
    "load_pipeline": "lssgen.loading",
    "model_defaults": "lssgen.loading",
    "Options": "lssgen.patch",
    "is_patched": "lssgen.patch",
    "patch": "lssgen.patch",
    "plan_for": "lssgen.patch",
    "unpatch": "lssgen.patch",
    "Stage": "lssgen.plan",
    "StagePlan": "lssgen.plan",
    "plan_stages": "lssgen.plan",
    "LatentUpsampler": "lssgen.upsampler",
    "weights_path": "lssgen.weights",  # the weights we trained, shipped with the package
}

if TYPE_CHECKING:
    from .adapters import Adapter, find_adapter, installed_adapters, register_adapter, unregister_adapter
    from .hires import hires_fix, image_to_image_pipeline, inpainting_pipeline
    from .hookspecs import hookimpl
    from .loading import ModelDefaults, load_pipeline, model_defaults
    from .patch import Options, is_patched, patch, plan_for, unpatch
    from .plan import Stage, StagePlan, plan_stages
    from .upsampler import LatentUpsampler
    from .weights import weights_path

# The same names as `_LAZY_NAMES` (tests/test_cli_startup.py checks), spelled out for type checkers and linters.
__all__ = [
    "Adapter",
    "LatentUpsampler",
    "ModelDefaults",
    "Options",
    "Stage",
    "StagePlan",
    "find_adapter",
    "hires_fix",
    "hookimpl",
    "image_to_image_pipeline",
    "inpainting_pipeline",
    "installed_adapters",
    "is_patched",
    "load_pipeline",
    "model_defaults",
    "patch",
    "plan_for",
    "plan_stages",
    "register_adapter",
    "unpatch",
    "unregister_adapter",
    "weights_path",
]


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


class _Package(types.ModuleType):
    """Keeps `lssgen.patch` the function: importing the submodule `lssgen.patch` (which any module importing from
    it does) makes Python set the package attribute of that name to the submodule, over the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY_NAMES.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
