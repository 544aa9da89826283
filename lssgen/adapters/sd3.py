"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): unpacked latents patchified 2x2 by the transformer."""

from __future__ import annotations

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from ..controlnets import controlnets_of
from ..hookspecs import hookimpl
from ..latents import LatentNormalization
from .base import Adapter, Architecture, InpaintLayout, dummy_tensors, linear_time_shift

# SD3.5-large's transformer `config.json`, as constructor arguments.
SD35_LARGE_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}


# SD3-medium's and SD3.5's scheduler (a static shift) and VAE normalisation, so plans match the real models'.
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with SD3's config."""
    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)


class SD3Adapter(Adapter):
    r"""
    Adapter for [`~diffusers.StableDiffusion3Pipeline`] (SD3 and SD3.5).

    Each stage gets the schedule `StableDiffusion3Pipeline` itself sets for that stage's step count: the
    scheduler's default n-step schedule (the stock pipeline passes no `sigmas`), with the scheduler's static
    `shift`, or, for a dynamically shifting scheduler, the `mu` of the stage's own patch count. The transformer
    crops its patch position embedding to the shape of the latent it is given, so no conditioning needs replacing
    per stage.

    Example:

    ```py
    >>> import lssgen
    >>> from diffusers import StableDiffusion3Pipeline

    >>> pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", num_inference_steps=40, guidance_scale=4.5).images[0]
    ```
    """

    name = "sd3"
    pipeline_classes = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
        "StableDiffusion3ControlNetPipeline",
    )
    # Its `prepare_latents` gives (latents, noise, image latents) for a 16-channel transformer; `prepare_mask_latents`
    # (mask, masked image latents), each doubled for classifier-free guidance.
    inpaint_layouts = {"StableDiffusion3InpaintPipeline": InpaintLayout()}
    image_to_image_pipelines = {"StableDiffusion3Pipeline": "StableDiffusion3Img2ImgPipeline"}
    inpainting_pipelines = {"StableDiffusion3Pipeline": "StableDiffusion3InpaintPipeline"}
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # the transformer patchifies 2x2 (transformer.config.patch_size)
    shorten_intermediate_steps = True
    default_steps = 40
    default_guidance = 4.5
    # 333 text tokens: 77 CLIP + 256 T5 (the pipeline's default max_sequence_length); CFG doubles the batch.
    architectures = (
        Architecture(
            name="SD3.5-large",
            model_class="SD3Transformer2DModel",
            config=SD35_LARGE_CONFIG,
            text_tokens=333,
            cfg_factor=2,
            scheduler=sd3_scheduler,
        ),
    )

    def latent_channels(self, pipe):
        return pipe.transformer.config.out_channels  # an inpainting transformer takes 33 channels in, gives 16 out

    def denoiser_reads_mask(self, pipe):
        # SD3 inpainting transformers take the latents, the mask and the masked image's latents (16 + 1 + 16).
        return pipe.transformer.config.in_channels == 33

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        # As StableDiffusion3Pipeline: no custom sigmas (unlike FLUX.1, whose pipeline passes a linspace; that
        # would change SD3's timesteps and, after truncation, its step counts), and a `mu` (max_shift defaulting
        # to 1.16) only for a dynamically shifting scheduler, here of the stage's own 2x2 patch count.
        kwargs: dict[str, Any] = {"num_inference_steps": num_steps}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = linear_time_shift(scheduler.config, (latent_height // 2) * (latent_width // 2), 1.16)
        return kwargs

    # ControlNet: StableDiffusion3ControlNetPipeline's `prepare_image` preprocesses (a tensor is taken as it is),
    # repeats and doubles (CFG) the control image; the pipeline then encodes it with the VAE (a sample from the global
    # random state: it passes no generator) and normalises it, without the shift for controlnets that zero the pooled
    # projection (InstantX's). The controlnets patchify the condition themselves: nothing to pack, nothing to hook.
    control_image_method = "prepare_image"
    control_image_argument = "control_image"
    control_tensor_sets_size = True

    def stage_control_image(self, pipe, prepare, arguments, stage, run):
        prepared = super().stage_control_image(pipe, prepare, arguments, stage, run)
        config = pipe.vae.config
        shift = 0.0 if controlnets_of(pipe)[0].config.force_zeros_for_pooled_projection else config.shift_factor
        return (pipe.vae.encode(prepared).latent_dist.sample() - shift) * config.scaling_factor

    def install_hooks(self, pipe, current_stage):
        # Nothing to hook: the patch position embedding is cropped to the latent's shape.
        self.check_patch_size(pipe)

    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        # StableDiffusion3Pipeline decodes `latents / scaling_factor + shift_factor`, whatever else the config holds.
        return LatentNormalization.shifted_and_scaled(pipe.vae.config)

    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        config = model.config
        zeros, timestep = dummy_tensors(model, batch)
        return {
            "hidden_states": zeros(batch, config.in_channels, latent_height, latent_width),
            "encoder_hidden_states": zeros(batch, text_tokens, config.joint_attention_dim),
            "pooled_projections": zeros(batch, config.pooled_projection_dim),
            "timestep": timestep,
        }


@hookimpl
def register_adapters(register):
    register(SD3Adapter())
