"""`lssgen.patch` / `lssgen.unpatch`: multi-resolution generation on an unmodified stock pipeline instance."""

from __future__ import annotations

import inspect
import logging
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from . import joined_conditions
from .adapters import Adapter, find_adapter
from .caches import StageCacheSchedule, StageCacheSchedules
from .conditions import first_stage_image_latents, image_to_image_size, takes_image_and_strength
from .controller import Run, StageSwitchCallback, chain_callbacks
from .controlnets import (
    StageControls,
    check_tensor_control_size,
    control_count,
    control_scales,
    control_windows,
    install_control_hooks,
    remove_control_hooks,
    stand_in_control_preparation,
    takes_control,
)
from .inpainting import KeptRegion, check_mask, stand_in_preparation
from .loading import ModelDefaults, check_upsampler, model_defaults
from .methods import PlanRequest, resolve_method
from .plan import NOISE_MODES, OPTION_NAMES, Options, Stage, StagePlan, stock_timesteps, validate_options
from .scaling import resolve_scaling_space
from .schedule import StagedScheduler

logger = logging.getLogger(__name__)

_STATE = "_lssgen"


class _DefaultUpsampler:
    """The `upsampler` of `patch` when the caller passes none (`None` itself means latent interpolation)."""

    def __repr__(self) -> str:
        return "DEFAULT_UPSAMPLER"


# The model folder's upsampler (its lssgen.json), else the one lssgen ships for the family if it fits the VAE.
DEFAULT_UPSAMPLER = _DefaultUpsampler()
# Call arguments that fix the noise or the schedule themselves, which a multi-resolution plan replaces.
_CONFLICTING_ARGUMENTS = ("latents", "sigmas", "timesteps", "mu", "denoising_start", "denoising_end")
# Where a pipeline's `__call__` takes no `latents` (StableDiffusionImg2ImgPipeline), its `prepare_latents` is shadowed
# by an instance attribute for the call and returns the first stage's.
_PREPARE_LATENTS = "prepare_latents"
_MISSING = object()


@dataclass
class PatchState:
    """Everything `patch` changed on a pipe, kept on the pipe; `unpatch` undoes exactly this."""

    adapter: Adapter
    upsampler: Any
    defaults: Options
    original_class: type
    run: Run | None = field(default=None, repr=False)
    # Where the upsampler came from, or why there is none: the plan's description says it.
    upsampler_note: str = ""
    # The controlnet modules `patch` hooked (the pipeline's controlnet, then each controlnet of a multi-controlnet),
    # so that `unpatch` unhooks exactly those.
    controlnets: list = field(default_factory=list, repr=False)

    def low_resolution_stage(self) -> Stage | None:
        """The stage being denoised while it is smaller than the target, else None: at the target size the
        pipeline's own conditioning (a user's `original_size`, say) is already right."""
        return None if self.run is None else self.run.scheduler.low_resolution_stage

    def controls(self) -> tuple[Stage | None, StageControls] | None:
        """For the control hooks: the low-resolution stage in force (None at the target size) and the call's control
        conditions, while an lssgen ControlNet call runs; else None (the stock call's own condition and scale)."""
        if self.run is None or self.run.controls is None:
            return None
        return self.low_resolution_stage(), self.run.controls


def _check_option_names(names, where: str) -> None:
    unknown = sorted(set(names) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{where} got unknown lssgen option(s) {unknown}; known options are {list(OPTION_NAMES)}.")


def _check_options(options: Options, upsampler: Any, adapter: Adapter, given=(), where: str = "the call") -> str:
    """Raise a clear error for any invalid option, or one `given` (by name, at `where`) that the method does not
    read; the scaling space the options select."""
    validate_options(
        start_sigma=options.start_sigma,
        min_resolution=options.min_resolution,
        base_height=options.base_height,
        base_width=options.base_width,
        shorten_intermediate_steps=options.shorten_intermediate_steps,
    )
    if options.noise not in NOISE_MODES:
        raise ValueError(
            f"`noise` must be one of {', '.join(map(repr, NOISE_MODES))}, got {options.noise!r}: 'fresh' draws new "
            "noise at each stage switch, 'shared' reads one field drawn once per call."
        )
    method = resolve_method(options.method)
    method.check_options(set(given), options, where)
    method.check_adapter(adapter)
    return resolve_scaling_space(options.scaling_space, upsampler)


def _check_upsampler(upsampler: Any, adapter: Adapter, pipe: Any) -> None:
    if upsampler is None:
        return
    config = getattr(upsampler, "config", None)
    if not isinstance(upsampler, torch.nn.Module) or config is None:
        raise TypeError(
            f"`upsampler` must be an lssgen.LatentUpsampler (or a module with its config), got "
            f"{type(upsampler).__name__}. Load one with `lssgen.LatentUpsampler.from_pretrained(path)`."
        )
    channels = adapter.latent_channels(pipe)
    if config.in_channels != channels or config.out_channels != channels:
        raise ValueError(
            f"The upsampler maps {config.in_channels} -> {config.out_channels} latent channels, but this "
            f"{type(pipe).__name__} denoises {channels}-channel latents. Use an upsampler trained for this "
            "pipeline's VAE."
        )
    factor = getattr(upsampler, "scale_factor", 2)
    if factor != 2:
        raise ValueError(f"The upsampler scales by {factor}, but lssgen needs an x2 upsampler.")


def patch(
    pipe: Any, upsampler: Any = DEFAULT_UPSAMPLER, *, adapter: Adapter | str | None = None, **defaults: Any
) -> Any:
    r"""
    Make `pipe(...)` generate in several resolutions (LSSGen), in place. Calling it again re-patches.

    Only this instance changes (its class is swapped for a subclass of the same name); other instances of the
    pipeline class are untouched. With `start_sigma=1.0`, or after [`unpatch`], the pipe is the stock pipeline.

    A pipe loaded from a folder with an `lssgen.json` (see [`ModelDefaults`]) takes its lssgen defaults from there
    (base size, `min_resolution`, upsampler); the arguments given here override them.

    Args:
        pipe (`DiffusionPipeline`): a stock pipeline that an installed adapter supports.
        upsampler (`LatentUpsampler` or `None`, *optional*):
            learned x2 latent upsampler for the pipeline's VAE; `None` scales by latent interpolation. Left out, the
            model folder's upsampler is used, else the one lssgen ships for the family when it fits the pipeline's
            VAE latent (`weights/flux2-x2` for FLUX.2), else latent interpolation. `plan_for(pipe).describe()`
            says which.
        adapter (`Adapter` or `str`, *optional*): force an adapter instead of matching the pipeline.
        **defaults: default values of the call options (see [`Options`]), e.g. `start_sigma=0.667`, or
            `method="refine"` for another method (`lssgen.methods`).

    Returns:
        The same `pipe`.

    Example:

    ```py
    >>> import lssgen
    >>> lssgen.patch(pipe, lssgen.LatentUpsampler.from_pretrained("path/to/flux-x2"))
    >>> image = pipe("a lighthouse at dusk", height=1024, width=1024, start_sigma=0.75).images[0]
    >>> lssgen.unpatch(pipe)
    ```
    """
    _check_option_names(defaults, "lssgen.patch()")
    if is_patched(pipe):
        unpatch(pipe)
    chosen = find_adapter(pipe, adapter)
    folder = model_defaults(pipe)
    if upsampler is DEFAULT_UPSAMPLER:
        upsampler, note = _default_upsampler(pipe, chosen, folder)
    else:
        note = "upsampler=None given to lssgen.patch" if upsampler is None else "given to lssgen.patch"
    _check_upsampler(upsampler, chosen, pipe)
    # The family's own smallest stage first (Wan's 480P cannot halve above 240 px), then the model folder's
    # defaults, then the caller's.
    options = replace(Options(min_resolution=chosen.min_resolution), **{**folder.patch_options(), **defaults})
    _check_options(options, upsampler, chosen, given=defaults, where="lssgen.patch()")

    original_class = type(pipe)
    state = PatchState(
        adapter=chosen, upsampler=upsampler, defaults=options, original_class=original_class, upsampler_note=note
    )
    chosen.install_hooks(pipe, state.low_resolution_stage)
    if takes_control(pipe, chosen):
        state.controlnets = install_control_hooks(pipe, chosen, state.low_resolution_stage, state.controls)
    # A subclass per instance: Python looks `__call__` up on the class, and keeping the name keeps
    # `save_pretrained` writing the stock class name.
    patched_class = type(
        original_class.__name__,
        (original_class,),
        {
            "__call__": _patched_call,
            "progress_bar": _patched_progress_bar,
            "__module__": original_class.__module__,
            "__qualname__": original_class.__qualname__,
            "__doc__": original_class.__doc__,
        },
    )
    pipe.__dict__[_STATE] = state
    pipe.__class__ = patched_class
    return pipe


def _default_upsampler(pipe: Any, adapter: Adapter, folder: ModelDefaults) -> tuple[Any, str]:
    """The upsampler `patch` uses when none is passed, and where it comes from (or why there is none)."""
    from lssgen.weights import shipped, weights_path

    from .upsampler import LatentUpsampler

    if folder.names_upsampler:
        path = folder.upsampler_path()
        if path is None:
            return None, f"{folder.file} sets `upsampler` to null"
        # As the file spells it (a shipped name or a path relative to the folder), not an absolute path.
        file = Path(folder.file)
        note = f"{folder.patch['upsampler']}, named in {file.parent.name}/{file.name}"
    elif adapter.default_upsampler is None:
        return None, f"lssgen ships no upsampler for the {adapter.name} family"
    elif adapter.default_upsampler not in shipped():
        return None, f"the {adapter.name} family's upsampler {adapter.default_upsampler} is not installed"
    else:
        path = weights_path(adapter.default_upsampler)
        # Only the config is read to decide: the shipped weights fit one VAE latent (FLUX.2's 32 channels); a pipe
        # with another VAE falls back to latent interpolation instead of failing.
        config = LatentUpsampler.load_config(path)
        channels = adapter.latent_channels(pipe)
        vae_channels = getattr(getattr(getattr(pipe, "vae", None), "config", None), "latent_channels", channels)
        if not config["in_channels"] == config["out_channels"] == channels == vae_channels:
            return None, (
                f"the shipped {adapter.default_upsampler} works on {config['in_channels']}-channel latents, this "
                f"pipeline's VAE has {vae_channels}"
            )
        note = f"{adapter.default_upsampler}, shipped with lssgen for {adapter.name}"
    check_upsampler(str(path), option=f"{folder.file}: `patch.upsampler`" if folder.names_upsampler else "upsampler")
    return LatentUpsampler.from_pretrained(path, dtype=adapter.latent_dtype(pipe)), note


def unpatch(pipe: Any) -> Any:
    r"""
    Undo [`patch`]: the pipe's class, hooks and attributes are as before. Does nothing on an unpatched pipe.

    Example:

    ```py
    >>> lssgen.unpatch(pipe)
    ```
    """
    state = pipe.__dict__.get(_STATE)
    if state is None:
        return pipe
    state.adapter.remove_hooks(pipe)
    remove_control_hooks(pipe, state.controlnets, state.adapter)
    pipe.__class__ = state.original_class
    del pipe.__dict__[_STATE]
    return pipe


def is_patched(pipe: Any) -> bool:
    return _STATE in getattr(pipe, "__dict__", {})


def _patched_progress_bar(self, iterable=None, total=None):
    state: PatchState = self.__dict__[_STATE]
    bar = state.original_class.progress_bar(self, iterable=iterable, total=total)
    if state.run is not None:
        state.run.progress_bar = bar
        state.run.show_stage(state.run.current_stage)
    return bar


def _bound_arguments(function, pipe, args, kwargs) -> dict[str, Any]:
    """All call arguments by name, whether passed by position or keyword."""
    signature = inspect.signature(function)
    try:
        bound = signature.bind(pipe, *args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{type(pipe).__name__}.__call__: {error}") from None
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _defaults_of(function) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


@torch.no_grad()
def _patched_call(self, *args, **kwargs):
    state: PatchState = self.__dict__[_STATE]
    stock_call = state.original_class.__call__
    overrides = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
    options = replace(state.defaults, **overrides)
    # Validated on every call: an option mistyped next to `start_sigma=1.0` is still a mistake. Options given to
    # `patch` were checked against patch's method there; a call that chooses another method leaves them alone.
    scaling_space = _check_options(options, state.upsampler, state.adapter, given=overrides)
    if options.start_sigma == 1.0:
        return stock_call(self, *args, **kwargs)

    call = _bound_arguments(stock_call, self, args, kwargs)
    run = _prepare_run(self, state, options, scaling_space, call, _defaults_of(stock_call))
    if run is None:
        return stock_call(self, *args, **kwargs)

    stock_scheduler = self.__dict__["scheduler"]
    # Swap through __dict__: DiffusionPipeline.__setattr__ would rewrite the pipeline's config.
    self.__dict__["scheduler"] = run.scheduler
    state.run = run
    if "latents" not in call:
        self.__dict__[_PREPARE_LATENTS] = lambda *args, **kwargs: run.first_latents
    control_method = state.adapter.control_image_method if run.controls is not None else None
    if control_method is not None:
        # The pipeline prepares its control images (after its own checks); each is prepared at every stage's size too.
        self.__dict__[control_method] = stand_in_control_preparation(self, state.adapter, run.plan, run.controls, run)
    inpaint, rule = state.adapter.inpaint_layout(self), state.adapter.condition_rule(self)
    # Instance attributes standing in for the pipeline's methods during the call; what was there before (an
    # adapter's own stand-in, or nothing) comes back after it.
    stand_ins = stand_in_preparation(self, run, inpaint) if inpaint is not None else {}
    follower = None
    if rule is not None:
        condition_stand_in, follower = joined_conditions.stand_in(self, run, rule)
        stand_ins.update(condition_stand_in)
    replaced = {name: self.__dict__.get(name, _MISSING) for name in stand_ins}
    self.__dict__.update(stand_ins)
    try:
        run.caches.start(run.plan.stages[0])  # no cache state from an earlier call, whatever ended it
        with joined_conditions.following(follower):
            return stock_call(self, **call)
    finally:
        for name, before in replaced.items():
            if before is _MISSING:
                del self.__dict__[name]
            else:
                self.__dict__[name] = before
        if "latents" not in call:
            del self.__dict__[_PREPARE_LATENTS]
        if control_method is not None:
            del self.__dict__[control_method]
        self.__dict__["scheduler"] = stock_scheduler
        state.run = None
        run.caches.restore()


def plan_for(
    pipe: Any,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    *,
    strength: float = 1.0,
    **options: Any,
) -> StagePlan:
    r"""
    The stage plan a patched `pipe` would follow for a call with these arguments (nothing runs); `strength` is an
    image-to-image call's. Other keyword arguments of the pipeline's own `__call__` that decide its size are taken
    as the call's (FLUX.1 Kontext's `max_area`, a Qwen-Image-Edit reference `image`, the input `image` of an
    image-to-image pipeline that generates at its image's size); the rest are lssgen options.

    Example:

    ```py
    >>> print(lssgen.plan_for(pipe, 1024, 1024, 50, start_sigma=0.75).describe())
    ```
    """
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise ValueError("This pipeline is not patched; call `lssgen.patch(pipe)` first.")
    stock_parameters = inspect.signature(state.original_class.__call__).parameters
    call = {name: options.pop(name) for name in list(options) if name in stock_parameters and name not in OPTION_NAMES}
    _check_option_names(options, "lssgen.plan_for()")
    steps = num_inference_steps or _defaults_of(state.original_class.__call__).get("num_inference_steps")
    chosen = replace(state.defaults, **options)
    space = _check_options(chosen, state.upsampler, state.adapter, given=options, where="lssgen.plan_for()")
    call.update((name, side) for name, side in (("height", height), ("width", width)) if side is not None)
    height, width = _call_size(pipe, state, call)
    plan = _plan(pipe, state, chosen, height, width, steps, call, strength=strength)
    transition = resolve_method(chosen.method).transition
    return replace(plan, scaling=transition.describe(_describe_scaling(space, state)))


def _describe_scaling(space: str, state: PatchState) -> str:
    if space == "learned":
        return f"learned upsampler ({state.upsampler_note})"
    if space == "pixel":
        return "pixel round trip (decode, bicubic x2, encode)"
    if state.upsampler is not None:
        return "latent interpolation (bicubic x2; the upsampler is loaded but scaling_space='latent' is chosen)"
    return f"latent interpolation (bicubic x2; no upsampler: {state.upsampler_note})"


def _call_size(pipe: Any, state: PatchState, call: dict[str, Any]) -> tuple[int | None, int | None]:
    """The size a call asks for, as the stock pipeline reads it: an image-to-image call's from its input image where
    the pipeline takes it from there (`image_to_image_size`), a ControlNet call's as its pipeline reads it (some from
    a tensor control image: `control_size`), else its `height`/`width`; None: from other inputs or the family
    default (`_plan`)."""
    stock_call = state.original_class.__call__
    if takes_image_and_strength(stock_call) and call.get("image") is not None:
        return image_to_image_size(pipe, state.adapter, stock_call, call)
    if takes_control(pipe, state.adapter):
        return state.adapter.control_size(pipe, call)
    return call.get("height"), call.get("width")


def _plan(
    pipe: Any,
    state: PatchState,
    options: Options,
    height: int | None,
    width: int | None,
    steps: int,
    call: dict[str, Any] | None = None,
    strength: float = 1.0,
):
    adapter = state.adapter
    if not (height and width):
        default_height, default_width = adapter.size_from_inputs(pipe, call or {}) or adapter.default_size(pipe)
        height, width = height or default_height, width or default_width
    # A pipeline that snaps the size to a bin denoises at the bin (and resizes the image back): plan on the bin.
    height, width = adapter.resolution_bin(pipe, height, width, call or {}) or (height, width)
    shorten = options.shorten_intermediate_steps
    family_filled = replace(
        options,
        shorten_intermediate_steps=adapter.shorten_intermediate_steps if shorten is None else shorten,
        base_height=options.base_height or adapter.base_height,
        base_width=options.base_width or adapter.base_width,
    )
    request = PlanRequest(
        height=height,
        width=width,
        num_inference_steps=steps,
        scheduler=pipe.scheduler,
        facts=adapter,
        vae_scale_factor=adapter.vae_scale_factor(pipe),
        options=family_filled,
        strength=strength,
        control=takes_control(pipe, adapter),
        latent_spectrum=adapter.latent_spectrum(pipe),
    )
    return resolve_method(options.method).plan(request)


def _prepare_run(
    pipe: Any, state: PatchState, options: Options, scaling_space: str, call: dict, stock_defaults: dict
) -> Run | None:
    """Validate the call, plan it, and rewrite `call` for one stock call; None when no low-res stage fits."""
    adapter = state.adapter
    for name in _CONFLICTING_ARGUMENTS:
        if call.get(name) is not None:
            raise ValueError(
                f"`{name}` cannot be combined with multi-resolution generation: lssgen draws the noise and "
                f"plans the schedule of every stage itself. Drop `{name}`, or pass `start_sigma=1.0` to run the "
                "stock pipeline."
            )
    steps = call.get("num_inference_steps", stock_defaults.get("num_inference_steps"))
    stock_call = state.original_class.__call__
    image_to_image = takes_image_and_strength(stock_call)
    strength = call.get("strength", stock_defaults.get("strength")) if image_to_image else 1.0
    if image_to_image and (
        call.get("image") is None
        or isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not 0.0 < strength <= 1.0
    ):
        return None  # the stock pipeline's own error for a missing image, or a strength that keeps no step
    height, width = _call_size(pipe, state, call)
    plan = _plan(pipe, state, options, height, width, steps, call, strength)
    if not plan.is_multi_resolution:
        logger.warning(
            f"No low-resolution stage fits {plan.width}x{plan.height} with min_resolution={options.min_resolution} "
            "(the short side must be at least twice min_resolution); generating at full resolution only. Lower "
            "`min_resolution` to scale."
        )
        return None
    adapter.prepare_call(pipe, call, plan)
    if adapter.control_tensor_sets_size and takes_control(pipe, adapter):
        check_tensor_control_size(pipe, call, adapter.control_image_argument, plan)

    per_prompt = adapter.per_prompt_argument
    num_images = call.get(per_prompt)
    num_images = 1 if num_images is None else num_images
    if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 1:
        raise ValueError(f"`{per_prompt}` must be a positive integer, got {num_images!r}.")
    batch = adapter.batch_size(call) * num_images
    generator = call.get("generator")
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"{len(generator)} generators were passed for an effective batch of {batch} images "
            f"(prompts x {per_prompt}); pass one generator or one per image."
        )
    device = pipe._execution_device
    first, final = plan.stages[0], plan.stages[-1]
    inpaint = adapter.inpaint_layout(pipe)
    check_mask(pipe, call)
    if inpaint is None and image_to_image:
        image = first_stage_image_latents(pipe, adapter, call["image"], first, batch, adapter.latent_dtype(pipe))
    # Text-to-image starts from noise of the first stage's size; noise="shared" draws one field of the target size
    # instead, which every stage reads cell by cell (`Run.stage_noise`).
    drawn = final if options.noise == "shared" else first
    noise = None
    if options.noise == "shared" or not image_to_image:
        noise = randn_tensor(
            adapter.latent_shape(pipe, batch, drawn.latent_height, drawn.latent_width, {**stock_defaults, **call}),
            generator=generator,
            device=device,
            dtype=adapter.latent_dtype(pipe),
        )
    template = pipe.scheduler  # the stock scheduler (the staged one stands in during the call)
    scheduler = StagedScheduler(plan, template, device=device)
    run = Run(
        pipe=pipe,
        adapter=adapter,
        plan=plan,
        scheduler=scheduler,
        scaling_space=scaling_space,
        upsampler=state.upsampler,
        generator=generator,
        batch=batch,
        transition=resolve_method(options.method).transition,
        noise_field=noise if options.noise == "shared" else None,
        caches=StageCacheSchedules(
            [
                StageCacheSchedule(
                    denoiser,
                    lambda steps: stock_timesteps(template, adapter, steps, final.latent_height, final.latent_width),
                    final.num_steps,
                    scheduler.position,
                    lambda latent, stage: adapter.denoiser_latents(pipe, latent, stage),  # SeaCache's raw vision
                )
                for denoiser in adapter.denoisers(pipe)
            ]
        ),
    )
    if inpaint is not None:
        # The pipeline's own preparation encodes the image (cropped as `padding_mask_crop` says) and the mask at the
        # target size; the stand-ins (`lssgen.inpainting`) start the first stage from that image at its size.
        run.kept = KeptRegion(
            adapter, pipe, final, source=call["image"], cropped=call.get("padding_mask_crop") is not None
        )
        call.update(strength=1.0)
    elif image_to_image:
        # The first stage starts from the image noised to its own start; the stock loop then runs the plan's
        # timesteps whole (strength 1.0 keeps `get_timesteps` from cutting them again).
        run.first_latents = adapter.pack(pipe, run.renoise(image.to(device), first))
        call.update(strength=1.0)
    else:
        run.first_latents = adapter.pack(pipe, noise if run.noise_field is None else run.stage_noise(first, noise))
    if takes_control(pipe, adapter):
        count = control_count(pipe, adapter, call)
        # The control window is read off the stock schedule at the target size (see lssgen.controlnets).
        target = stock_timesteps(template, adapter, steps, final.latent_height, final.latent_width)
        run.controls = StageControls(
            scales=control_scales(call, stock_defaults, count),
            windows=control_windows(call, stock_defaults, count, target),
            current_timestep=lambda: float(scheduler.timesteps[scheduler.position().step]),
        )
    call.update(num_inference_steps=plan.total_steps)
    if "latents" in inspect.signature(stock_call).parameters:
        call.update(latents=run.first_latents)
    # A binning pipeline keeps the requested size, to resize its image back to it exactly as without lssgen.
    takes_size = "height" in inspect.signature(stock_call).parameters
    if takes_size and adapter.resolution_bin(pipe, plan.height, plan.width, call) is None:
        call.update(height=plan.height, width=plan.width)
    if "callback_on_step_end" in inspect.signature(state.original_class.__call__).parameters:
        callback, tensor_inputs = chain_callbacks(
            call.get("callback_on_step_end"), call.get("callback_on_step_end_tensor_inputs"), StageSwitchCallback(run)
        )
        call.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=tensor_inputs)
    else:
        # Older pipelines (PixArt) have no callback that may replace the latents: switch in the scheduler's step.
        run.scheduler.on_stage_end = run.next_stage_latents
    return run
