"""What an adapter tells lssgen about one pipeline family. The controller only ever talks to this interface."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..controlnets import control_image_size, tensor_control_size
from ..latents import LatentNormalization, encoded_latents
from ..shared_hooks import release_hook, share_hook

if TYPE_CHECKING:
    from ..plan import Stage, StagePlan


@dataclass(frozen=True)
class InpaintLayout:
    """Where an inpainting pipeline's preparation returns what its loop blends with: the positions of the starting
    latents, the noise and the image latents in `prepare_latents`' tuple, and of the mask in
    `prepare_mask_latents`' (a tensor alone: None). `latents_patch`: the `latents` argument `prepare_latents`
    takes is the unpacked latent with each `latents_patch` x `latents_patch` cells folded into channels.
    `draws_noise`: the method must be called without latents (given some, it returns other things), so it draws a
    noise from the call's generators that lssgen discards."""

    latents: int = 0
    noise: int = 1
    image: int = 2
    mask: int | None = 0
    masked: int = 1  # the masked image's latents in `prepare_mask_latents`' tuple (read where the denoiser does)
    latents_patch: int = 1
    draws_noise: bool = False
    # The image latents and noise are in the loop's layout; False: unpacked, and the loop packs its blended image
    # every step with the target size's height and width (FluxControlInpaintPipeline), which lssgen reads from the
    # tensor instead (a stand-in `_pack_latents`).
    packed: bool = True


def linear_time_shift(
    scheduler_config: Any, image_seq_len: int, default_max_shift: float, *, capped: bool = True
) -> float:
    """The linear `mu` rule of FLUX.1 and SD3 for `image_seq_len` image tokens, the length capped at the
    scheduler's `max_image_seq_len` (DESIGN §1.4); with `capped=False`, extrapolated past it, as QwenImagePipeline
    does."""
    # diffusers' `calculate_shift`, written out: importing it from `pipeline_flux` imports FluxPipeline's image
    # processors too, and transformers then logs a torchvision notice for any pipeline family.
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_len = scheduler_config.get("base_image_seq_len", 256)
    base_shift = scheduler_config.get("base_shift", 0.5)
    slope = (scheduler_config.get("max_shift", default_max_shift) - base_shift) / (max_len - base_len)
    return base_shift + slope * ((min(image_seq_len, max_len) if capped else image_seq_len) - base_len)


def flow_stage_kwargs(
    scheduler: Any, num_steps: int, mu: float | None, *, sigmas_for_flow_sigmas: bool = False
) -> dict[str, Any]:
    """`set_timesteps` arguments of a stage of a pipeline that passes `sigmas = linspace(1, 1/n, n)` (FLUX.1,
    FLUX.2, Chroma; the step count for schedulers that take no custom sigmas) and the stage's time shift `mu`, if
    any, where the scheduler takes one. FluxPipeline passes no sigmas to a scheduler with `use_flow_sigmas`
    (letting it make its own); for a pipeline that passes them anyway (Chroma), `sigmas_for_flow_sigmas=True`."""
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    kwargs: dict[str, Any] = {}
    own_flow_sigmas = scheduler.config.get("use_flow_sigmas", False) and not sigmas_for_flow_sigmas
    if "sigmas" in accepted and not own_flow_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)  # an array, as the pipelines pass it
    else:
        kwargs["num_inference_steps"] = num_steps
    if mu is not None and "mu" in accepted:
        kwargs["mu"] = mu
    return kwargs


@dataclass(frozen=True)
class Architecture:
    r"""
    A published denoiser of an adapter's family, with the facts of its pipeline that set the cost of a generation:
    what `lssgen.evaluation.flops` builds on the `meta` device and counts.

    These are per-model facts, so they live with the family's adapter (`Adapter.architectures`), not in
    `lssgen.evaluation.flops`: a new family adds its published models in its own adapter file, and the FLOP count
    finds them through the installed adapters like everything else.

    Args:
        name (`str`): the model's name in tables (e.g. `"FLUX.1-dev"`).
        model_class (`str`): the diffusers model class of the denoiser.
        config (`dict`): the published `config.json` of the denoiser, as constructor arguments.
        text_tokens (`int`): the length of `encoder_hidden_states` in a default call of the pipeline.
        cfg_factor (`int`): denoiser batch per image: 2 with classifier-free guidance, 1 for guidance-distilled
            models.
        scheduler (`Callable[[], Any]`): builds a fresh scheduler with the published config.
        adapter (`Adapter`, *optional*): the adapter that lists it; `lssgen.evaluation.flops` fills it in.
        sizes (`tuple[tuple[int, int], ...]`, *optional*): the published `(height, width)` sizes the FLOP tables show
            for this model; empty for the square image sizes every image model is shown at.
        default_steps (`int`, *optional*): the model's published step count, where it differs from its adapter's
            `default_steps` (one family, several releases).
    """

    name: str
    model_class: str
    config: dict
    text_tokens: int
    cfg_factor: int
    scheduler: Callable[[], Any]
    adapter: Adapter | None = None
    sizes: tuple[tuple[int, int], ...] = ()
    default_steps: int | None = None

    @property
    def steps(self) -> int:
        """The model's published step count (its adapter's default unless it has its own)."""
        return self.default_steps if self.default_steps is not None else self.adapter.default_steps


def dummy_tensors(model: torch.nn.Module, batch: int) -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """For `Adapter.denoiser_dummy_inputs`: `zeros(*shape)` on `model`'s device, and a `(batch,)` timestep."""
    device = next(model.parameters()).device
    return functools.partial(torch.zeros, device=device), torch.ones(batch, device=device)


class Adapter:
    """Per-architecture facts and the few operations that depend on them.

    Subclasses set the class attributes and override what differs; the defaults suit an unpacked
    `(batch, channels, height, width)` latent with the usual VAE normalisation.
    """

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # stock pipeline class names this adapter serves
    # Text-to-image class name -> the stock image-to-image class on the same components (`lssgen.hires`).
    image_to_image_pipelines: dict[str, str] = {}
    # The diffusers class name of each text-to-image pipeline's inpainting pipeline (`lssgen.inpainting_pipeline`).
    inpainting_pipelines: dict[str, str] = {}
    denoiser: str = "transformer"  # pipeline attribute holding the denoising model
    flow: bool = True  # flow matching, or a diffusion (noise prediction) model
    latent_multiple: int = 1  # latent sides must be multiples of this
    shorten_intermediate_steps: bool = True  # the published default for this family
    base_size: int = 1024  # native resolution, the reference for shortening
    # The default `min_resolution` of a patched pipe: the published 512 px (a 1024-px model's half); a family whose
    # native size is smaller sets its own.
    min_resolution: int = 512
    default_steps: int = 50  # published settings of the method for this family
    default_guidance: float = 3.5
    # The call argument that takes the guidance scale: most pipelines read `guidance_scale`, but some read it from
    # another argument and leave `guidance_scale` to distilled checkpoints (Qwen-Image's classifier-free guidance
    # is `true_cfg_scale`). The command line passes `--guidance` and `default_guidance` as this argument.
    guidance_argument: str = "guidance_scale"
    # The shipped upsampler (`lssgen.weights_path` name) `lssgen.patch` uses when given none, if it fits the pipe.
    default_upsampler: str | None = None
    # Whether the learned upsampler and latent interpolation work on the VAE's own latent (`latents_to_vae` of the
    # unpacked latents) instead of the pipeline's normalised one. For normalisations that are not one affine map
    # per channel of the unpacked grid (FLUX.2's BatchNorm over 2x2 patches gives each cell of a patch its own
    # statistics), interpolating the normalised grid would mix differently scaled cells, and upsampler weights
    # trained there would depend on one checkpoint's statistics.
    scale_in_vae_space: bool = False
    # The call argument that multiplies the prompts into the effective batch (`num_videos_per_prompt` for video).
    per_prompt_argument: str = "num_images_per_prompt"
    # The family's published denoisers, for `lssgen.evaluation.flops` (see `Architecture`); their `model_class` names
    # are also the denoiser classes whose `denoiser_dummy_inputs` this adapter knows.
    architectures: tuple[Architecture, ...] = ()

    @property
    def base_height(self) -> int:
        """The native height, the reference for shortening (`base_size`; a family with an oblong native size sets
        `base_height` and `base_width` instead)."""
        return self.base_size

    @property
    def base_width(self) -> int:
        return self.base_size

    # Selection --------------------------------------------------------------------------------------------------
    def match_rank(self, pipe: Any) -> int | None:
        """How closely this adapter fits `pipe`: the MRO distance to a class it serves (0 = exact), or None."""
        for distance, cls in enumerate(type(pipe).__mro__):
            if cls.__name__ in self.pipeline_classes:
                return distance
        return None

    # Geometry ---------------------------------------------------------------------------------------------------
    @property
    def min_stage_latent_side(self) -> int:
        """The smallest stage's short side in latent cells, at least: one patch (every built-in family runs a
        one-patch stage in every scaling space; a subclass may set a larger number)."""
        return self.latent_multiple

    def denoisers(self, pipe: Any) -> list[Any]:
        """Every model the pipeline may denoise a step with (the `denoiser`; Wan 2.2 has a second expert): stateful
        hooks on each are cleared at every stage start."""
        return [getattr(pipe, self.denoiser)]

    def latent_channels(self, pipe: Any) -> int:
        return getattr(pipe, self.denoiser).config.in_channels

    def check_patch_size(self, pipe: Any) -> None:
        """For denoisers that patchify: stage sizes and token counts assume patches of `latent_multiple` cells."""
        patch_size = getattr(pipe, self.denoiser).config.patch_size
        if patch_size != self.latent_multiple:
            raise ValueError(
                f"lssgen's {self.name} adapter expects a {self.denoiser} with {self.latent_multiple}x"
                f"{self.latent_multiple} patches; this one has patch_size={patch_size}. Register an adapter "
                "subclass with `latent_multiple` set to the patch size."
            )

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        return getattr(pipe, self.denoiser).dtype

    def vae_scale_factor(self, pipe: Any) -> int:
        """Pixels per latent cell along height and width (the VAE's spatial compression)."""
        return pipe.vae_scale_factor

    def default_size(self, pipe: Any) -> tuple[int, int]:
        side = pipe.default_sample_size * self.vae_scale_factor(pipe)
        return side, side

    def latent_shape(
        self, pipe: Any, batch: int, latent_height: int, latent_width: int, call: dict[str, Any]
    ) -> tuple[int, ...]:
        """The unpacked shape of `batch` latents of `latent_height` x `latent_width` cells for this `call` (its
        arguments, the stock defaults filled in): `(B, C, h, w)` for images. A family with more axes (a video's
        frames) adds them here; the core only ever changes the last two."""
        return (batch, self.latent_channels(pipe), latent_height, latent_width)

    def size_from_inputs(self, pipe: Any, call: dict[str, Any]) -> tuple[int, int] | None:
        """The size a call that leaves out `height`/`width` generates at, where the stock pipeline reads it from
        another input (Qwen-Image-Edit: the reference image's aspect ratio); None: `default_size`."""
        return None

    def resolution_bin(self, pipe: Any, height: int, width: int, call: dict[str, Any]) -> tuple[int, int] | None:
        """The size the stock call really denoises at when it snaps `height` x `width` to a bin and resizes the
        image back itself (e.g. PixArt's `use_resolution_binning`), or rescales it (FLUX.1 Kontext's `max_area`);
        None when it denoises at the requested size. The stages are planned on this size, and the call keeps the
        requested one (`prepare_call` may change that)."""
        return None

    def pack(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """From the unpacked `latent_shape` (`(B, C, h, w)` for images) to the layout the denoising loop carries."""
        return latents

    def unpack(self, pipe: Any, latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """From the loop's layout back to the unpacked `latent_shape`."""
        return latents

    def denoiser_latents(self, pipe: Any, latent: torch.Tensor, stage: Stage) -> torch.Tensor:
        """The latent a denoiser call of `stage` denoises, `(B, C, h, w)`, from the denoiser's latent input (its
        first argument). Token-packed inputs may carry other tokens after the latent's own (FLUX.2's reference
        images); those are left out."""
        if latent.ndim == 3:
            tokens = (stage.latent_height // self.latent_multiple) * (stage.latent_width // self.latent_multiple)
            latent = latent[:, :tokens]
        return self.unpack(pipe, latent, stage.latent_height, stage.latent_width)

    def batch_size(self, call: dict[str, Any]) -> int:
        """Prompts in one call, before `num_images_per_prompt`."""
        prompt = call.get("prompt")
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return len(prompt)
        if prompt is not None:
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        if call.get("prompt_embeds") is not None:
            return call["prompt_embeds"].shape[0]
        raise ValueError("Pass either `prompt` or `prompt_embeds`.")

    # Schedule ---------------------------------------------------------------------------------------------------
    def timestep_kwargs(self, scheduler: Any, num_steps: int, latent_height: int, latent_width: int) -> dict:
        return {"num_inference_steps": num_steps}

    def image_to_image_size(self, pipe: Any, call: dict[str, Any]) -> tuple[int, int] | None:
        """The size an image-to-image call generates at, where the family's pipeline decides it its own way (e.g.
        from the input image whatever `height`/`width` say); None: the usual rule (`lssgen.conditions`)."""
        return None

    def image_to_image_arguments(self, pipe: Any, image: Any) -> dict[str, Any]:
        """Call arguments an image-to-image call of `pipe` needs beside `image` and `strength` (FLUX.2 klein's, an
        inpainting pipeline, its all-white mask); `image` is the PIL input image."""
        return {}

    def prepare_call(self, pipe: Any, call: dict[str, Any], plan: StagePlan) -> None:
        """Check and set call arguments in place, before anything is encoded or denoised: refuse what the family's
        adapter does not serve with a `ValueError` naming the argument, and set what the stock pipeline would
        derive from target-size inputs which lssgen gives at the first stage's size (e.g. SDXL img2img's size
        conditioning, read from the latents' shape)."""

    # Resolution conditioning ------------------------------------------------------------------------------------
    # A diffusers ModelHook class, built with the `current_stage` callable, for conditioning that must follow the
    # stage's size (Flux's position ids, SDXL's time ids); registered on the denoiser under `stage_hook_name`.
    stage_hook: type | None = None
    stage_hook_name: str = ""

    def install_hooks(self, pipe: Any, current_stage: Callable[[], Stage | None]) -> None:
        """Register hooks that give the model the conditioning of `current_stage()`, a low-resolution stage;
        None means leave the pipeline's own conditioning alone (no lssgen call, or the target-size stage)."""
        if self.stage_hook is not None:
            share_hook(getattr(pipe, self.denoiser), self.stage_hook_name, self.stage_hook, pipe, current_stage)

    def remove_hooks(self, pipe: Any) -> None:
        """Undo `install_hooks`."""
        if self.stage_hook is not None:
            release_hook(getattr(pipe, self.denoiser), self.stage_hook_name, pipe)

    # Inpainting (see lssgen.inpainting) ----------------------------------------------------------------------------
    # Per inpainting pipeline class served: where its `prepare_latents` and `prepare_mask_latents` return what the
    # loop blends with.
    inpaint_layouts: dict[str, InpaintLayout] = {}

    def inpaint_layout(self, pipe: Any) -> InpaintLayout | None:
        """The layout of `pipe`'s inpainting preparation; None: `pipe` does not inpaint."""
        return self.inpaint_layouts.get(type(pipe).__name__)

    # Per pipeline class that joins a condition to the latents along the channels in its loop (FLUX.1 Fill and
    # Control): the method that makes it and how to make it at a stage's size (see lssgen.joined_conditions).
    condition_rules: dict[str, Any] = {}

    def condition_rule(self, pipe: Any) -> Any:
        """`pipe`'s `lssgen.joined_conditions.ConditionRule`; None: its loop joins no condition to the latents."""
        return self.condition_rules.get(type(pipe).__name__)

    def denoiser_reads_mask(self, pipe: Any) -> bool:
        """Whether `pipe`'s denoiser takes the mask and the masked image as input channels (SD's 9-channel inpainting
        U-Nets), which then follow each stage as the pipeline prepares them at its size, instead of a blend."""
        return False

    def unpack_mask(self, pipe: Any, mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """An inpainting mask as the loop holds it → `(B, C, h, w)` on the latent grid: unpacked latents' layout as
        it is, packed like the latents (FLUX.1's 2x2 patches of every channel) unpacked like them, or one value per
        token `(B, tokens, 1)` (FLUX.2's) spread over each token's cells."""
        if mask.ndim != 3:
            return mask
        if mask.shape[-1] != 1:
            return self.unpack(pipe, mask, latent_height, latent_width)
        rows, cols = latent_height // self.latent_multiple, latent_width // self.latent_multiple
        grid = mask.transpose(1, 2).reshape(mask.shape[0], 1, rows, cols)
        return grid.repeat_interleave(self.latent_multiple, -2).repeat_interleave(self.latent_multiple, -1)

    def pack_mask(self, pipe: Any, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Undo `unpack_mask` for a mask of another size, in the layout of `like` (the mask as the loop holds it):
        one value per token is the mean of the token's cells."""
        if like.ndim != 3:
            return mask
        if like.shape[-1] != 1:
            return self.pack(pipe, mask)
        tokens = F.avg_pool2d(mask.float(), self.latent_multiple).to(mask.dtype)
        return tokens.flatten(2).transpose(1, 2)

    # ControlNet (see lssgen.controlnets) --------------------------------------------------------------------------
    # The pipeline's method that prepares one control image at a size (called once per control image, in order), and
    # the call argument holding the control image(s); None: the family has no ControlNet class lssgen serves.
    control_image_method: str | None = None
    control_image_argument: str = "image"
    # The controlnet's forward argument that takes the condition (by name, or at its position).
    control_condition_argument: str = "controlnet_cond"
    # The pipeline takes a tensor control image as it is (no resize) and generates at its size, whatever
    # `height`/`width` say (FLUX.1's, SD3's, Qwen-Image's and Z-Image's ControlNet pipelines): such a tensor must
    # have the planned size (`lssgen.controlnets.check_tensor_control_size`), and each stage gets it resized.
    control_tensor_sets_size: bool = False

    def control_size(self, pipe: Any, call: dict[str, Any]) -> tuple[int | None, int | None]:
        """The size a ControlNet call generates at, as the stock pipeline decides it (None: the family default): a
        tensor control image's where it sets the size, else the call's `height`/`width`, else, where the pipeline
        has no default size (SD's, SDXL's), the control image's."""
        tensor_size = tensor_control_size(call, self.control_image_argument) if self.control_tensor_sets_size else None
        return tensor_size or control_image_size(pipe, self, call)

    def stage_control_image(
        self, pipe: Any, prepare: Callable, arguments: dict[str, Any], stage: Stage, run: Any
    ) -> torch.Tensor:
        """The control condition a controlnet receives during `stage`: the pipeline's own preparation (`prepare`,
        the stock `control_image_method`) with the stock call's `arguments` but the stage's size. A family whose
        pipeline encodes the prepared image further (with the VAE, then packs it) adds that here."""
        image = arguments["image"]
        if self.control_tensor_sets_size and isinstance(image, torch.Tensor):
            # Taken as it is at the target size: at a stage, resized as the pipeline's image processor resizes tensors.
            image = pipe.image_processor.resize(image, stage.height, stage.width)
        return prepare(**{**arguments, "image": image, "height": stage.height, "width": stage.width})

    def fit_control_condition(self, stock: Any, condition: Any) -> Any:
        """The stage's `condition` as the controlnet takes it in the call that passes `stock` (the target-size
        condition the pipeline hands it): as it is, unless the pipeline changes the condition per call (Z-Image's
        doubles it for classifier-free guidance)."""
        return condition

    def timesteps_for_sigmas(
        self, scheduler: Any, sigmas: Any, latent_height: int, latent_width: int
    ) -> list[float] | None:
        """The timesteps the denoiser is conditioned on at these noise levels in a stage of this latent size, where
        they are not sigma x `num_train_timesteps` (what a flow scheduler given only sigmas passes it); None where
        they are. Methods that set a stage's sigmas themselves (`lssgen.methods`) ask."""
        return None

    def latent_spectrum(self, pipe: Any) -> tuple[float, float] | None:
        """`(a, beta)`: the power law P(w) = a w^-beta of the spectrum of this pipeline's VAE latents, which method
        'spectral' ends its stages by (`lssgen.spectrum`); None where none is measured for the family's VAE. `pipe`
        None: the family's published models (`architectures`)."""
        return None

    # VAE normalisation (for the pixel round trip) ---------------------------------------------------------------
    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        """How the pipeline maps VAE latents to the latents it denoises."""
        return LatentNormalization.from_vae_config(pipe.vae.config)

    def latents_to_vae(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Undo the pipeline's latent normalisation, giving what `vae.decode` expects."""
        return self.latent_normalization(pipe).to_vae(latents)

    def vae_to_latents(self, pipe: Any, vae_latents: torch.Tensor) -> torch.Tensor:
        """Apply the pipeline's latent normalisation to what `vae.encode` gives."""
        return self.latent_normalization(pipe).from_vae(vae_latents)

    def encode_pixels(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] → unpacked pipeline latents `(B, C, H/f, W/f)`, float32: `vae.encode`
        (its mode), then the pipeline's normalisation (a video VAE's family adds the frame axis)."""
        return self.vae_to_latents(pipe, encoded_latents(pipe.vae.encode(pixels)))

    # FLOP counts (`lssgen.evaluation.flops`) -------------------------------------------------------------------------
    def denoiser_dummy_inputs(
        self, model: torch.nn.Module, latent_height: int, latent_width: int, text_tokens: int, batch: int = 1
    ) -> dict[str, Any]:
        """Keyword arguments of one forward call of `model` (this family's denoiser, possibly on the `meta`
        device), on the model's device and shaped as the pipeline calls it for a `latent_height` x `latent_width`
        latent (unpacked cells) and `text_tokens` text tokens: what `lssgen.evaluation.flops` counts."""
        raise NotImplementedError(
            f"lssgen's {self.name} adapter cannot build dummy inputs for {type(model).__name__}: FLOP counts need "
            f"{type(self).__name__}.denoiser_dummy_inputs; see lssgen.adapters.flux for an example."
        )

    def __repr__(self) -> str:
        return f"<lssgen adapter {self.name!r} for {', '.join(self.pipeline_classes)}>"
