"""Caches and other stateful diffusers hooks on the denoiser, across lssgen's resolution changes.

Caching hooks (FirstBlockCache, MagCache, TaylorSeer, PyramidAttentionBroadcast, FasterCache, ...) keep tensors
of earlier denoising steps. Those have the previous stage's token count after a stage switch, so every stage
starts with the hooks' state cleared: its first step computes the whole model, and the cache fills again within
the stage. The same reset runs before and after every call, an exception or an interrupt included, for every
denoiser: the stock pipelines reset only `CacheMixin` models, and only at the end of a call that succeeded.
"""

from __future__ import annotations

from typing import Any


def reset_stateful_hooks(module: Any) -> None:
    """Clear the state of every stateful diffusers hook on `module` and its submodules (what a stock pipeline's
    `maybe_free_model_hooks` does for `CacheMixin` models), without adding a hook registry where there is none."""
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks(recurse=False)
