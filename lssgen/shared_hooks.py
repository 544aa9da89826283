"""Hooks on a module that several patched pipes share (diffusers' `from_pipe`, and `lssgen.hires`, build an img2img
pipe on a text-to-image pipe's very modules; two ControlNet pipes may share a controlnet): diffusers allows one hook
per name on a module, so each pipe joins the one hook and leaves it at `unpatch`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry

if TYPE_CHECKING:
    from .plan import Stage


class _StageOfSharingPipes:
    """The `current_stage` a hook reads on a module that several patched pipes share (diffusers' `from_pipe` builds
    an img2img pipe on a text-to-image pipe's very modules): the low-resolution stage of whichever of them is in a
    call (one at a time: a call holds the module), else None."""

    def __init__(self):
        self.by_pipe: dict[int, Callable[[], Stage | None]] = {}

    def __call__(self) -> Stage | None:
        for current_stage in self.by_pipe.values():
            stage = current_stage()
            if stage is not None:
                return stage
        return None


def share_hook(
    module: torch.nn.Module,
    name: str,
    make_hook: Callable[[Callable[[], Stage | None]], Any],
    pipe: Any,
    current_stage: Callable[[], Stage | None],
) -> None:
    """Register `make_hook(current_stage)` on `module` as `name` for `pipe`; where another patched pipe sharing the
    module registered it already, `pipe` joins that hook instead (diffusers allows one hook per name)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(name)
    if hook is None:
        stages = _StageOfSharingPipes()
        hook = make_hook(stages)
        hook.lssgen_stages = stages
        registry.register_hook(hook, name)
    hook.lssgen_stages.by_pipe[id(pipe)] = current_stage


def release_hook(module: torch.nn.Module, name: str, pipe: Any) -> None:
    """Undo `share_hook` for `pipe`: the hook goes when no patched pipe uses it any more."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(name)
    if hook is None:
        return
    hook.lssgen_stages.by_pipe.pop(id(pipe), None)
    if not hook.lssgen_stages.by_pipe:
        registry.remove_hook(name, recurse=False)
