"""FLUX.1 (`FluxPipeline`): 2x2-packed latents, image position ids, a time shift from the image token count."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import ModelHook

from ..controlnets import controlnets_of
from ..hookspecs import hookimpl
from ..joined_conditions import ConditionRule, binary_mask_at, prepared_at_stage
from .base import Adapter, Architecture, InpaintLayout, dummy_tensors, flow_stage_kwargs, linear_time_shift

IMAGE_IDS_HOOK = "lssgen_flux_image_ids"

# FLUX.1-dev's transformer `config.json`, as constructor arguments.
FLUX_DEV_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


# FLUX.1-dev's scheduler, so plans and shifts match the real model's.
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


# The power law of FLUX.1's VAE latent spectrum, as SPEED measured it (DESIGN.md §1b); Chroma and Kontext share it.
FLUX1_LATENT_SPECTRUM = (203.615097, 1.915461)


def flux_dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with FLUX.1-dev's config."""
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def packed_dummy_inputs(
    model: torch.nn.Module, latent_height: int, latent_width: int, text_tokens: int, batch: int
) -> dict[str, torch.Tensor]:
    """The forward inputs every transformer of FLUX.1's layout takes (FLUX.1, Chroma): 2x2-packed latent tokens, text
    states, a timestep and both position ids; for `Adapter.denoiser_dummy_inputs`."""
    zeros, timestep = dummy_tensors(model, batch)
    # The pipelines pack 2x2 latent cells into one token of 4x the channels.
    tokens = (latent_height // 2) * (latent_width // 2)
    return {
        "hidden_states": zeros(batch, tokens, model.config.in_channels),
        "encoder_hidden_states": zeros(batch, text_tokens, model.config.joint_attention_dim),
        "timestep": timestep,
        "img_ids": zeros(tokens, 3),
        "txt_ids": zeros(text_tokens, 3),
    }


class FluxImageIdsHook(ModelHook):
    """Gives the transformer the position ids of the stage being denoised.

    FluxPipeline builds `img_ids` once, for the target size, before the loop; during a low-resolution stage
    they must describe the smaller latent instead. With a reference image (FluxKontextPipeline's `image=`), its
    tokens follow the latents in `hidden_states` and its ids follow the latent ids in `img_ids`; those are kept as
    they are.
    """

    def __init__(self, current_stage: Callable):
        super().__init__()
        self.current_stage = current_stage
        # Imported when a FLUX-family pipeline is patched, not with this module: that would import FluxPipeline's
        # image processors for every pipeline family, and transformers logs a torchvision notice for them.
        from diffusers import FluxPipeline

        self.image_ids = FluxPipeline._prepare_latent_image_ids

    def pre_forward(self, module, *args, **kwargs):
        stage = self.current_stage()
        img_ids = kwargs.get("img_ids")
        if stage is None or img_ids is None:
            return args, kwargs
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        # Built afresh each call (a few small aranges) rather than cached: under torch.compile a cache would
        # become guarded state and cost extra recompilations; this way each stage size compiles once.
        stage_ids = self.image_ids(None, rows, cols, img_ids.device, img_ids.dtype)
        # Whatever `hidden_states` holds beyond this stage's tokens is reference-image tokens, whose ids are the
        # same number of trailing ids.
        hidden_states = kwargs.get("hidden_states")
        references = 0 if hidden_states is None else hidden_states.shape[1] - rows * cols
        if references > 0:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # the transformer reads a batched one's first
            stage_ids = torch.cat([stage_ids, ids[ids.shape[0] - references :]], dim=0)
        kwargs["img_ids"] = stage_ids
        return args, kwargs


def _control_at_stage(pipe, run, arguments, stage):
    """FLUX.1 Control's condition at `stage`'s size, as the pipeline makes it at the target size: `prepare_image`
    at the stage's size (a tensor, which it takes as it is, resized first), sampled from the VAE with the call's
    generator, normalised and packed."""
    prepared = prepared_at_stage(pipe, arguments, stage)
    encoded = pipe.vae.encode(prepared).latent_dist.sample(generator=run.generator)
    latents = (encoded - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return pipe._pack_latents(latents, *latents.shape)


def _fill_at_stage(pipe, run, arguments, stage):
    """FLUX.1 Fill's condition at `stage`'s size, as the pipeline makes it at the target size: its
    `prepare_mask_latents` at the stage's size, given the mask (in pixels) resized to the stage by area and kept
    binary and the masked image resized there (by area) and masked by it; then the masked image's latents joined to
    the mask along the channels."""
    mask, masked = arguments["mask"], arguments["masked_image"]
    stage_mask = binary_mask_at(mask, stage)
    stage_masked = F.interpolate(masked.float(), (stage.height, stage.width), mode="area")
    stage_masked = stage_masked.to(masked.dtype) * (1 - stage_mask)
    at_size = {"mask": stage_mask, "masked_image": stage_masked, "height": stage.height, "width": stage.width}
    mask_latents, masked_latents = type(pipe).prepare_mask_latents(pipe, **{**arguments, **at_size})
    return torch.cat((masked_latents, mask_latents), dim=-1)


class FluxAdapter(Adapter):
    name = "flux"
    pipeline_classes = (
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxControlNetPipeline",
        "FluxFillPipeline",
        "FluxControlPipeline",
        "FluxControlImg2ImgPipeline",
        "FluxControlInpaintPipeline",
    )
    # FluxInpaintPipeline's `prepare_latents` gives (latents, noise, image latents, ids), `prepare_mask_latents`
    # (mask, masked image latents); its loop blends FLUX.1's packed latents with them.
    # FluxControlInpaintPipeline's gives them unpacked, and only when it draws its noise itself (given latents, it
    # returns two things where its call takes four).
    inpaint_layouts = {
        "FluxInpaintPipeline": InpaintLayout(),
        "FluxControlInpaintPipeline": InpaintLayout(packed=False, draws_noise=True),
    }
    # Fill joins the masked image's latents and the mask, Control (Canny, Depth) the encoded control image, to the
    # latents along the channels in every step.
    condition_rules = {
        "FluxFillPipeline": ConditionRule("prepare_mask_latents", _fill_at_stage, "mask_image"),
        "FluxControlPipeline": ConditionRule("prepare_image", _control_at_stage, "control_image"),
        "FluxControlImg2ImgPipeline": ConditionRule("prepare_image", _control_at_stage, "control_image"),
        "FluxControlInpaintPipeline": ConditionRule("prepare_image", _control_at_stage, "control_image"),
    }
    image_to_image_pipelines = {"FluxPipeline": "FluxImg2ImgPipeline"}
    inpainting_pipelines = {"FluxPipeline": "FluxInpaintPipeline"}
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # 2x2 packing
    shorten_intermediate_steps = True
    default_steps = 50
    default_guidance = 3.5
    stage_hook = FluxImageIdsHook
    stage_hook_name = IMAGE_IDS_HOOK
    # Whether the pipeline passes its linspace sigmas to a scheduler with `use_flow_sigmas` too (FluxPipeline does
    # not: such a scheduler makes its own).
    sigmas_for_flow_sigmas = False
    # 512 text tokens: FLUX.1-dev's T5 `max_sequence_length` default; guidance-distilled, so one call per step.
    architectures = (
        Architecture(
            name="FLUX.1-dev",
            model_class="FluxTransformer2DModel",
            config=FLUX_DEV_CONFIG,
            text_tokens=512,
            cfg_factor=1,
            scheduler=flux_dev_scheduler,
        ),
    )

    def latent_spectrum(self, pipe: Any) -> tuple[float, float]:
        return FLUX1_LATENT_SPECTRUM

    def prepare_call(self, pipe, call, plan):
        if type(pipe).__name__ == "FluxFillPipeline" and call.get("masked_image_latents") is not None:
            raise ValueError(
                "`masked_image_latents` are given at the target size, but lssgen prepares the masked image at each "
                "stage's size: pass `image` and `mask_image` instead, or `start_sigma=1.0` to run the stock pipeline."
            )

    def latent_channels(self, pipe: Any) -> int:
        # The packed channels it predicts: Fill's and Control's transformers take a condition's channels in too.
        config = pipe.transformer.config
        return (config.out_channels or config.in_channels) // 4

    def pack(self, pipe, latents):
        batch, channels, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width)

    def unpack(self, pipe, latents, latent_height, latent_width):
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(latents, latent_height * factor, latent_width * factor, factor)

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        tokens = (latent_height // 2) * (latent_width // 2)
        mu = linear_time_shift(scheduler.config, tokens, 1.15)
        return flow_stage_kwargs(scheduler, num_steps, mu, sigmas_for_flow_sigmas=self.sigmas_for_flow_sigmas)

    # ControlNet: FluxControlNetPipeline's `prepare_image` preprocesses (a tensor is taken as it is) and repeats the
    # control image; the pipeline then encodes it with the VAE and packs it, for controlnets without an input hint
    # block (InstantX's; XLabs' take the pixels). Its controlnets take `img_ids` too: the ids hook goes on them.
    control_image_method = "prepare_image"
    control_image_argument = "control_image"
    control_tensor_sets_size = True

    def stage_control_image(self, pipe, prepare, arguments, stage, run):
        prepared = super().stage_control_image(pipe, prepare, arguments, stage, run)
        if controlnets_of(pipe)[0].input_hint_block is not None:
            return prepared
        from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents

        # Encoded as the pipeline encodes its control image: sampled with the call's generator, then normalised.
        latents = retrieve_latents(pipe.vae.encode(prepared), generator=run.generator)
        latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        return pipe._pack_latents(latents, *latents.shape)

    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        kwargs = packed_dummy_inputs(model, latent_height, latent_width, text_tokens, batch)
        kwargs["pooled_projections"] = kwargs["hidden_states"].new_zeros(batch, model.config.pooled_projection_dim)
        if model.config.guidance_embeds:
            kwargs["guidance"] = kwargs["timestep"]
        return kwargs


class FluxKontextAdapter(FluxAdapter):
    r"""
    Adapter for [`~diffusers.FluxKontextPipeline`] (FLUX.1 Kontext: editing with a reference image).

    FLUX.1's transformer, packing and schedule; what differs is the size and the reference:

    - the pipeline rescales the requested `height` x `width` to the area `max_area` (1024² by default), keeping the
      aspect ratio, and denoises at that size (`resolution_bin`): the stages are planned on it. Where the plan rounds
      it down to a size that halves, the call is given the plan's size and area so that the pipeline keeps it
      (`prepare_call`);
    - the reference image (resized to a preset Kontext size when `_auto_resize`, else to its own size) is encoded
      once and its packed latents follow the image tokens in every transformer call, with ids of its own (t = 1).
      They do not depend on the stage: the ids hook rewrites only the generated image's ids and keeps the
      reference's, and the loop's latents (which lssgen switches per stage) are the generated image's alone.
    """

    name = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline", "FluxKontextInpaintPipeline")
    # FluxKontextInpaintPipeline's `prepare_latents` gives (latents, image latents, reference latents, ids, image
    # ids, reference ids, noise).
    inpaint_layouts = {"FluxKontextInpaintPipeline": InpaintLayout(latents=0, image=1, noise=6)}
    # An editing pipeline has no image-to-image class (the family's maps its text-to-image class): Hires fix refuses it.
    image_to_image_pipelines = {}
    inpainting_pipelines = {}
    # black-forest-labs/FLUX.1-Kontext-dev's model card example: `guidance_scale=2.5` (the pipeline's default steps,
    # 28, are the model's; the method's published 50 stay the adapter's default).
    default_guidance = 2.5
    architectures = ()  # the same transformer as FLUX.1-dev, counted there

    @staticmethod
    def _stock_max_area() -> int:
        # From diffusers' class itself: a patched pipe's `__call__` is lssgen's.
        from diffusers import FluxKontextPipeline

        return inspect.signature(FluxKontextPipeline.__call__).parameters["max_area"].default

    @staticmethod
    def _inpaints(pipe) -> bool:
        return type(pipe).__name__ == "FluxKontextInpaintPipeline"

    def image_to_image_size(self, pipe, call):
        """FluxKontextInpaintPipeline generates at its image's size, whatever `height`/`width` say: with
        `_auto_resize` (the default) the preferred Kontext resolution nearest its aspect ratio, rounded down to
        whole 16-pixel patches."""
        if not self._inpaints(pipe):
            return None
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        image = call["image"]
        image = image[0] if isinstance(image, list) else image
        multiple = self.vae_scale_factor(pipe) * self.latent_multiple
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == pipe.latent_channels:
            return image.shape[2] * pipe.vae_scale_factor, image.shape[3] * pipe.vae_scale_factor  # latents
        height, width = pipe.image_processor.get_default_height_width(image)
        if call.get("_auto_resize", True):
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return height // multiple * multiple, width // multiple * multiple

    def resolution_bin(self, pipe, height, width, call):
        if self._inpaints(pipe):
            return None  # it takes its image's size (`image_to_image_size`), not `max_area`'s
        if not all(
            isinstance(side, numbers.Integral) and not isinstance(side, bool) and side > 0 for side in (height, width)
        ):
            return None  # the plan's own error for such a size
        max_area = call.get("max_area", self._stock_max_area())
        if isinstance(max_area, bool) or (isinstance(max_area, numbers.Real) and max_area <= 0):
            raise ValueError(f"`max_area` must be a positive number of pixels, got {max_area!r}.")
        if not isinstance(max_area, numbers.Real):
            return None  # the stock pipeline's own error for such an area
        # The stock rule: the requested aspect ratio at `max_area`, rounded down to whole 2x2 patches.
        multiple = self.vae_scale_factor(pipe) * self.latent_multiple
        aspect_ratio = width / height
        rescaled_width = round((max_area * aspect_ratio) ** 0.5) // multiple * multiple
        rescaled_height = round((max_area / aspect_ratio) ** 0.5) // multiple * multiple
        if not (rescaled_height and rescaled_width):
            # The stock pipeline would denoise an empty image and fail only when decoding it.
            raise ValueError(
                f"`max_area`={max_area!r} rescales {width}x{height} to {rescaled_width}x{rescaled_height}: FLUX.1 "
                f"Kontext needs at least {multiple} pixels a side. Pass a larger `max_area` (the default is "
                f"{self._stock_max_area()}, 1024²)."
            )
        return rescaled_height, rescaled_width

    def prepare_call(self, pipe, call, plan):
        if self._inpaints(pipe):
            if call.get("image_reference") is None:
                raise ValueError(
                    "FluxKontextInpaintPipeline without `image_reference` uses its `image` both as the reference "
                    "tokens, which stay at the target size in every stage, and as the kept image it blends in, which "
                    "lssgen gives each stage at the stage's size: one tensor cannot be both. Pass the reference "
                    "explicitly (`image_reference=image` keeps the stock meaning), or `start_sigma=1.0` to run the "
                    "stock pipeline."
                )
            return
        default_height, default_width = self.default_size(pipe)
        requested = (call.get("height") or default_height, call.get("width") or default_width)
        rescaled = self.resolution_bin(pipe, *requested, call)
        if rescaled is not None and rescaled != (plan.height, plan.width):
            # The plan rounded the size down to one that halves: ask for the plan's size at exactly its own area,
            # which the pipeline's rescaling keeps as it is.
            call.update(height=plan.height, width=plan.width, max_area=plan.height * plan.width)


@hookimpl
def register_adapters(register):
    register(FluxAdapter())
    register(FluxKontextAdapter())
