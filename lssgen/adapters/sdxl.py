"""SDXL and Playground v2.5 (`StableDiffusionXLPipeline`): a diffusion UNet conditioned on image size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from diffusers.hooks import ModelHook

from ..hookspecs import hookimpl
from .base import Adapter, Architecture, InpaintLayout
from .sd import unet_dummy_inputs

TIME_IDS_HOOK = "lssgen_sdxl_time_ids"
# StableDiffusionXLPipeline's `add_time_ids` row: original (h, w), crop (top, left), target (h, w).
_ORIGINAL_SIZE, _TARGET_SIZE, _TIME_IDS_LENGTH = slice(0, 2), slice(4, 6), 6

# SDXL's UNet `config.json`, as constructor arguments.
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled text) + 6 time ids x 256
}


# SDXL 1.0 base's scheduler config, so plans match the real model's.
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """A fresh scheduler with SDXL's config."""
    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


class SDXLTimeIdsHook(ModelHook):
    """Gives the UNet the size conditioning of the stage being denoised.

    StableDiffusionXLPipeline builds `add_time_ids` once, for the target size, before the loop; during a stage
    the original and target size are that stage's pixel size instead (for the negative rows too). The crop
    coordinates are kept.
    """

    def __init__(self, current_stage: Callable):
        super().__init__()
        self.current_stage = current_stage

    def pre_forward(self, module, *args, **kwargs):
        stage = self.current_stage()
        added = kwargs.get("added_cond_kwargs")
        if stage is None or not added or added.get("time_ids") is None:
            return args, kwargs
        time_ids = added["time_ids"]
        if time_ids.shape[-1] != _TIME_IDS_LENGTH:
            raise ValueError(
                f"lssgen's SDXL adapter expects `time_ids` of {_TIME_IDS_LENGTH} numbers (original size, crop, "
                f"target size), got {time_ids.shape[-1]}. Pipelines conditioned on an aesthetic score are not "
                "supported; pass `start_sigma=1.0` to run the stock pipeline."
            )
        # A copy: the pipeline reuses its tensor for every step and would keep a low-resolution size otherwise.
        time_ids = time_ids.clone()
        size = torch.tensor([stage.height, stage.width], device=time_ids.device, dtype=time_ids.dtype)
        time_ids[:, _ORIGINAL_SIZE] = size
        time_ids[:, _TARGET_SIZE] = size
        kwargs["added_cond_kwargs"] = {**added, "time_ids": time_ids}
        return args, kwargs


class SDXLAdapter(Adapter):
    r"""
    Adapter for [`~diffusers.StableDiffusionXLPipeline`]: SDXL, and Playground v2.5 (the same pipeline class, with
    a VAE normalised by per-channel `latents_mean`/`latents_std` and an EDM DPM-Solver scheduler).

    Each stage runs the scheduler's own n-step schedule, later stages truncated by the img2img rule and re-noised
    with the stage scheduler's `add_noise`. The UNet's size conditioning (`add_time_ids`) follows the stage: a
    hook on the UNet sets its original and target size to the stage's size; `lssgen.unpatch` removes it.

    Published settings: 50 steps, guidance 5, no shortening, native size 1024 px.

    Example:

    ```py
    >>> import lssgen
    >>> from diffusers import StableDiffusionXLPipeline

    >>> pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", height=2048, width=2048, min_resolution=1024).images[0]
    ```
    """

    name = "sdxl"
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLControlNetPipeline",
    )
    image_to_image_pipelines = {"StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline"}
    inpainting_pipelines = {"StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline"}
    # As StableDiffusionInpaintPipeline's.
    inpaint_layouts = {"StableDiffusionXLInpaintPipeline": InpaintLayout()}
    denoiser = "unet"
    flow = False
    latent_multiple = 1
    shorten_intermediate_steps = False
    base_size = 1024
    default_steps = 50
    default_guidance = 5.0
    stage_hook = SDXLTimeIdsHook
    stage_hook_name = TIME_IDS_HOOK
    # StableDiffusionXLControlNetPipeline's `prepare_image` resizes, repeats and doubles (CFG) the control image; its
    # controlnets take the UNet's time ids too, so the time-ids hook goes on them as well.
    control_image_method = "prepare_image"
    # 77 CLIP text tokens; CFG doubles the batch.
    architectures = (
        Architecture(
            name="SDXL",
            model_class="UNet2DConditionModel",
            config=SDXL_UNET_CONFIG,
            text_tokens=77,
            cfg_factor=2,
            scheduler=sdxl_scheduler,
        ),
    )

    def prepare_call(self, pipe, call, plan):
        # The img2img and inpainting pipelines take their size from the latents they are given, which lssgen gives
        # at the first stage's size: the size conditioning of the target stage is set as the stock call would have
        # set it from target-size latents (a size the user passes is kept; the stages' sizes come from the hook).
        if isinstance(pipe, (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)):
            for name in ("original_size", "target_size"):
                if call.get(name) is None:
                    call[name] = (plan.height, plan.width)

    def latent_channels(self, pipe):
        return pipe.unet.config.out_channels  # an inpainting U-Net takes 9 channels in, gives the latent's 4 out

    def denoiser_reads_mask(self, pipe):
        # Inpainting U-Nets (stable-diffusion-xl-1.0-inpainting) take the latents, the mask and the masked image.
        return pipe.unet.config.in_channels == 9

    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        return unet_dummy_inputs(model, latent_height, latent_width, text_tokens, batch)


@hookimpl
def register_adapters(register):
    register(SDXLAdapter())
