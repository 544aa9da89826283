"""FLUX.1 (`FluxPipeline`): 2x2-packed latents, image position ids, a time shift from the image token count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers import FluxPipeline
from diffusers.hooks import ModelHook

from ..hookspecs import hookimpl
from .base import Adapter, flow_stage_kwargs, linear_time_shift

IMAGE_IDS_HOOK = "lssgen_flux_image_ids"


class FluxImageIdsHook(ModelHook):
    """Gives the transformer the position ids of the stage being denoised.

    FluxPipeline builds `img_ids` once, for the target size, before the loop; during a low-resolution stage
    they must describe the smaller latent instead.
    """

    def __init__(self, current_stage: Callable):
        super().__init__()
        self.current_stage = current_stage

    def pre_forward(self, module, *args, **kwargs):
        stage = self.current_stage()
        img_ids = kwargs.get("img_ids")
        if stage is None or img_ids is None:
            return args, kwargs
        # Built afresh each call (a few small aranges) rather than cached: under torch.compile a cache would
        # become guarded state and cost extra recompilations; this way each stage size compiles once.
        kwargs["img_ids"] = FluxPipeline._prepare_latent_image_ids(
            None, stage.latent_height // 2, stage.latent_width // 2, img_ids.device, img_ids.dtype
        )
        return args, kwargs


class FluxAdapter(Adapter):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # 2x2 packing
    shorten_intermediate_steps = True
    default_steps = 50
    default_guidance = 3.5
    stage_hook = FluxImageIdsHook
    stage_hook_name = IMAGE_IDS_HOOK

    def latent_channels(self, pipe: Any) -> int:
        return pipe.transformer.config.in_channels // 4

    def pack(self, pipe, latents):
        batch, channels, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width)

    def unpack(self, pipe, latents, latent_height, latent_width):
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(latents, latent_height * factor, latent_width * factor, factor)

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        tokens = (latent_height // 2) * (latent_width // 2)
        return flow_stage_kwargs(scheduler, num_steps, linear_time_shift(scheduler.config, tokens, 1.15))


@hookimpl
def register_adapters(register):
    register(FluxAdapter())
