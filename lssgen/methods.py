"""Multi-resolution methods: which sizes run on which schedules (a plan), and how the latent changes size between
stages (a transition).

The controller and the stand-in scheduler run every method the same way: they follow the method's `StagePlan` and
call its transition at each stage end. A method is chosen per call or as a `lssgen.patch` default with `method=`, as
a name (`"refine"`), a name with parameters (`"refine:sigma=0.1,steps=2"`, the command line's spelling), or an
instance (`Refine(sigma=0.1)`, from `lssgen.methods`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .plan import (
    OPTION_NAMES,
    Options,
    ScheduleFacts,
    Stage,
    StagePlan,
    check_number,
    fresh_scheduler,
    plan_stages,
    rounded_target,
    stock_stage_schedule,
    warn_if_rounded,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRequest:
    """What a method plans from: the call's size and step count, the family's schedule facts, and the call's
    options with the family's defaults filled in (`shorten_intermediate_steps`, `base_height`, `base_width`)."""

    height: int
    width: int
    num_inference_steps: int
    scheduler: Any  # the pipeline's stock scheduler: only its class and config are used
    facts: ScheduleFacts
    vae_scale_factor: int
    options: Options
    strength: float = 1.0  # an image-to-image call's; 1.0 for text-to-image
    control: bool = False  # a ControlNet pipeline's call
    # (a, beta) of the power law of the family's latent spectrum (`Adapter.latent_spectrum`); None: none measured.
    latent_spectrum: tuple[float, float] | None = None


class ScaleUpAndRenoise:
    """The transition of LSSGen and MrFlow: scale the finished stage's latent up x2 in the call's scaling space, then
    mix in fresh Gaussian noise to the noise level the next stage starts from."""

    def next_stage_latents(self, run: Any, latents: Any, stage: Stage, following: Stage) -> Any:
        """Packed latents at the end of `stage` → unpacked latents `following` starts from."""
        return run.renoise(run.scale_up(latents, stage), following)

    def describe(self, scaling: str) -> str:
        """How this transition scales, for a plan's description (`scaling`: how the call's scaling space does)."""
        return scaling


SCALE_UP_AND_RENOISE = ScaleUpAndRenoise()


class Method:
    r"""
    A multi-resolution method: a frozen dataclass whose fields are its parameters (each with a `help` in its field
    metadata), a plan and a transition.

    Class attributes:
        name (`str`): what `method=` and `--method` call it.
        summary (`str`): one line for `lssgen methods`.
        sources (`tuple[str, ...]`): where the method is published.
        options (`frozenset[str]`): the [`~lssgen.Options`] the method reads besides `method`; any other given with it
            is refused, naming the option. `start_sigma=1.0` turns every method off (the stock pipeline runs).
        transition: the object whose `next_stage_latents(run, latents, stage, following)` the controller calls at
            every stage end.
        flow_only (`bool`): the method needs a flow-matching family; `check_adapter` refuses the others.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    sources: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[frozenset[str]] = frozenset()
    transition: ClassVar[Any] = SCALE_UP_AND_RENOISE
    flow_only: ClassVar[bool] = False  # the method walks a sigma path from 1 to 0 (refused for diffusion families)

    def check_adapter(self, adapter: Any) -> None:
        """Raise a `ValueError` naming what the family lacks for this method: a flow-matching path for a
        `flow_only` method; every family otherwise."""
        if self.flow_only:
            require_flow(self.name, adapter)

    def plan(self, request: PlanRequest) -> StagePlan:
        raise NotImplementedError

    def spelling(self) -> str:
        """The `--method` spelling of this method with its parameters, e.g. `refine:sigma=0.12,steps=1`."""
        # A parameter left None takes a default that depends on the pipeline (spectral's `a`, `beta`).
        values = ",".join(
            f"{f.name}={_spell(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        )
        return f"{self.name}:{values}" if values else self.name

    def check_options(self, given: set[str], options: Options, where: str) -> None:
        """Refuse an option the user gave (`given`, by name) that this method does not read."""
        for name in sorted(set(given) - self.options - {"method"}):
            if name == "start_sigma" and options.start_sigma == 1.0:
                continue  # the off switch of every method
            reads = ", ".join(f"`{option}`" for option in sorted(self.options)) or "none"
            parameters = ", ".join(f"`{f.name}`" for f in dataclasses.fields(self)) or "none"
            raise ValueError(
                f"`{name}` (given to {where}) does not apply to method {self.name!r}; of lssgen's options it reads "
                f"{reads}, and its own parameters are {parameters}. Drop `{name}`, or choose a method that uses it "
                "(`lssgen methods` lists them)"
                + ("; `start_sigma=1.0` still turns any method off." if name == "start_sigma" else ".")
            )


@dataclass(frozen=True)
class LSSGen(Method):
    """LSSGen (DESIGN.md §1): stages from `min_resolution` up, each doubling the size, later ones restarting from
    `start_sigma` on their own stock schedule."""

    name: ClassVar[str] = "lssgen"
    summary: ClassVar[str] = (
        "smallest stage first, x2 per stage, each later stage restarts from start_sigma on its own stock schedule"
    )
    sources: ClassVar[tuple[str, ...]] = ("LSSGen, arXiv 2507.16154",)
    options: ClassVar[frozenset[str]] = frozenset(OPTION_NAMES) - {"method"}

    def plan(self, request: PlanRequest) -> StagePlan:
        options = request.options
        return plan_stages(
            request.height,
            request.width,
            request.num_inference_steps,
            scheduler=request.scheduler,
            facts=request.facts,
            vae_scale_factor=request.vae_scale_factor,
            start_sigma=options.start_sigma,
            min_resolution=options.min_resolution,
            shorten_intermediate_steps=options.shorten_intermediate_steps,
            base_height=options.base_height,
            base_width=options.base_width,
            strength=request.strength,
        )


# Config keys of diffusers' flow-matching schedulers that reshape a schedule given as sigmas, with the values that
# leave it as given and end it at 0 (a key a scheduler does not have is left out).
UNSHIFTED_SCHEDULE = {
    "use_dynamic_shifting": False,
    "shift": 1.0,  # FlowMatchEulerDiscreteScheduler's static shift
    "flow_shift": 1.0,  # UniPC's and DPM-Solver's
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "final_sigmas_type": "zero",
}


def unshifted_schedule(
    template: Any, sigmas: np.ndarray, method: str = "refine", timesteps: list[float] | None = None
) -> tuple[dict, dict, Any]:
    """The scheduler config overrides and `set_timesteps` arguments that make a scheduler of `template`'s class step
    exactly through `sigmas`, then to 0, passing the denoiser `timesteps` (by default sigma x num_train_timesteps);
    and that scheduler, set up. A `ValueError` names what the class lacks (and the `method` that needs it)."""
    config = {key: value for key, value in UNSHIFTED_SCHEDULE.items() if key in template.config}
    kind = type(template).__name__
    if "sigmas" not in inspect.signature(template.set_timesteps).parameters:
        raise ValueError(f"{kind}.set_timesteps takes no `sigmas`: method {method!r} needs a scheduler that does.")
    scheduler = fresh_scheduler(template, config)
    kwargs = {"sigmas": sigmas} if timesteps is None else {"sigmas": sigmas, "timesteps": timesteps}
    try:
        scheduler.set_timesteps(**kwargs)
    except ValueError as error:  # e.g. UniPC without `use_flow_sigmas`
        raise ValueError(f"{kind} cannot step through custom sigmas for method {method!r}: {error}") from None
    got = [float(s) for s in scheduler.sigmas]
    want = [*sigmas, 0.0]
    # UniPC keeps sigma just under 1 (0.999999): a difference below 1e-5 is not a reshaped schedule.
    if len(got) != len(want) or any(abs(a - b) > 1e-5 for a, b in zip(got, want)):
        raise ValueError(
            f"{kind} with this config turns the sigmas {want} into {[round(s, 6) for s in got]}; method {method!r} "
            "needs a scheduler that steps through the sigmas it is given (no shift, no terminal stretch)."
        )
    return config, kwargs, scheduler


def require_flow(method: str, adapter: Any) -> None:
    """Refuse a diffusion family for a method that walks a flow-matching path (sigma from 1 to 0)."""
    if not adapter.flow:
        raise ValueError(
            f"method {method!r} needs a flow-matching pipeline (a sigma schedule from 1 to 0, re-noised as "
            f"(1 - sigma) x + sigma noise); the {adapter.name} adapter's pipelines are diffusion models. Use "
            "method='lssgen' for them."
        )


def check_text_to_image_call(method: str, request: PlanRequest) -> None:
    """Refuse what a method does not take yet (image-to-image, ControlNet), and a size or step count that is not a
    positive integer."""
    if request.strength != 1.0:
        raise ValueError(
            f"method {method!r} runs text-to-image calls only, got `strength`={request.strength}; pass "
            "strength=1.0, or use method='lssgen' for image-to-image."
        )
    if request.control:
        # Not yet checked against the contract: the control window and the controlnet's per-stage condition
        # across the method's plan.
        raise ValueError(
            f"method {method!r} does not take ControlNet pipelines yet; use method='lssgen' for them (its plans "
            "give each controlnet its condition per stage)."
        )
    for name in ("height", "width", "num_inference_steps"):
        value = getattr(request, name)
        check_number(name, value, integer=True)
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")


@dataclass(frozen=True)
class Refine(Method):
    r"""
    MrFlow's refinement (DESIGN.md §1b): a full stock generation at half the size, on the stock schedule of that
    size and the call's `num_inference_steps`; scaled up x2 in the call's scaling space, re-noised with fresh noise
    to `sigma`, and finished at full size in `steps` steps on the linear, unshifted schedule from `sigma` to 0.

    Args:
        sigma (`float`, defaults to `0.12`): the noise level the full-size stage starts from, in (0, 1).
        steps (`int`, defaults to `1`): steps at full size.

    Flow-matching families only: a diffusion model's schedule has no linear sigma path to 0 to start part-way down.
    Text-to-image calls without ControlNet only, for now.

    Example:

    ```py
    >>> lssgen.patch(pipe, method="refine")  # or method=Refine(sigma=0.1, steps=2), from lssgen.methods
    >>> image = pipe("a lighthouse at dusk", height=1024, width=1024, num_inference_steps=12).images[0]
    ```
    """

    sigma: float = field(default=0.12, metadata={"help": "noise level the full-size stage starts from, in (0, 1)"})
    steps: int = field(default=1, metadata={"help": "steps at full size, on the linear unshifted schedule sigma -> 0"})

    name: ClassVar[str] = "refine"
    flow_only: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "a full stock generation at half size, scaled up x2, re-noised to sigma, finished at full size in a few steps"
    )
    sources: ClassVar[tuple[str, ...]] = ("MrFlow, arXiv 2607.01642",)
    options: ClassVar[frozenset[str]] = frozenset({"scaling_space", "noise"})

    def __post_init__(self):
        check_number("sigma", self.sigma)
        if not 0.0 < self.sigma < 1.0:
            raise ValueError(
                f"method 'refine': `sigma` must be in (0, 1), got {self.sigma} (0.12 is MrFlow's; the full-size "
                "stage starts from that noise level)."
            )
        check_number("steps", self.steps, integer=True)
        if self.steps < 1:
            raise ValueError(f"method 'refine': `steps` must be a positive integer (1 is MrFlow's), got {self.steps}.")

    def plan(self, request: PlanRequest) -> StagePlan:
        facts, factor = request.facts, request.vae_scale_factor
        self.check_adapter(facts)
        check_text_to_image_call(self.name, request)
        height, width = rounded_target(request.height, request.width, 1, factor, facts)
        low_height, low_width = height // factor // 2, width // factor // 2
        if min(low_height, low_width) < facts.min_stage_latent_side:
            minimum = 2 * facts.min_stage_latent_side * factor
            raise ValueError(
                f"method 'refine' generates at half the size first: {request.width}x{request.height} is too small "
                f"for that (at least {minimum} px a side)."
            )
        warn_if_rounded(request.height, request.width, 1, factor, facts)
        first_kwargs, first, timesteps = stock_stage_schedule(
            request.scheduler,
            facts,
            request.num_inference_steps,
            low_height,
            low_width,
            where=f"the half-size generation ({low_width * factor}x{low_height * factor})",
            fix="Use more `num_inference_steps`.",
        )
        sigmas = np.linspace(self.sigma, 0.0, self.steps + 1)[:-1]  # an array, as the pipelines pass sigmas
        conditioned = facts.timesteps_for_sigmas(request.scheduler, sigmas, height // factor, width // factor)
        config, final_kwargs, final = unshifted_schedule(request.scheduler, sigmas, self.name, conditioned)
        stages = (
            Stage(
                index=0,
                latent_height=low_height,
                latent_width=low_width,
                vae_scale_factor=factor,
                num_steps=request.num_inference_steps,
                begin_index=0,
                timesteps=tuple(timesteps),
                first_sigma=float(first.sigmas[0]),
                scheduler_kwargs=first_kwargs,
            ),
            Stage(
                index=1,
                latent_height=height // factor,
                latent_width=width // factor,
                vae_scale_factor=factor,
                num_steps=self.steps,
                begin_index=0,
                timesteps=tuple(float(t) for t in final.timesteps),
                first_sigma=float(final.sigmas[0]),
                scheduler_kwargs=final_kwargs,
                scheduler_config=config,
            ),
        )
        return StagePlan(stages=stages, height=height, width=width, method=self.spelling())


class SpectralUpsampleAndRewind:
    """The transition of SPEED (method 'spectral'): the finished stage's latent, at the noise level sigma it reached,
    is upsampled x2 by zero-padding its DCT, the new high band filled with fresh noise of that level; its signal
    halves, so the latent is scaled by 2 / (1 + sigma), which puts it exactly on the flow path at
    t_eff = 2 sigma / (1 + sigma), where the next stage starts."""

    def describe(self, scaling: str) -> str:
        """How this transition scales, for a plan's description (`scaling`: how the call's scaling space would)."""
        return "DCT zero-padded x2, the new high band filled with noise of the level reached, rewound to t_eff"

    def next_stage_latents(self, run: Any, latents: Any, stage: Stage, following: Stage) -> Any:
        from .spectrum import dct_2d, dct_upsample  # torch: imported when a run needs it (this module answers without)

        unpacked = run.adapter.unpack(run.pipe, latents, stage.latent_height, stage.latent_width)
        sigma = run.stage_end_sigma(stage)
        shape = (*unpacked.shape[:-2], following.latent_height, following.latent_width)
        noise = run.stage_noise(following, unpacked.new_empty(shape))
        # The new band takes the noise's own DCT coefficients: fresh noise's are Gaussian as well, and a shared
        # field's are those of the field at this grid.
        upsampled = dct_upsample(unpacked.float(), sigma * dct_2d(noise.float()))
        return (upsampled * (2.0 / (1.0 + sigma))).to(unpacked.dtype)


def rewound_sigma(sigma: float) -> float:
    """t_eff: where a latent at `sigma`, DCT-upsampled x2 and scaled by 2 / (1 + sigma), lies on the flow path."""
    return 2.0 * sigma / (1.0 + sigma)


@dataclass(frozen=True)
class Spectral(Method):
    r"""
    Spectral progressive diffusion (SPEED, DESIGN.md §1b): every stage walks one schedule, the stock one of the full
    size. The smallest stage is `halvings` times half the size; a stage ends at the first step whose sigma is at most
    $1 / (1 + \sqrt{\delta / (P (1 + P - \delta))})$, $P = a \cdot w^{-\beta}$ the power of the VAE's latent spectrum
    at the stage grid's Nyquist index $w$ (half its short side): the noise level where the frequencies the grid
    cannot hold start to matter. Then the DCT of its latent is zero-padded to twice the size, the new high band
    filled with fresh noise of the level reached, and the latent rewound onto the flow path
    ([`SpectralUpsampleAndRewind`]): the next stage starts from t_eff = 2 sigma / (1 + sigma) and goes on with the
    schedule's following sigmas.

    Args:
        delta (`float`, defaults to `0.1`): how much of the next band may be resolved before the switch, in (0, 1);
            larger ends stages later, so more steps run small (SPEED: 0.01 -> 1.32x, 0.1 -> 1.83x, 0.5 -> 2.36x on
            FLUX.1-dev at 1024 px, 50 steps).
        halvings (`int`, defaults to `1`): how many times the smallest stage halves the size (stages: halvings + 1).
        a (`float`, *optional*), beta (`float`, *optional*): the power law of the latent spectrum; by default the
            family's measured one (`Adapter.latent_spectrum`: FLUX.1's VAE, Wan 2.1's). Families with none need both
            (`lssgen.spectrum.fit_latent_spectrum` fits them from clean latents).

    Flow-matching families only, text-to-image calls without ControlNet.
    """

    delta: float = field(default=0.1, metadata={"help": "share of the next band resolved before a switch, in (0, 1)"})
    halvings: int = field(default=1, metadata={"help": "halvings of the size in the smallest stage (stages - 1)"})
    a: float | None = field(default=None, metadata={"help": "latent spectrum power law P(w) = a w^-beta (family's)"})
    beta: float | None = field(default=None, metadata={"help": "its exponent (family's by default)"})

    name: ClassVar[str] = "spectral"
    flow_only: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "one full-size schedule; each stage ends by the frequency rule, DCT zero-pad x2 with high-band noise, rewind"
    )
    sources: ClassVar[tuple[str, ...]] = ("SPEED, arXiv 2605.18736 (SGLang Diffusion --progressive-mode dct_rewind)",)
    options: ClassVar[frozenset[str]] = frozenset({"noise"})
    transition: ClassVar[Any] = SpectralUpsampleAndRewind()

    def __post_init__(self):
        check_number("delta", self.delta)
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"method 'spectral': `delta` must be in (0, 1) (SPEED uses 0.01-0.5), got {self.delta}.")
        check_number("halvings", self.halvings, integer=True)
        if self.halvings < 1:
            raise ValueError(f"method 'spectral': `halvings` must be a positive integer, got {self.halvings}.")
        if (self.a is None) != (self.beta is None):
            raise ValueError(
                "method 'spectral': give both `a` and `beta` (the power law P(w) = a w^-beta), or neither."
            )
        for name in ("a", "beta"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
                if not getattr(self, name) > 0:
                    raise ValueError(f"method 'spectral': `{name}` must be positive, got {getattr(self, name)}.")

    def spectrum(self, request: PlanRequest) -> tuple[float, float]:
        if self.a is not None:
            return self.a, self.beta
        if request.latent_spectrum is None:
            raise ValueError(
                f"method 'spectral' ends its stages by the power law of the VAE's latent spectrum, and none is "
                f"measured for this {request.facts.name} pipeline's VAE (lssgen has FLUX.1's and Wan 2.1's). Pass it: "
                "'spectral:a=...,beta=...' (lssgen.spectrum.fit_latent_spectrum fits them from clean latents)."
            )
        return request.latent_spectrum

    def plan(self, request: PlanRequest) -> StagePlan:
        from .spectrum import spectral_stage_end_sigma

        facts, factor, halvings = request.facts, request.vae_scale_factor, self.halvings
        self.check_adapter(facts)
        check_text_to_image_call(self.name, request)
        a, beta = self.spectrum(request)
        height, width = rounded_target(request.height, request.width, halvings, factor, facts)
        full = (height // factor, width // factor)
        sizes = [(full[0] >> (halvings - s), full[1] >> (halvings - s)) for s in range(halvings + 1)]
        if min(sizes[0]) < max(facts.min_stage_latent_side, 1) or min(height, width) == 0:
            minimum = facts.min_stage_latent_side * factor * facts.latent_multiple * 2**halvings
            raise ValueError(
                f"method 'spectral' halves the size {halvings} time(s) first: {request.width}x{request.height} is "
                f"too small for that (at least {minimum} px a side), or use fewer `halvings`."
            )
        warn_if_rounded(request.height, request.width, halvings, factor, facts)
        steps = request.num_inference_steps
        kwargs, stock, timesteps = stock_stage_schedule(
            request.scheduler, facts, steps, *full,
            where=f"the full-size schedule ({width}x{height})", fix="Use more `num_inference_steps`.",
        )  # fmt: skip
        sigmas = [float(s) for s in stock.sigmas]
        ends, start = [], 0
        for size in sizes[:-1]:
            limit = spectral_stage_end_sigma(a, beta, self.delta, min(size) // 2)
            end = next((i for i in range(start + 1, steps) if sigmas[i] <= limit), None)
            if end is None:
                raise ValueError(
                    f"method 'spectral': at {size[1] * factor}x{size[0] * factor} the stage would run until sigma <= "
                    f"{limit:.3f}, which the {steps}-step schedule reaches only at its end: no step would be left at "
                    "full size. Use more `num_inference_steps` or a smaller `delta`."
                )
            ends.append(end)
            start = end
        stages = [
            Stage(
                index=0, latent_height=sizes[0][0], latent_width=sizes[0][1], vae_scale_factor=factor,
                num_steps=steps, begin_index=0, timesteps=tuple(timesteps[: ends[0]]), first_sigma=sigmas[0],
                scheduler_kwargs=kwargs,
            )
        ]  # fmt: skip
        for index in range(1, halvings + 1):
            start = ends[index - 1]
            rest = np.array([rewound_sigma(sigmas[start]), *sigmas[start + 1 : steps]])
            conditioned = facts.timesteps_for_sigmas(request.scheduler, rest, *full)
            config, stage_kwargs, scheduler = unshifted_schedule(request.scheduler, rest, self.name, conditioned)
            stop = ends[index] - start if index < halvings else None
            stages.append(
                Stage(
                    index=index, latent_height=sizes[index][0], latent_width=sizes[index][1],
                    vae_scale_factor=factor, num_steps=len(rest), begin_index=0,
                    timesteps=tuple(float(t) for t in scheduler.timesteps[:stop]), first_sigma=float(rest[0]),
                    scheduler_kwargs=stage_kwargs, scheduler_config=config,
                )
            )  # fmt: skip
        return StagePlan(stages=tuple(stages), height=height, width=width, method=self.spelling())


class ResizeAndRenoise:
    """The transition of Bottleneck Sampling: the finished stage's latent resized to the next stage's size (down:
    antialiased bicubic in latent space; up: x2 in the call's scaling space), then fresh noise mixed in to the noise
    level the next stage starts from."""

    def describe(self, scaling: str) -> str:
        return f"down: antialiased bicubic in latent space; up: {scaling}"

    def next_stage_latents(self, run: Any, latents: Any, stage: Stage, following: Stage) -> Any:
        from .scaling import scale_down  # torch: imported when a run needs it (this module answers without)

        if following.latent_height >= stage.latent_height:
            return run.renoise(run.scale_up(latents, stage), following)
        unpacked = run.adapter.unpack(run.pipe, latents, stage.latent_height, stage.latent_width)
        return run.renoise(scale_down(unpacked, following.latent_height, following.latent_width), following)


def static_shift(shift: float, t: np.ndarray) -> np.ndarray:
    """A flow schedule's static time shift: sigma = shift t / (1 + (shift - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


# Bottleneck Sampling's published FLUX.1-dev settings: steps per stage out of the baseline's 50, each stage's
# strength (where on its own schedule it starts) and static shift.
BOTTLENECK_STEPS_OF_50 = (6, 20, 8)


@dataclass(frozen=True)
class Bottleneck(Method):
    r"""
    Bottleneck Sampling (DESIGN.md §1b): high -> low -> high. Three stages at the full size, half of it, and the full
    size again; stage i runs `steps[i]` steps of its own schedule, the linear times from `strengths[i]` to 0 under the
    static shift `shifts[i]` (sigma = shift t / (1 + (shift - 1) t)). Between stages the finished latent is resized
    (down: antialiased bicubic in latent space; up: x2 in the call's scaling space) and re-noised with fresh noise to
    the next stage's first sigma ([`ResizeAndRenoise`]).

    Args:
        steps (`tuple[int, int, int]`, *optional*): steps per stage; by default the published 6/20/8 out of 50 scaled
            to the call's `num_inference_steps` (rounded, at least 1 each): 6/20/8 at 50 steps.
        strengths (`tuple[float, float, float]`, defaults to `(1.0, 0.8, 0.6)`): where each stage starts on its own
            schedule (the first must be 1: it starts from noise).
        shifts (`tuple[float, float, float]`, defaults to `(9.0, 6.0, 9.0)`): each stage's static shift.

    The defaults are the published FLUX.1-dev settings (1.95x-2.34x there). Flow-matching families, text-to-image
    without ControlNet.
    """

    steps: tuple[int, ...] | None = field(
        default=None, metadata={"help": "steps per stage, e.g. 6/20/8 (default: 6/20/8 of 50, scaled to the call's)"}
    )
    strengths: tuple[float, ...] = field(
        default=(1.0, 0.8, 0.6), metadata={"help": "where each stage starts on its own schedule, in (0, 1]"}
    )
    shifts: tuple[float, ...] = field(default=(9.0, 6.0, 9.0), metadata={"help": "static time shift per stage"})

    name: ClassVar[str] = "bottleneck"
    flow_only: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "full size, then half, then full again; each stage on its own shifted schedule from its strength, re-noised"
    )
    sources: ClassVar[tuple[str, ...]] = ("Bottleneck Sampling, arXiv 2503.18940",)
    options: ClassVar[frozenset[str]] = frozenset({"scaling_space", "noise"})
    transition: ClassVar[Any] = ResizeAndRenoise()

    def __post_init__(self):
        for name, integer in (("steps", True), ("strengths", False), ("shifts", False)):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, tuple) or len(values) != 3:
                raise ValueError(
                    f"method 'bottleneck': `{name}` must be 3 values, one per stage (full, half, full size), got "
                    f"{values!r}."
                )
            for value in values:
                check_number(name, value, integer=integer)
        if self.steps is not None and min(self.steps) < 1:
            raise ValueError(f"method 'bottleneck': `steps` must be positive integers, got {_spell(self.steps)}.")
        if not all(0.0 < s <= 1.0 for s in self.strengths) or self.strengths[0] != 1.0:
            raise ValueError(
                "method 'bottleneck': `strengths` must be in (0, 1], the first 1 (the first stage starts from noise), "
                f"got {_spell(self.strengths)}."
            )
        if min(self.shifts) <= 0:
            raise ValueError(f"method 'bottleneck': `shifts` must be positive, got {_spell(self.shifts)}.")

    def stage_steps(self, num_inference_steps: int) -> tuple[int, ...]:
        if self.steps is not None:
            return self.steps
        return tuple(max(1, round(num_inference_steps * n / 50)) for n in BOTTLENECK_STEPS_OF_50)

    def plan(self, request: PlanRequest) -> StagePlan:
        facts, factor = request.facts, request.vae_scale_factor
        self.check_adapter(facts)
        check_text_to_image_call(self.name, request)
        height, width = rounded_target(request.height, request.width, 1, factor, facts)
        full = (height // factor, width // factor)
        half = (full[0] // 2, full[1] // 2)
        if min(half) < facts.min_stage_latent_side or min(height, width) == 0:
            minimum = 2 * facts.min_stage_latent_side * factor * facts.latent_multiple
            raise ValueError(
                f"method 'bottleneck' runs a stage at half the size: {request.width}x{request.height} is too small "
                f"for that (at least {minimum} px a side)."
            )
        warn_if_rounded(request.height, request.width, 1, factor, facts)
        stages = []
        for index, (size, steps, strength, shift) in enumerate(
            zip((full, half, full), self.stage_steps(request.num_inference_steps), self.strengths, self.shifts)
        ):
            sigmas = static_shift(shift, np.linspace(strength, 0.0, steps + 1)[:-1])
            conditioned = facts.timesteps_for_sigmas(request.scheduler, sigmas, *size)
            config, kwargs, scheduler = unshifted_schedule(request.scheduler, sigmas, self.name, conditioned)
            stages.append(
                Stage(
                    index=index, latent_height=size[0], latent_width=size[1], vae_scale_factor=factor,
                    num_steps=steps, begin_index=0, timesteps=tuple(float(t) for t in scheduler.timesteps),
                    first_sigma=float(sigmas[0]), scheduler_kwargs=kwargs, scheduler_config=config,
                )
            )  # fmt: skip
        return StagePlan(stages=tuple(stages), height=height, width=width, method=self.spelling())


METHODS: dict[str, type[Method]] = {method.name: method for method in (LSSGen, Refine, Spectral, Bottleneck)}
DEFAULT_METHOD = LSSGen.name


def _spell(value: Any) -> str:
    """A parameter's value as `--method` spells it: a tuple (one value per stage) with `/` between its items."""
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _parse_value(method: type[Method], parameter: dataclasses.Field, text: str) -> Any:
    annotation = str(parameter.type).removesuffix(" | None")
    per_stage = annotation.startswith("tuple[")  # `tuple[int, ...]`: one value per stage, spelled 6/20/8
    kind = {"float": float, "int": int}.get(annotation.removeprefix("tuple[").split(",")[0].rstrip("]"), str)
    try:
        return tuple(kind(item) for item in text.split("/")) if per_stage else kind(text)
    except ValueError:
        what = "an int" if kind is int else "a number"
        raise ValueError(
            f"method {method.name!r}: `{parameter.name}` must be "
            + (f"{what} per stage, separated by `/` (e.g. 6/20/8)" if per_stage else what)
            + f", got {text!r}."
        ) from None


def resolve_method(method: str | Method | None) -> Method:
    r"""
    The method `method=` names: an instance as it is; a name, or a name with parameters as the command line spells it
    (`"refine:sigma=0.12,steps=1"`); `None` for the default, `"lssgen"`.

    Example:

    ```py
    >>> resolve_method("refine:sigma=0.1")
    Refine(sigma=0.1, steps=1)
    ```
    """
    if method is None:
        method = DEFAULT_METHOD
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise TypeError(f"`method` must be a method name (e.g. 'refine') or a lssgen Method, got {method!r}.")
    name, _, text = method.partition(":")
    known = ", ".join(map(repr, METHODS))
    if name.strip() not in METHODS:
        raise ValueError(f"Unknown `method` {name.strip()!r}; known methods are {known} (`lssgen methods` lists them).")
    chosen = METHODS[name.strip()]
    parameters = {f.name: f for f in dataclasses.fields(chosen)}
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = (part.strip() for part in item.partition("="))
        if key not in parameters or not equals:
            listed = ", ".join(parameters) or "none"
            raise ValueError(
                f"method {chosen.name!r}: unknown parameter {item!r}; its parameters are {listed} "
                f"(spelled {chosen.name}:name=value,...)."
            )
        if key in values:
            raise ValueError(f"method {chosen.name!r}: `{key}` is given twice in {method!r}.")
        values[key] = _parse_value(chosen, parameters[key], value)
    return chosen(**values)


def method_table() -> list[dict[str, Any]]:
    """Every built-in method with its parameters (name, default, help), summary and sources: `lssgen methods`."""
    return [
        {
            "name": method.name,
            "summary": method.summary,
            "sources": method.sources,
            "options": sorted(method.options),
            "parameters": [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(method)],
        }
        for method in METHODS.values()
    ]
