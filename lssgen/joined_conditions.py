r"""
Conditions the stock loop joins to the latents along the channels (FLUX.1 Fill and Control, CogView4 Control).

These pipelines prepare a condition once, before the loop and at the target size (FLUX.1 Control: the control image
encoded and packed; Fill: the masked image's latents joined to the mask), hold it in a local of `__call__`, and
every step denoise `torch.cat([latents, condition], dim)`. No callback reaches the local, and at a smaller stage
the two no longer fit.

lssgen stands in for the pipeline method that makes the condition (`prepare_image`, or Fill's
`prepare_mask_latents`) for the call: it runs the stock method and returns its result as a `StageCondition`, a
tensor subclass that carries on through whatever the pipeline does to it next (encoding, normalising, packing, joining
with the mask: each result is a `StageCondition` too). When the loop concatenates one with the latents (any
`torch.cat` with an input that is not one), the result is a plain tensor, and during a low-resolution stage the
condition in it is the stage's own: the pipeline's preparation repeated at the stage's size (`ConditionRule.at_stage`).
At the target size it is the stock condition, bit for bit.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .plan import Stage

# The call in progress: what a StageCondition concatenated in the loop stands for at the current stage.
_FOLLOWER: contextvars.ContextVar[ConditionFollower | None] = contextvars.ContextVar("lssgen_condition", default=None)


@dataclass(frozen=True)
class ConditionRule:
    """Which method of a pipeline makes its joined condition, and how to make the condition at a stage:
    `at_stage(pipe, run, arguments, stage)` gives the tensor the loop concatenates, at `stage`'s size, from the
    arguments the stock method was called with (bound by name)."""

    method: str
    at_stage: Callable[[Any, Any, dict[str, Any], Stage], torch.Tensor]
    argument: str  # the call argument the condition comes from, named in errors


@dataclass
class ConditionFollower:
    run: Any
    rule: ConditionRule
    arguments: dict[str, Any] | None = None
    _stages: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def condition(self, stage: Stage) -> torch.Tensor:
        key = (stage.latent_height, stage.latent_width)
        if key not in self._stages:
            self._stages[key] = self.rule.at_stage(self.run.pipe, self.run, self.arguments, stage)
        return self._stages[key]

    def join(self, tensors: list[Any], dim: int) -> torch.Tensor:
        """The loop's concatenation, as plain tensors, with the stage's condition in place of the target-size one
        during a low-resolution stage."""
        stage = self.run.scheduler.low_resolution_stage
        joined = []
        for tensor in tensors:
            if isinstance(tensor, StageCondition):
                tensor = self.condition(stage) if stage is not None else tensor
                tensor = tensor.as_subclass(torch.Tensor)
            joined.append(tensor)
        return torch.cat(joined, dim)


class StageCondition(torch.Tensor):
    """A condition the pipeline prepared at the target size (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        follower = _FOLLOWER.get()
        if func is torch.cat and follower is not None:
            tensors = kwargs.get("tensors", args[0] if args else None)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if any(not isinstance(t, StageCondition) for t in tensors):
                return follower.join(list(tensors), dim)
        return super().__torch_function__(func, types, args, kwargs)


def binary_mask_at(mask: torch.Tensor, stage: Stage) -> torch.Tensor:
    """A mask in pixels `(B, 1, H, W)` at `stage`'s pixel size: averaged by area, then kept binary (at least half
    repainted: repainted), as the inpainting models and FLUX.1 Fill were trained on."""
    resized = F.interpolate(mask.float(), (stage.height, stage.width), mode="area")
    return (resized >= 0.5).to(mask.dtype)


def prepared_at_stage(pipe: Any, arguments: dict[str, Any], stage: Stage) -> torch.Tensor:
    """The pipeline's own `prepare_image` of the call's control image (`arguments`, as the stock method got them) at
    `stage`'s size; a tensor, which the method takes as it is, resized to the stage by the pipeline's image processor
    first."""
    image = arguments["image"]
    if isinstance(image, torch.Tensor):
        image = pipe.image_processor.resize(image, stage.height, stage.width)
    return type(pipe).prepare_image(pipe, **{**arguments, "image": image, "height": stage.height, "width": stage.width})


def stand_in(pipe: Any, run: Any, rule: ConditionRule) -> tuple[dict[str, Any], ConditionFollower]:
    """The stand-in for `rule.method` for one call (an instance attribute; the caller restores what was there), and
    the follower to make current (`following`) while the call runs."""
    follower = ConditionFollower(run, rule)
    stock = getattr(pipe, rule.method)
    signature = inspect.signature(stock)

    def prepare(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        follower.arguments = dict(bound.arguments)
        prepared = stock(*args, **kwargs)
        tensors = prepared if isinstance(prepared, tuple) else (prepared,)
        # Where the stock loop would fail only when it first joins them, mid-denoising.
        batch = run.batch
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.shape[0] not in (batch, 2 * batch):
                raise ValueError(
                    f"`{rule.argument}` gives {tensor.shape[0]} conditions for an effective batch of {batch} images "
                    "(prompts x images per prompt): pass one, or one per prompt."
                )
        if isinstance(prepared, tuple):
            return tuple(p.as_subclass(StageCondition) if isinstance(p, torch.Tensor) else p for p in prepared)
        return prepared.as_subclass(StageCondition)

    return {rule.method: prepare}, follower


class following:
    """Make `follower` the one StageConditions concatenated in the loop answer to, for a `with` block."""

    def __init__(self, follower: ConditionFollower | None):
        self.follower = follower

    def __enter__(self):
        self.token = _FOLLOWER.set(self.follower)

    def __exit__(self, *exc):
        _FOLLOWER.reset(self.token)
