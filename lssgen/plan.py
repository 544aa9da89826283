"""The stage plan: which resolutions run, for how many steps, on which timesteps.

Everything here is arithmetic on the call's arguments, the scheduler's config and a few adapter facts;
no model runs. The rules are those of the LSSGen method (DESIGN.md §1).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class ScheduleFacts(Protocol):
    """What the plan needs to know about a model family (adapters provide it)."""

    flow: bool  # flow matching (sigma schedule, truncation on timesteps) or diffusion (img2img rule)
    latent_multiple: int  # latent sides must be multiples of this (2 for 2x2-packed latents)
    min_stage_latent_side: int  # the smallest stage's short side, in latent cells, at least

    def timestep_kwargs(self, scheduler: Any, num_steps: int, latent_height: int, latent_width: int) -> dict:
        """The `set_timesteps` arguments that give a stage of this size its own schedule."""


@dataclass(frozen=True)
class Stage:
    """One resolution of a plan. Stage 0 is the smallest; the last stage is the target size."""

    index: int
    latent_height: int
    latent_width: int
    vae_scale_factor: int
    num_steps: int  # length of the stage's full schedule (n_k) before truncation
    begin_index: int  # where in that schedule the stage starts (0 for a text-to-image first stage)
    timesteps: tuple[float, ...]  # the timesteps the denoiser sees in this stage
    first_sigma: float | None  # noise level the stage starts from (flow models)
    scheduler_kwargs: dict = field(compare=False, repr=False)  # its scheduler's `set_timesteps` arguments
    # Config overrides of the stage's own scheduler (e.g. an unshifted schedule); none: the pipeline's config.
    scheduler_config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def height(self) -> int:
        return self.latent_height * self.vae_scale_factor

    @property
    def width(self) -> int:
        return self.latent_width * self.vae_scale_factor

    @property
    def num_denoiser_steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class StagePlan:
    """The stages of one generation, smallest first, and the size the pipeline is called with."""

    stages: tuple[Stage, ...]
    height: int
    width: int
    # How each stage's result is scaled up for the next, in words (set by `lssgen.plan_for`; empty otherwise).
    scaling: str = field(default="", compare=False)
    # The method that made the plan, as `--method` spells it, where it is not LSSGen's own (`lssgen.methods`).
    method: str = field(default="", compare=False)

    @property
    def total_steps(self) -> int:
        return sum(stage.num_denoiser_steps for stage in self.stages)

    @property
    def is_multi_resolution(self) -> bool:
        return len(self.stages) > 1

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Global step index one past each stage's last step."""
        ends, total = [], 0
        for stage in self.stages:
            total += stage.num_denoiser_steps
            ends.append(total)
        return tuple(ends)

    def stage_at(self, step_index: int) -> Stage:
        """The stage that runs global denoising step `step_index` (the last stage past the end)."""
        for stage, end in zip(self.stages, self.stage_ends):
            if step_index < end:
                return stage
        return self.stages[-1]

    def describe(self) -> str:
        """A small table of the plan, for logs and the command line."""
        lines = [f"method: {self.method}"] if self.method else []
        lines += [f"{'stage':<7}{'image':<12}{'latent':<10}{'steps':<14}{'timesteps':<20}start sigma"]
        count = len(self.stages)
        for stage in self.stages:
            steps = f"{stage.num_denoiser_steps}"
            if stage.begin_index:
                steps += f" of {stage.num_steps}"
            span = f"{stage.timesteps[0]:.1f} -> {stage.timesteps[-1]:.1f}"
            sigma = "-" if stage.first_sigma is None else f"{stage.first_sigma:.3f}"
            lines.append(
                f"{f'{stage.index + 1}/{count}':<7}{f'{stage.width}x{stage.height}':<12}"
                f"{f'{stage.latent_width}x{stage.latent_height}':<10}{steps:<14}{span:<20}{sigma}"
            )
        lines.append(f"denoiser steps in all: {self.total_steps}")
        if self.scaling and self.is_multi_resolution:
            lines.append(f"scaling between stages: {self.scaling}")
        return "\n".join(lines)


def check_number(name: str, value: Any, *, integer: bool = False) -> None:
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"`{name}` must be {kind}, got {type(value).__name__} {value!r}.")


def count_low_resolution_stages(height: int, width: int, min_resolution: int, start_sigma: float) -> int:
    """K: how many times the target can be halved while the short side stays >= `min_resolution`."""
    if start_sigma == 1.0:
        return 0
    return int(math.log2(min(height, width) // min_resolution))


def stage_step_count(
    num_inference_steps: int, height: int, width: int, base_height: int, base_width: int, shorten: bool
) -> int:
    """Steps of a stage of `height` x `width` pixels: fewer for smaller stages when shortening."""
    if not shorten:
        return num_inference_steps
    factor = math.log2(max(2.0, (base_width / width) * (base_height / height)))
    return int(num_inference_steps // factor)


@dataclass(frozen=True)
class Options:
    r"""
    The method's call arguments. Each can be set per call, or as a default through `lssgen.patch(pipe, **options)`.

    Args:
        start_sigma (`float`, defaults to `0.75`): noise level each later stage restarts from; 0.667 is faster.
            `1.0` turns the method off (the stock pipeline runs unchanged).
        min_resolution (`int`, defaults to the family's, `512` for image models): short side, in pixels, of the
            smallest stage at least.
        shorten_intermediate_steps (`bool`, defaults to the family's published default): fewer steps for the
            smaller stages.
        base_height (`int`), base_width (`int`): the model's native size, the reference for shortening.
        scaling_space (`str`): `"learned"` (alias `"resnet"`, default with an upsampler), `"latent"` (bicubic
            latent interpolation, default without one) or `"pixel"` (decode → bicubic → encode).
        noise (`str`, defaults to `"fresh"`): how a stage switch re-noises: `"fresh"` draws new noise at every
            switch; `"shared"` reads one noise field drawn at the target size once per call, cell by cell (a cell of
            a smaller stage reads the field at its top-left corner), so a cell keeps its noise across stages.
        method (`str` or `lssgen.methods.Method`, defaults to `"lssgen"`): the multi-resolution method, by name
            (`"refine"`), with parameters (`"refine:sigma=0.12,steps=1"`) or as an instance; the options above
            that it does not read are refused when given (see `lssgen.methods`).
    """

    start_sigma: float = 0.75
    min_resolution: int = 512
    shorten_intermediate_steps: bool | None = None
    base_height: int | None = None
    base_width: int | None = None
    scaling_space: str | None = None
    noise: str = "fresh"
    method: Any = "lssgen"


NOISE_MODES = ("fresh", "shared")


OPTION_NAMES = tuple(f.name for f in fields(Options))


def validate_options(
    *,
    start_sigma: float,
    min_resolution: int,
    base_height: int | None = None,
    base_width: int | None = None,
    shorten_intermediate_steps: bool | None = None,
) -> None:
    """Raise a clear error for method options no image size could make valid (checked on every call, even one
    that `start_sigma=1.0` hands to the stock pipeline unchanged)."""
    check_number("start_sigma", start_sigma)
    if not 0.0 < start_sigma <= 1.0:
        raise ValueError(
            f"`start_sigma` must be in (0, 1], got {start_sigma}. Use 0.75 (default) or 0.667 (faster); "
            "1.0 turns multi-resolution generation off."
        )
    check_number("min_resolution", min_resolution, integer=True)
    if min_resolution <= 0:
        raise ValueError(f"`min_resolution` must be a positive number of pixels (e.g. 512), got {min_resolution}.")
    for name, value in (("base_height", base_height), ("base_width", base_width)):
        if value is None:
            continue
        check_number(name, value, integer=True)
        if value < 1:
            raise ValueError(f"`{name}` must be a positive number of pixels (the model's native size), got {value}.")
    if shorten_intermediate_steps is not None and not isinstance(shorten_intermediate_steps, bool):
        raise TypeError(f"`shorten_intermediate_steps` must be True or False, got {shorten_intermediate_steps!r}.")


def validate_arguments(
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    start_sigma: float,
    min_resolution: int,
    base_height: int,
    base_width: int,
) -> None:
    """Raise a clear error for arguments the method cannot use."""
    for name, value in (("height", height), ("width", width), ("num_inference_steps", num_inference_steps)):
        check_number(name, value, integer=True)
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    validate_options(
        start_sigma=start_sigma, min_resolution=min_resolution, base_height=base_height, base_width=base_width
    )
    if start_sigma < 1.0 and min_resolution > min(height, width):
        raise ValueError(
            f"`min_resolution`={min_resolution} is larger than the image's short side ({min(height, width)} px "
            f"for {width}x{height}). Use a `min_resolution` of at most {min(height, width)} (half of it gives one "
            "low-resolution stage), or pass `start_sigma=1.0` for plain generation."
        )


def plan_stages(
    height: int,
    width: int,
    num_inference_steps: int,
    *,
    scheduler: Any,
    facts: ScheduleFacts,
    vae_scale_factor: int,
    start_sigma: float = 0.75,
    min_resolution: int = 512,
    shorten_intermediate_steps: bool = True,
    base_height: int = 1024,
    base_width: int = 1024,
    strength: float = 1.0,
) -> StagePlan:
    r"""
    Plan a multi-resolution generation.

    Args:
        height (`int`), width (`int`): requested image size in pixels.
        num_inference_steps (`int`): steps of a plain generation (N).
        scheduler (`SchedulerMixin`): the pipeline's scheduler; only its class and config are used (a fresh copy
            computes each stage's timesteps).
        facts (`ScheduleFacts`): the model family's rules, usually the pipeline's adapter.
        vae_scale_factor (`int`): pixels per latent cell.
        start_sigma (`float`, defaults to `0.75`): noise level later stages restart from; `1.0` = plain generation.
        min_resolution (`int`, defaults to `512`): the smallest stage's short side is at least this many pixels.
        shorten_intermediate_steps (`bool`, defaults to `True`): give smaller stages proportionally fewer steps.
        base_height (`int`), base_width (`int`, default `1024`): the model's native size, for shortening.
        strength (`float`, defaults to `1.0`): image-to-image. The stock img2img call at the target size starts
            its schedule where `strength` cuts it; no stage starts with more noise than that start's, compared at
            the stage's size (a stage `f` times smaller per side: `f` times less noise per unit of image). The first
            stage starts at its first step within that bound; later stages restart from `start_sigma` times the
            stock start, within it (see docs/how-it-works.md). `1.0` starts from pure noise, as text-to-image.

    Returns:
        [`StagePlan`]: the stages, smallest first. The target is rounded down (with a warning) so that it halves
        cleanly into every stage.

    Example:

    ```py
    >>> plan = plan_stages(1024, 1024, 28, scheduler=pipe.scheduler, facts=adapter, vae_scale_factor=8)
    >>> print(plan.describe())
    ```
    """
    validate_arguments(
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        start_sigma=start_sigma,
        min_resolution=min_resolution,
        base_height=base_height,
        base_width=base_width,
    )
    check_number("strength", strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be in (0, 1] for a multi-resolution plan, got {strength}.")
    num_low = count_low_resolution_stages(height, width, min_resolution, start_sigma)
    target_height, target_width = rounded_target(height, width, num_low, vae_scale_factor, facts)
    _check_smallest_stage(height, width, target_height, target_width, num_low, min_resolution, vae_scale_factor, facts)
    warn_if_rounded(height, width, num_low, vae_scale_factor, facts)

    # Image-to-image: where the stock call would start its schedule at the target size. Every stage is bounded by
    # that start's noise, each at its own size (`_noise_to_signal`).
    stock_start = _stock_img2img_start(
        scheduler, facts, num_inference_steps, strength, target_height // vae_scale_factor,
        target_width // vae_scale_factor,
    )  # fmt: skip
    stages = []
    for index in range(num_low + 1):
        scale = 2 ** (num_low - index)
        latent_height = target_height // vae_scale_factor // scale
        latent_width = target_width // vae_scale_factor // scale
        num_steps = stage_step_count(
            num_inference_steps,
            latent_height * vae_scale_factor,
            latent_width * vae_scale_factor,
            base_height,
            base_width,
            shorten_intermediate_steps,
        )
        if num_steps < 1:
            logger.warning(
                f"num_inference_steps={num_inference_steps} leaves stage {index + 1} with no step after shortening; "
                "it runs 1 step. Use more steps or `shorten_intermediate_steps=False`."
            )
            num_steps = 1
        stages.append(
            _schedule_stage(
                index,
                latent_height,
                latent_width,
                vae_scale_factor,
                num_steps,
                start_sigma,
                scheduler,
                facts,
                strength=strength,
                stock_start=stock_start,
                scale=scale,
                first=stages[0] if stages else None,
            )
        )
    return StagePlan(stages=tuple(stages), height=target_height, width=target_width)


def rounded_target(
    height: int, width: int, num_low: int, vae_scale_factor: int, facts: ScheduleFacts
) -> tuple[int, int]:
    """The target size rounded down so that it halves cleanly `num_low` times (whole packed patches at every stage)."""
    unit = vae_scale_factor * facts.latent_multiple * 2**num_low
    return height // unit * unit, width // unit * unit


def warn_if_rounded(height: int, width: int, num_low: int, vae_scale_factor: int, facts: ScheduleFacts) -> None:
    target_height, target_width = rounded_target(height, width, num_low, vae_scale_factor, facts)
    if (target_height, target_width) != (height, width):
        unit = vae_scale_factor * facts.latent_multiple * 2**num_low
        logger.warning(
            f"{width}x{height} does not halve cleanly into {num_low + 1} stages; generating "
            f"{target_width}x{target_height} instead (both sides must be multiples of {unit} px). "
            f"Pass a multiple of {unit} to avoid this."
        )


def _check_smallest_stage(
    height: int,
    width: int,
    target_height: int,
    target_width: int,
    num_low: int,
    min_resolution: int,
    vae_scale_factor: int,
    facts: ScheduleFacts,
) -> None:
    """Refuse a plan whose smallest stage is under the family's minimum, or that rounds the image away altogether
    (a tiny `min_resolution` asks for so many halvings): the denoiser's, VAE's and upsampler's convolutions fail on
    such stages, or the plan divides by a zero size."""
    smallest = min(target_height, target_width) // vae_scale_factor // 2**num_low
    if smallest >= facts.min_stage_latent_side:
        return
    minimum_px = facts.min_stage_latent_side * vae_scale_factor
    if min(height, width) < 2 * minimum_px:
        fix = (
            f"This image is too small for a low-resolution stage: generate at least {2 * minimum_px} px a side, "
            "or pass `start_sigma=1.0` for plain generation."
        )
    else:
        fix = f"Use a `min_resolution` of at least {minimum_px} (the default is 512)."
    raise ValueError(
        f"`min_resolution`={min_resolution} plans {num_low + 1} stages for {width}x{height} whose smallest is "
        f"{smallest * vae_scale_factor} px ({smallest} latent cells) on its short side; every stage needs at least "
        f"{facts.min_stage_latent_side} latent cells ({minimum_px} px). {fix}"
    )


def fresh_scheduler(template: Any, config: dict | None = None) -> Any:
    """A new scheduler of the template's class and config (with `config`'s overrides), with no step state."""
    return type(template).from_config(template.config, **(config or {}))


def stock_stage_schedule(
    template: Any, facts: ScheduleFacts, num_steps: int, latent_height: int, latent_width: int, *, where: str, fix: str
) -> tuple[dict, Any, list[float]]:
    """The stock `num_steps`-step schedule of a stage of this latent size: the `set_timesteps` arguments, a fresh
    scheduler set with them, and its timesteps. A `ValueError` (naming `where` the schedule goes, and how to `fix`
    it) where the schedule is not finite: e.g. a `shift_terminal` (Qwen-Image's scheduler) divides by zero for 1
    step, so the stock pipeline gets NaN images for that step count, and a plan must not hand it to a stage."""
    kwargs = facts.timestep_kwargs(template, num_steps, latent_height, latent_width)
    scheduler = fresh_scheduler(template)
    scheduler.set_timesteps(**kwargs)
    timesteps = [float(t) for t in scheduler.timesteps]
    if not all(math.isfinite(t) for t in timesteps):
        raise ValueError(
            f"{type(template).__name__} with this config makes no finite {num_steps}-step schedule (NaN timesteps), "
            f"which {where} would get. {fix}"
        )
    return kwargs, scheduler, timesteps


def stock_timesteps(template: Any, facts: ScheduleFacts, num_steps: int, latent_height: int, latent_width: int):
    """The timesteps of the stock `num_steps`-step schedule of a latent of this size (no truncation)."""
    scheduler = fresh_scheduler(template)
    scheduler.set_timesteps(**facts.timestep_kwargs(template, num_steps, latent_height, latent_width))
    return [float(t) for t in scheduler.timesteps]


def _img2img_begin(num_steps: int, strength: float, order: int, flow: bool) -> int:
    """Where diffusers' img2img pipelines start a `num_steps`-step schedule for `strength` (their `get_timesteps`,
    which rounds the kept steps down for diffusion models and the skipped ones down for flow models)."""
    if flow:
        return int(max(num_steps - min(num_steps * strength, num_steps), 0)) * order
    return (num_steps - min(int(num_steps * strength), num_steps)) * order


def _noise_to_signal(scheduler: Any, facts: ScheduleFacts, index: int) -> float:
    """The ratio of noise to image in a latent noised to the `index`-th step of the scheduler's schedule: sigma /
    (1 - sigma) for flow models, sqrt((1 - alpha_bar) / alpha_bar) for diffusion models (the sigma of the schedulers
    that noise as x0 + sigma noise); infinite for pure noise."""
    if facts.flow:
        sigma = float(scheduler.sigmas[index])
        return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)
    if not hasattr(scheduler, "alphas_cumprod"):  # EDM schedulers: x0 + sigma noise, sigma is the ratio
        return float(scheduler.sigmas[index])
    alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[index])])
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


@dataclass(frozen=True)
class StockStart:
    """Where a stock img2img call at the target size starts: its first timestep and that step's noise-to-signal
    ratio (`_noise_to_signal`; infinite, and timestep 1000, for text-to-image)."""

    timestep: float
    noise_to_signal: float


def _stock_img2img_start(
    template: Any, facts: ScheduleFacts, num_steps: int, strength: float, latent_height: int, latent_width: int
) -> StockStart:
    if strength == 1.0:
        return StockStart(timestep=1000.0, noise_to_signal=math.inf)
    scheduler = fresh_scheduler(template)
    scheduler.set_timesteps(**facts.timestep_kwargs(template, num_steps, latent_height, latent_width))
    begin = _img2img_begin(num_steps, strength, scheduler.order, facts.flow)
    if begin >= len(scheduler.timesteps):
        raise ValueError(
            f"`strength`={strength} leaves no step of the {num_steps}-step schedule at the target size (the stock "
            "pipeline refuses it too); raise `strength` or `num_inference_steps`."
        )
    return StockStart(float(scheduler.timesteps[begin]), _noise_to_signal(scheduler, facts, begin))


def _schedule_stage(
    index: int,
    latent_height: int,
    latent_width: int,
    vae_scale_factor: int,
    num_steps: int,
    start_sigma: float,
    template: Any,
    facts: ScheduleFacts,
    *,
    strength: float = 1.0,
    stock_start: StockStart = StockStart(timestep=1000.0, noise_to_signal=math.inf),
    scale: int = 1,
    first: Stage | None = None,
) -> Stage:
    kwargs, scheduler, timesteps = stock_stage_schedule(
        template,
        facts,
        num_steps,
        latent_height,
        latent_width,
        where=f"stage {index + 1} ({latent_width * vae_scale_factor}x{latent_height * vae_scale_factor})",
        fix="Use more `num_inference_steps` (every stage needs at least 2 steps with this scheduler), or "
        "`shorten_intermediate_steps=False`.",
    )
    order = scheduler.order

    # Image-to-image: no stage holds more noise than the stock call's start, compared at the stage's size. A latent
    # `scale` times smaller per side averages scale x scale cells of the target's into one, which divides the
    # noise's share by `scale` and keeps the image's: the same noise level leaves a small stage far less of the
    # image (SD3's resolution-dependent shift is the same rule). Infinite for text-to-image: no bound.
    bound = stock_start.noise_to_signal / scale * (1 + 1e-6)

    def within_bound(begin: int) -> int:
        # The first step from `begin` on within the bound; a schedule too coarse to have one runs its last step.
        moved = begin
        while bound < math.inf and moved < len(timesteps) and _noise_to_signal(scheduler, facts, moved) > bound:
            moved += order
        return begin if moved == begin else min(moved, (len(timesteps) - 1) // order * order)

    if first is None:
        # Text-to-image: the whole schedule. Image-to-image: from its first step within the bound.
        begin = within_bound(0)
    elif facts.flow:
        # Restart from the smallest (shifted) timestep that is still >= start_sigma times the noise level the
        # stock call starts from (pure noise, 1000, for text-to-image), within the bound.
        above = [i for i, t in enumerate(timesteps) if t >= start_sigma * stock_start.timestep]
        begin = within_bound(above[-1] if above else 0)
    else:
        # The img2img rule of diffusers' pipelines, for the fraction start_sigma of the strength, within the bound.
        begin = within_bound(_img2img_begin(num_steps, start_sigma * strength, order, flow=False))
    if begin >= len(timesteps):
        raise ValueError(
            f"`start_sigma`={start_sigma} leaves stage {index + 1} ({latent_width * vae_scale_factor}x"
            f"{latent_height * vae_scale_factor}) no step of its {num_steps}"
            + (f" (with strength={strength})" if strength < 1.0 else "")
            + "; raise `start_sigma` or `num_inference_steps`."
        )
    # Flow models re-noise to this sigma; diffusion schedulers' sigmas are another scale (add_noise handles them).
    first_sigma = float(scheduler.sigmas[begin]) if facts.flow else None
    if first is not None and first_sigma is not None and first_sigma >= 1.0:
        logger.warning(
            f"Stage {index + 1} restarts from pure noise: none of its {num_steps} timesteps lies between 1000 and "
            f"start_sigma * 1000 = {start_sigma * 1000:g} but the first, so the earlier stages are wasted. Use more "
            "`num_inference_steps`, `shorten_intermediate_steps=False`, or fewer stages (a larger `min_resolution`)."
        )
    return Stage(
        index=index,
        latent_height=latent_height,
        latent_width=latent_width,
        vae_scale_factor=vae_scale_factor,
        num_steps=num_steps,
        begin_index=begin,
        timesteps=tuple(timesteps[begin:]),
        first_sigma=first_sigma,
        scheduler_kwargs=kwargs,
    )
