"""ControlNet pipelines: the control condition at each stage's size, and the control window by noise level.

A stock ControlNet call prepares its control image once, at the target size, and hands it to the controlnet(s) at
every step, scaled by `controlnet_conditioning_scale` times a keep factor that `control_guidance_start/end` set per
*loop step index* (step i is kept when `start <= i / N` and `(i + 1) / N <= end`, N the loop's length). Under lssgen
neither holds: a low-resolution stage needs the condition at its own size, and one loop runs every stage's schedule
one after the other, so a step-index fraction no longer says how noisy a step is.

- Condition: the pipeline's own preparation method (`Adapter.control_image_method`, e.g. `prepare_image`) is stood in
  on the instance for the call. The stock call runs it as always (its checks, its arguments, the target size); lssgen
  then prepares the same control image again at each low-resolution stage's size with the same arguments
  (`Adapter.stage_control_image`: the pipeline's method at that size, plus whatever encoding the pipeline does after
  it), and a hook on the pipeline's controlnet module (a multi-controlnet as a whole) swaps each control image's
  condition of the stage in while that stage is denoised.
- Window: the window is read off the stock schedule at the target size with the call's step count: the noisiest and
  the least noisy step it keeps bound an interval of timesteps (open on a side where the window reaches the
  schedule's end). A controlnet call is kept when the loop's current timestep lies in that interval, in every stage,
  so a window means the same part of the generation at every size; at the target stage it keeps exactly the steps
  stock keeps.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from .shared_hooks import release_hook, share_hook

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .plan import Stage, StagePlan

CONTROL_HOOK = "lssgen_control"


def controlnets_of(pipe: Any) -> list[torch.nn.Module]:
    """Each controlnet of `pipe`, in the order the pipeline pairs them with control images (a multi-controlnet's
    `nets`); empty for a pipeline without one."""
    controlnet = getattr(pipe, "controlnet", None)
    if not isinstance(controlnet, torch.nn.Module):
        return []
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None else [controlnet]


def takes_control(pipe: Any, adapter: Adapter) -> bool:
    """Whether a call of `pipe` is a ControlNet call lssgen conditions per stage: its adapter knows the family's
    ControlNet class and the pipe has controlnets (the family's other classes share the adapter)."""
    return adapter.control_image_method is not None and bool(controlnets_of(pipe))


@dataclass(frozen=True)
class ControlWindow:
    """The timesteps a controlnet is kept at: `low <= t <= high` (infinite bounds where the window reaches the end
    of the schedule); `empty` when the stock call keeps no step at all."""

    low: float = -math.inf
    high: float = math.inf
    empty: bool = False

    def keeps(self, timestep: float) -> bool:
        return not self.empty and self.low <= timestep <= self.high

    @classmethod
    def from_stock(cls, start: float, end: float, timesteps: list[float]) -> ControlWindow:
        """The window of `control_guidance_start/end` on the stock schedule `timesteps` (the target size's)."""
        total = len(timesteps)
        # The stock rule, step by step: kept unless `i / N < start` or `(i + 1) / N > end`.
        kept = [i for i in range(total) if not (i / total < start or (i + 1) / total > end)]
        if not kept:
            return cls(empty=True)
        high = math.inf if kept[0] == 0 else timesteps[kept[0]]
        low = -math.inf if kept[-1] == total - 1 else timesteps[kept[-1]]
        return cls(low=low, high=high)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def control_windows(call: dict[str, Any], defaults: dict[str, Any], count: int, timesteps: list[float]):
    """Each control image's window, as the stock pipelines pair `control_guidance_start/end` with control images (a
    single value repeats; a single controlnet reads the first pair); None for an image whose window the arguments do
    not give, where the stock call's own checks raise."""
    start = call.get("control_guidance_start", defaults.get("control_guidance_start", 0.0))
    end = call.get("control_guidance_end", defaults.get("control_guidance_end", 1.0))
    if not isinstance(start, (list, tuple)) and isinstance(end, (list, tuple)):
        start = [start] * len(end)
    elif isinstance(start, (list, tuple)) and not isinstance(end, (list, tuple)):
        end = [end] * len(start)
    elif not isinstance(start, (list, tuple)):
        start, end = [start] * count, [end] * count
    windows: list[ControlWindow | None] = []
    for index in range(count):
        pair = (start[index], end[index]) if index < min(len(start), len(end)) else None
        windows.append(ControlWindow.from_stock(*pair, timesteps) if pair and all(map(_is_number, pair)) else None)
    return windows


def control_scales(call: dict[str, Any], defaults: dict[str, Any], count: int) -> list[Any]:
    """Each control image's `controlnet_conditioning_scale`, as the stock pipelines read it (a single value for
    every one; a list, one per control image, its first entry for a single controlnet)."""
    scale = call.get("controlnet_conditioning_scale", defaults.get("controlnet_conditioning_scale", 1.0))
    if isinstance(scale, (list, tuple)):
        return [scale[index] if index < len(scale) else None for index in range(count)]
    return [scale] * count


@dataclass
class StageControls:
    """One call's control conditions: per control image, its condition at each low-resolution stage (by stage index,
    filled when the pipeline prepares its control images), its scale and its window."""

    scales: list[Any]
    windows: list[ControlWindow | None]
    conditions: list[dict[int, Any]] = field(default_factory=list)
    # The timestep of the denoiser call in progress: read from the staged scheduler by the hook.
    current_timestep: Callable[[], float] | None = field(default=None, repr=False)


class ControlNetStageHook(ModelHook):
    """On the pipeline's controlnet module (a multi-controlnet as a whole, so that a union model called once per
    control image is served too): during an lssgen call, each control image's condition of the stage being denoised
    and its scale kept or zeroed by the control window of the current timestep; outside a call, nothing."""

    def __init__(self, current: Callable[[], tuple[Stage | None, StageControls] | None], adapter: Adapter):
        super().__init__()
        self.current = current
        self.adapter = adapter

    def initialize_hook(self, module):
        # Where the condition sits when the pipeline passes it by position (Z-Image's controlnet call).
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        name = self.adapter.control_condition_argument
        self.position = names.index(name) if name in names else None
        return module

    def pre_forward(self, module, *args, **kwargs):
        state = self.current()
        if state is None:
            return args, kwargs
        stage, controls = state
        name = self.adapter.control_condition_argument
        by_position = name not in kwargs and self.position is not None and self.position < len(args)
        stock = args[self.position] if by_position else kwargs.get(name)
        several = isinstance(stock, (list, tuple))
        count = len(stock) if several else 1
        if len(controls.conditions) != count:
            raise RuntimeError(
                f"lssgen prepared {len(controls.conditions)} control condition(s) but the controlnet got {count}: "
                "the pipeline did not prepare its control images through the adapter's `control_image_method`."
            )
        if stage is not None:
            conditions = [
                self.adapter.fit_control_condition(
                    stock[index] if several else stock, controls.conditions[index][stage.index]
                )
                for index in range(count)
            ]
            condition = conditions if several else conditions[0]
            if by_position:
                args = (*args[: self.position], condition, *args[self.position + 1 :])
            else:
                kwargs[name] = condition
        # As many scales as the pipeline passes: a multi-controlnet runs only the images it has scales for (FLUX.1's
        # pipeline pairs windows with nets, so its union controlnet given scalar windows runs the first image only).
        stock_scale = kwargs.get("conditioning_scale")
        scale_count = min(count, len(stock_scale)) if several and isinstance(stock_scale, (list, tuple)) else count
        scales = []
        for index in range(scale_count):
            window, scale = controls.windows[index], controls.scales[index]
            if window is None or not _is_number(scale):
                raise ValueError(
                    "lssgen cannot read `control_guidance_start`/`control_guidance_end`/"
                    f"`controlnet_conditioning_scale` for control image {index}; pass numbers, one per control image, "
                    "or `start_sigma=1.0` for the stock pipeline."
                )
            scales.append(scale if window.keeps(controls.current_timestep()) else 0.0 * scale)
        kwargs["conditioning_scale"] = scales if several else scales[0]
        return args, kwargs


def control_count(pipe: Any, adapter: Adapter, call: dict[str, Any]) -> int:
    """How many control images a ControlNet call conditions on: one per entry of the control argument for a
    multi-controlnet (one per controlnet, or several for one union controlnet), else one."""
    image = call.get(adapter.control_image_argument)
    several = getattr(pipe.controlnet, "nets", None) is not None and isinstance(image, (list, tuple))
    return len(image) if several else 1


def install_control_hooks(
    pipe: Any, adapter: Adapter, current_stage: Callable, current_controls: Callable
) -> list[torch.nn.Module]:
    """Hook the controlnets of `pipe`: the adapter's stage hook (the size conditioning the denoiser gets, which the
    pipeline hands the controlnet too) on each controlnet, and the control hook on the pipeline's controlnet module.
    A module another patched pipe shares keeps one hook, which each pipe joins (`share_hook`). Returns the hooked
    modules, for `remove_control_hooks`."""

    nets = controlnets_of(pipe)
    if adapter.stage_hook is not None:
        for net in nets:
            share_hook(net, adapter.stage_hook_name, adapter.stage_hook, pipe, current_stage)
    share_hook(
        pipe.controlnet, CONTROL_HOOK, lambda current: ControlNetStageHook(current, adapter), pipe, current_controls
    )
    return [pipe.controlnet, *nets]


def remove_control_hooks(pipe: Any, modules: list[torch.nn.Module], adapter: Adapter) -> None:

    if not modules:
        return
    release_hook(modules[0], CONTROL_HOOK, pipe)
    if adapter.stage_hook is not None:
        for net in modules[1:]:
            release_hook(net, adapter.stage_hook_name, pipe)


def stand_in_control_preparation(pipe: Any, adapter: Adapter, plan: StagePlan, controls: StageControls, run: Any):
    """A stand-in for the pipeline's control-image method: the stock result at the target size for the pipeline, and
    the same preparation at every low-resolution stage's size recorded in `controls` (one entry per call: the
    pipelines prepare their control images one by one, in order)."""
    stock_method = getattr(pipe, adapter.control_image_method)
    signature = inspect.signature(stock_method)

    def prepare(*args, **kwargs):
        prepared = stock_method(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        controls.conditions.append(
            {
                stage.index: adapter.stage_control_image(pipe, stock_method, dict(arguments.arguments), stage, run)
                for stage in plan.stages[:-1]
            }
        )
        return prepared

    return prepare


def tensor_control_size(call: dict[str, Any], argument: str) -> tuple[int, int] | None:
    """The size of the call's first control image where it is a `(B, C, H, W)` tensor: FLUX.1's and SD3's ControlNet
    pipelines take a tensor as it is and generate at its size, whatever `height`/`width` say."""
    image = call.get(argument)
    first = image[0] if isinstance(image, (list, tuple)) and image else image
    return tuple(first.shape[-2:]) if isinstance(first, torch.Tensor) and first.ndim == 4 else None


def check_tensor_control_size(pipe: Any, call: dict[str, Any], argument: str, plan: StagePlan) -> None:
    """For pipelines that generate at a tensor control image's size: every such tensor must have the planned size
    (one that halves down to every stage), else a ValueError naming the argument, before any denoising."""
    images = call.get(argument)
    for image in images if isinstance(images, (list, tuple)) else [images]:
        if isinstance(image, torch.Tensor) and image.ndim == 4 and tuple(image.shape[-2:]) != (plan.height, plan.width):
            raise ValueError(
                f"`{argument}` is a {image.shape[-1]}x{image.shape[-2]} tensor, which {type(pipe).__name__} "
                f"generates at as it is, but lssgen's stages need {plan.width}x{plan.height} (a size that halves "
                "down to every stage). Pass a control image of that size, or a PIL image, or `start_sigma=1.0` for "
                "the stock pipeline."
            )


def control_image_size(pipe: Any, adapter: Adapter, call: dict[str, Any]) -> tuple[int | None, int | None]:
    """The size a ControlNet call generates at when it takes it from the control image (SD's and SDXL's: no
    `height`/`width` given and no default size): the first control image's, as the control image processor reads
    it; else the call's (None: the family default)."""
    height, width = call.get("height"), call.get("width")
    image = call.get(adapter.control_image_argument)
    processor = getattr(pipe, "control_image_processor", None)
    if (height is None or width is None) and processor is not None and image is not None:
        # One image per controlnet, each possibly a list per prompt: the stock call reads the first one's size.
        while isinstance(image, (list, tuple)) and image:
            image = image[0]
        try:
            image_height, image_width = processor.get_default_height_width(image)
        except Exception:  # noqa: BLE001 - an image the stock call rejects with its own error
            return height, width
        height, width = height or image_height, width or image_width
    return height, width
