"""Caches and other stateful diffusers hooks on the denoiser, across lssgen's resolution changes.

Caching hooks (FirstBlockCache, MagCache, TaylorSeer, PyramidAttentionBroadcast, FasterCache, ...) keep tensors
of earlier denoising steps. Those have the previous stage's token count after a stage switch, so every stage
starts with the hooks' state cleared: its first step computes the whole model, and the cache fills again within
the stage. The same reset runs before and after every call, an exception or an interrupt included, for every
denoiser: the stock pipelines reset only `CacheMixin` models, and only at the end of a call that succeeded.
Caches calibrated on an N-step schedule also get a per-stage schedule by noise level (`stage_rule` below), and
caches that read the step from their cache context (SeaCache) get the stage's step (`StepContextHook` below).
Everything a hook needs to know about the running call is handed to it by `lssgen.patch` through
`StageCacheSchedule`: this module imports nothing from `patch` or `controller`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.utils.torch_utils import unwrap_module

if TYPE_CHECKING:
    from .plan import Stage
    from .schedule import StepPosition


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


@stage_rule("FasterCacheBlockHook")
def _faster_cache_block(hook: Any, context: StageContext) -> list[tuple[Any, str, Any]]:
    # FasterCache computes an attention block only at a multiple of its skip range past step 0 of its counter, and
    # reuses its cache otherwise: it counts on its first step lying outside the skip range (stock step 0, t=1000),
    # and fails on an empty cache where it does not. A later stage starts inside the range with its state just
    # cleared, so the counter starts at the skip range instead: the stage's first step computes and fills the
    # cache, and the stock compute/reuse pattern follows from there.
    return [(hook.state, "iteration", hook.block_skip_range)]


# The step metadata of a cache context (diffusers' `CacheContext`: `step_index`, `sigma`, `num_inference_steps`).
# The stock image pipelines enter `transformer.cache_context("cond")` with none of it (Flux2Pipeline and SD3 enter
# none at all), and a pipeline that passes it would count the steps of the whole loop, across stages. For the
# duration of an lssgen call, a hook registered last on the denoiser, so that its `pre_forward` runs before every
# other hook's (each registration wraps the forward built so far), gives the state managers of the stateful hooks
# the context of the call about to run, with the coordinates of the stage: the step within the stage, its sigma,
# and the stage's step count. Within a stage that is an ordinary schedule of its own, so a cache that gates on it
# (SeaCache's retention and end steps, its adjacency check, its SEA filter's noise level) works unchanged, and
# every stage's first step (index 0, state just cleared) computes the whole model. Where the pipeline entered no
# context, the hook supplies one per denoiser call of the step ("lssgen call 0", "lssgen call 1", ...), so that
# cached state is never shared between a conditional and an unconditional call. After the call the contexts are
# put back as they were, and the hook is removed after the lssgen call, an exception included. The hook also
# carries the adapter's unpacking at the stage in force (`StepContextHook.stage_latents`), which SeaCache's
# `raw_vision_callback` (`StageRawVision`) finds on the denoiser it is called with.
STEP_CONTEXT_HOOK = "lssgen_step_context"


def _state_managers(module: Any) -> list[StateManager]:
    """The distinct state managers of the stateful hooks on `module`: what `cache_context` sets a context on."""
    managers: dict[int, StateManager] = {}
    for hook in diffusers_hooks(module):
        if hook._is_stateful:
            for value in vars(hook).values():
                if isinstance(value, StateManager):
                    managers.setdefault(id(value), value)
    return list(managers.values())


class StepContextHook(ModelHook):
    """Gives each denoiser call's cache context the step of the stage being denoised (see `STEP_CONTEXT_HOOK`)."""

    def __init__(
        self,
        managers: list[StateManager],
        position: Callable[[], StepPosition],
        denoiser_latents: Callable[[torch.Tensor, Stage], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.managers = managers
        self.position = position
        self.denoiser_latents = denoiser_latents
        self._step: int | None = None
        self._calls = 0  # denoiser calls so far in this step
        self._previous: list[tuple[StateManager, CacheContext | None]] = []

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        position = self.position()
        if position.step != self._step:
            self._step, self._calls = position.step, 0
        name = f"lssgen call {self._calls}"
        self._calls += 1
        step = {"step_index": position.stage_step, "num_inference_steps": position.stage.num_denoiser_steps}
        if position.sigma is not None:
            step["sigma"] = position.sigma
        self._previous = [(manager, manager._context) for manager in self.managers]
        for manager, context in self._previous:
            manager.set_context(dataclasses.replace(context or CacheContext(name), **step))
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.put_back()
        return output

    def put_back(self) -> None:
        """The contexts as the pipeline set them (also after a call that raised, which skips `post_forward`)."""
        for manager, context in self._previous:
            manager.set_context(context)
        self._previous = []

    def stage_latents(self, latent: torch.Tensor) -> torch.Tensor | None:
        """The denoiser's latent input unpacked at the stage in force, `(B, C, h, w)`; None without an unpacker."""
        if self.denoiser_latents is None:
            return None
        return self.denoiser_latents(latent, self.position().stage)


class StageCacheSchedule:
    """For one call: clears the denoiser's stateful hooks at every stage start, applies the stage rules of its
    hooks and gives their cache contexts the stage's step (`StepContextHook`); `restore` undoes all of it and
    clears the state again. `position` is where the loop is; `denoiser_latents(latent, stage)` unpacks the
    denoiser's latent input at a stage's size (the adapter's `denoiser_latents`), for `StageRawVision`."""

    def __init__(
        self,
        denoiser: Any,
        reference_timesteps: Callable[[int], list[float]],
        num_inference_steps: int,
        position: Callable[[], StepPosition] | None = None,
        denoiser_latents: Callable[[torch.Tensor, Stage], torch.Tensor] | None = None,
    ):
        self.denoiser = denoiser
        self.reference_timesteps = reference_timesteps
        self.num_inference_steps = num_inference_steps
        self.position = position
        self.denoiser_latents = denoiser_latents
        self.hooks = [hook for hook in diffusers_hooks(denoiser) if type(hook).__name__ in STAGE_RULES]
        self._originals: dict[tuple[int, str], tuple[Any, str, Any]] = {}
        self._step_context: StepContextHook | None = None

    def _original(self, obj: Any, name: str) -> Any:
        saved = self._originals.get((id(obj), name))
        return getattr(obj, name) if saved is None else saved[2]

    def start(self, stage: Stage) -> None:
        if self._step_context is None and self.position is not None:
            managers = _state_managers(self.denoiser)
            if managers:  # no hook keyed by a cache context: nothing to give one to, and the forward stays as it is
                self._step_context = StepContextHook(managers, self.position, self.denoiser_latents)
                registry = HookRegistry.check_if_exists_or_initialize(self.denoiser)
                registry.register_hook(self._step_context, STEP_CONTEXT_HOOK)
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
        if self._step_context is not None:
            self._step_context.put_back()
            self.denoiser._diffusers_hook.remove_hook(STEP_CONTEXT_HOOK, recurse=False)
            self._step_context = None
        reset_stateful_hooks(self.denoiser)


class StageCacheSchedules:
    """`StageCacheSchedule` of each of a pipeline's denoisers (Wan 2.2 calls one of two experts per step: a cache on
    either holds tensors of the stage it last ran in)."""

    def __init__(self, schedules: list[StageCacheSchedule]):
        self.schedules = schedules

    def start(self, stage: Stage) -> None:
        for schedule in self.schedules:
            schedule.start(stage)

    def restore(self) -> None:
        for schedule in self.schedules:
            schedule.restore()


class StageRawVision:
    r"""
    SeaCache's `raw_vision_callback` for a pipe that lssgen patches: the latent being denoised, one `(C, 1, h, w)`
    tensor per image, unpacked by the pipe's adapter at the size of the stage in force. Outside an lssgen call it
    returns None (SeaCache then runs every step in full).

    The running call is found on the denoiser SeaCache calls it with: during an lssgen call, its hook registry holds
    the call's `StepContextHook`, which knows the stage and the adapter's unpacking.

    Args:
        pipe (`DiffusionPipeline`): the pipe whose denoiser the cache is applied to (patched now or later); it names
            the callback in reports.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe

    def __repr__(self) -> str:
        return f"StageRawVision({type(self.pipe).__name__})"

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
        module = unwrap_module(module)
        registry = getattr(module, "_diffusers_hook", None)
        step_context = None if registry is None else registry.get_hook(STEP_CONTEXT_HOOK)
        if step_context is None or step_context.denoiser_latents is None:
            return None
        forward = inspect.signature(type(module).forward)
        # The latent is the denoiser's first argument (`hidden_states`, or a UNet's `sample`), by position or name.
        arguments = forward.bind_partial(module, *args, **kwargs).arguments
        latent = arguments.get(list(forward.parameters)[1])
        if not isinstance(latent, torch.Tensor):
            return None
        latents = step_context.stage_latents(latent)
        return list(latents.unsqueeze(2).unbind(0))


def sea_cache_config(pipe: Any, **kwargs: Any) -> Any:
    r"""
    A diffusers `SeaCacheConfig` that works on `pipe` under lssgen: its `raw_vision_callback` is a
    [`StageRawVision`] of `pipe`, and lssgen gives each denoiser call the step metadata of its stage. The stock
    image pipelines pass no step metadata, so without lssgen (or with `start_sigma=1.0`) SeaCache runs every step
    in full and logs a warning.

    Args:
        pipe (`DiffusionPipeline`): the pipe whose denoiser the cache goes on.
        **kwargs: the other `SeaCacheConfig` fields (`threshold`, `residual_order`, `retention_steps`,
            `cache_end_steps`, `max_consecutive_cached`, `power_exp`); step counts refer to each stage's steps.

    Example:

    ```py
    >>> import lssgen
    >>> from lssgen.caches import sea_cache_config

    >>> lssgen.patch(pipe, upsampler)
    >>> pipe.transformer.enable_cache(sea_cache_config(pipe, threshold=0.25))
    >>> image = pipe("a lighthouse at dusk", height=1024, width=1024).images[0]
    ```
    """
    from diffusers.hooks import SeaCacheConfig

    kwargs.setdefault("raw_vision_callback", StageRawVision(pipe))
    return SeaCacheConfig(**kwargs)


# `lssgen bench --cache NAME[:key=value,...]`: the names, and the diffusers config each builds.
CACHE_CONFIGS = {
    "first-block": "FirstBlockCacheConfig",
    "pyramid-attention-broadcast": "PyramidAttentionBroadcastConfig",
    "taylorseer": "TaylorSeerCacheConfig",
    "mag": "MagCacheConfig",
    "faster": "FasterCacheConfig",
    "sea": "SeaCacheConfig",
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
    that need the current timestep read it from `pipe`; SeaCache gets [`StageRawVision`] of `pipe`. Raises a
    `ValueError` naming what is wrong.
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
    if "raw_vision_callback" in fields:
        kwargs.setdefault("raw_vision_callback", StageRawVision(pipe))
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--cache {spec!r}: {' '.join(str(error).split())}") from None
