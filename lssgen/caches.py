"""Caches and other stateful diffusers hooks on the denoiser, across lssgen's resolution changes.

Caching hooks (FirstBlockCache, MagCache, TaylorSeer, PyramidAttentionBroadcast, FasterCache, ...) keep tensors
of earlier denoising steps. Those have the previous stage's token count after a stage switch, so every stage
starts with the hooks' state cleared: its first step computes the whole model, and the cache fills again within
the stage. The same reset runs before and after every call, an exception or an interrupt included, for every
denoiser: the stock pipelines reset only `CacheMixin` models, and only at the end of a call that succeeded.
Caches calibrated on an N-step schedule also get a per-stage schedule by noise level (`stage_rule` below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .plan import Stage


def diffusers_hooks(module: Any) -> list[Any]:
    """Every diffusers hook registered on `module` or its submodules."""
    return [
        hook
        for submodule in module.modules()
        for hook in getattr(getattr(submodule, "_diffusers_hook", None), "hooks", {}).values()
    ]


def reset_stateful_hooks(module: Any) -> None:
    """Clear the state of every stateful diffusers hook on `module` and its submodules (what a stock pipeline's
    `maybe_free_model_hooks` does for `CacheMixin` models), without adding a hook registry where there is none."""
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks(recurse=False)


# A cache calibrated on the step counter of one N-step schedule (MagCache's `mag_ratios`, its retention steps)
# would, in a stage that starts part-way down the schedule, apply the calibration of other noise levels. A stage
# rule maps such settings onto the stage by noise level: it returns `(object, attribute, value)` overrides for the
# stage about to run, given the hook and a `StageContext`. Rules are registered by hook class name, so the
# controller stays free of cache-specific branches; `StageCacheSchedule` applies them and undoes them.
StageRule = Callable[[Any, "StageContext"], list[tuple[Any, str, Any]]]
STAGE_RULES: dict[str, StageRule] = {}


def stage_rule(hook_class_name: str) -> Callable[[StageRule], StageRule]:
    """Register the per-stage rule of the hooks of class `hook_class_name`."""

    def register(rule: StageRule) -> StageRule:
        STAGE_RULES[hook_class_name] = rule
        return rule

    return register


@dataclass
class StageContext:
    stage: Stage  # the stage about to run
    reference_timesteps: Callable[[int], list[float]]  # the stock n-step schedule at the target size
    num_inference_steps: int  # N of the call: the stock schedule the user's step indices refer to
    original: Callable[[Any, str], Any]  # an attribute's value before any override of this call


def _nearest(reference: list[float], timestep: float) -> int:
    return min(range(len(reference)), key=lambda i: abs(reference[i] - timestep))


@stage_rule("MagCacheHeadHook")
def _mag_cache(hook: Any, context: StageContext) -> list[tuple[Any, str, Any]]:
    config = hook.config
    if config.calibrate:
        return []
    ratios = context.original(config, "mag_ratios")
    calibrated_steps = context.original(config, "num_inference_steps")
    reference = context.reference_timesteps(calibrated_steps)
    indices = [_nearest(reference, t) for t in context.stage.timesteps]
    # Steps before the calibration's retention step are never skipped: the same noise levels here.
    retention = int(context.original(config, "retention_ratio") * calibrated_steps + 0.5)
    kept = sum(1 for i in indices if i < retention)
    count = len(indices)
    return [
        (config, "mag_ratios", torch.stack([torch.as_tensor(ratios[i]) for i in indices])),
        (config, "num_inference_steps", count),
        (config, "retention_ratio", kept / count),
    ]


@stage_rule("TaylorSeerCacheHook")
def _taylorseer(hook: Any, context: StageContext) -> list[tuple[Any, str, Any]]:
    # `disable_cache_after_step` (full computation for the last, low-noise steps) refers to the steps of the call's
    # N-step schedule: here, the first stage step at or past that noise level. The warm-up
    # (`disable_cache_before_step`) stays a count of steps: each stage must gather its Taylor factors afresh.
    after = context.original(hook, "disable_cache_after_step")
    if after is None:
        return []
    reference = context.reference_timesteps(context.num_inference_steps)
    indices = [_nearest(reference, t) for t in context.stage.timesteps]
    local = next((j for j, i in enumerate(indices) if i >= after), len(indices))
    return [(hook, "disable_cache_after_step", local)]


class StageCacheSchedule:
    """For one call: clears the denoiser's stateful hooks at every stage start and applies the stage rules of its
    hooks; `restore` undoes every override and clears the state again."""

    def __init__(self, denoiser: Any, reference_timesteps: Callable[[int], list[float]], num_inference_steps: int):
        self.denoiser = denoiser
        self.reference_timesteps = reference_timesteps
        self.num_inference_steps = num_inference_steps
        self.hooks = [hook for hook in diffusers_hooks(denoiser) if type(hook).__name__ in STAGE_RULES]
        self._originals: dict[tuple[int, str], tuple[Any, str, Any]] = {}

    def _original(self, obj: Any, name: str) -> Any:
        saved = self._originals.get((id(obj), name))
        return getattr(obj, name) if saved is None else saved[2]

    def start(self, stage: Stage) -> None:
        reset_stateful_hooks(self.denoiser)
        context = StageContext(stage, self.reference_timesteps, self.num_inference_steps, self._original)
        for hook in self.hooks:
            for obj, name, value in STAGE_RULES[type(hook).__name__](hook, context):
                self._originals.setdefault((id(obj), name), (obj, name, getattr(obj, name)))
                setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, value in self._originals.values():
            setattr(obj, name, value)
        self._originals.clear()
        reset_stateful_hooks(self.denoiser)


# `lssgen bench --cache NAME[:key=value,...]`: the names, and the diffusers config each builds.
CACHE_CONFIGS = {
    "first-block": "FirstBlockCacheConfig",
    "pyramid-attention-broadcast": "PyramidAttentionBroadcastConfig",
    "taylorseer": "TaylorSeerCacheConfig",
    "mag": "MagCacheConfig",
    "faster": "FasterCacheConfig",
}


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: `mag_ratios=[1.0, 0.9],threshold=0.1` is two items."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in [*items, current] if item.strip()]


def cache_config(spec: str, pipe: Any) -> Any:
    r"""
    A diffusers cache config from `NAME[:key=value,...]`, e.g. `first-block:threshold=0.2` or
    `mag:mag_ratios=[1.0,0.98,...],num_inference_steps=28`. Values are Python literals (else strings). The caches
    that need the current timestep read it from `pipe`. Raises a `ValueError` naming what is wrong.
    """
    import ast
    import dataclasses

    import diffusers.hooks

    name, _, rest = spec.partition(":")
    if name not in CACHE_CONFIGS:
        raise ValueError(f"--cache {spec!r}: unknown cache {name!r}; choose one of {', '.join(CACHE_CONFIGS)}.")
    config_class = getattr(diffusers.hooks, CACHE_CONFIGS[name])
    fields = {field.name for field in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in fields:
            raise ValueError(
                f"--cache {spec!r}: {item!r} is not key=value with a {config_class.__name__} key "
                f"({', '.join(sorted(fields))})."
            )
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    if "current_timestep_callback" in fields:
        kwargs.setdefault("current_timestep_callback", lambda: pipe.current_timestep)
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--cache {spec!r}: {' '.join(str(error).split())}") from None
