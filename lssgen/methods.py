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


class ScaleUpAndRenoise:
    """The transition of LSSGen and MrFlow: scale the finished stage's latent up x2 in the call's scaling space, then
    mix in fresh Gaussian noise to the noise level the next stage starts from."""

    def next_stage_latents(self, run: Any, latents: Any, stage: Stage, following: Stage) -> Any:
        """Packed latents at the end of `stage` → unpacked latents `following` starts from."""
        return run.renoise(run.scale_up(latents, stage), following)


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
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    sources: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[frozenset[str]] = frozenset()
    transition: ClassVar[Any] = SCALE_UP_AND_RENOISE

    def check_adapter(self, adapter: Any) -> None:
        """Raise a `ValueError` naming what the family lacks for this method; every family by default."""

    def plan(self, request: PlanRequest) -> StagePlan:
        raise NotImplementedError

    def spelling(self) -> str:
        """The `--method` spelling of this method with its parameters, e.g. `refine:sigma=0.12,steps=1`."""
        values = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
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


def unshifted_schedule(template: Any, sigmas: np.ndarray) -> tuple[dict, dict, Any]:
    """The scheduler config overrides and `set_timesteps` arguments that make a scheduler of `template`'s class step
    exactly through `sigmas`, then to 0; and that scheduler, set up. A `ValueError` names what the class lacks."""
    config = {key: value for key, value in UNSHIFTED_SCHEDULE.items() if key in template.config}
    kind = type(template).__name__
    if "sigmas" not in inspect.signature(template.set_timesteps).parameters:
        raise ValueError(f"{kind}.set_timesteps takes no `sigmas`: method 'refine' needs a scheduler that does.")
    scheduler = fresh_scheduler(template, config)
    kwargs = {"sigmas": sigmas}
    try:
        scheduler.set_timesteps(**kwargs)
    except ValueError as error:  # e.g. UniPC without `use_flow_sigmas`
        raise ValueError(f"{kind} cannot step through custom sigmas for method 'refine': {error}") from None
    got = [float(s) for s in scheduler.sigmas]
    want = [*sigmas, 0.0]
    if len(got) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
        raise ValueError(
            f"{kind} with this config turns the sigmas {want} into {[round(s, 6) for s in got]}; method 'refine' "
            "needs a scheduler that steps through the sigmas it is given (no shift, no terminal stretch)."
        )
    return config, kwargs, scheduler


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
    summary: ClassVar[str] = (
        "a full stock generation at half size, scaled up x2, re-noised to sigma, finished at full size in a few steps"
    )
    sources: ClassVar[tuple[str, ...]] = ("MrFlow, arXiv 2607.01642",)
    options: ClassVar[frozenset[str]] = frozenset({"scaling_space"})

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

    def check_adapter(self, adapter: Any) -> None:
        if not adapter.flow:
            raise ValueError(
                f"method 'refine' needs a flow-matching pipeline (a sigma schedule from 1 to 0, re-noised as "
                f"(1 - sigma) x + sigma noise); the {adapter.name} adapter's pipelines are diffusion models. Use "
                "method='lssgen' for them."
            )

    def plan(self, request: PlanRequest) -> StagePlan:
        facts, factor = request.facts, request.vae_scale_factor
        self.check_adapter(facts)
        if request.strength != 1.0:
            raise ValueError(
                f"method 'refine' runs text-to-image calls only, got `strength`={request.strength}; pass "
                "strength=1.0, or use method='lssgen' for image-to-image."
            )
        if request.control:
            # Not yet checked against the contract: the control window and the controlnet's per-stage condition
            # across a refine plan.
            raise ValueError(
                "method 'refine' does not take ControlNet pipelines yet; use method='lssgen' for them (its plans "
                "give each controlnet its condition per stage)."
            )
        for name in ("height", "width", "num_inference_steps"):
            value = getattr(request, name)
            check_number(name, value, integer=True)
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
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
        config, final_kwargs, final = unshifted_schedule(request.scheduler, sigmas)
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


METHODS: dict[str, type[Method]] = {method.name: method for method in (LSSGen, Refine)}
DEFAULT_METHOD = LSSGen.name


def _parse_value(method: type[Method], parameter: dataclasses.Field, text: str) -> Any:
    kind = {"float": float, "int": int}.get(str(parameter.type), str)
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"method {method.name!r}: `{parameter.name}` must be {'an int' if kind is int else 'a number'}, got "
            f"{text!r}."
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
