"""Z-Image (`ZImagePipeline`): unpacked 16-channel latents that the transformer patchifies 2x2 itself, given as a
list of per-image `(C, 1, h, w)` tensors; rotary positions made inside the transformer from each latent's shape;
FLUX.1's linear time shift from the token count (not capped); FLUX.1's VAE (scaling and shift factor)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image_controlnet import ZImageControlNetPipeline, retrieve_latents

from ..hookspecs import hookimpl
from ..latents import LatentNormalization
from .base import Adapter, Architecture, dummy_tensors, flow_stage_kwargs, linear_time_shift

# Tongyi-MAI/Z-Image-Turbo's transformer, as constructor arguments: ZImageTransformer2DModel's defaults, which
# diffusers took from that checkpoint (a 6B single-stream DiT of 30 blocks, width 3840, with 2 noise- and 2
# caption-refiner blocks, Qwen3-4B text features of 2560 channels).
Z_IMAGE_TURBO_CONFIG = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}

# An instance attribute, not a hook: see `ZImageAdapter.install_hooks`.
_PREPARE_LATENTS = "prepare_latents"
_PREPARE_SIGNATURE = inspect.Signature(list(inspect.signature(ZImagePipeline.prepare_latents).parameters.values())[1:])


# Tongyi-MAI/Z-Image-Turbo's `scheduler/scheduler_config.json`: a static shift of 3 (no dynamic shifting, so the
# pipeline's `mu` is ignored).
ZIMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def zimage_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with Z-Image-Turbo's config."""
    return FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG)


def _prepare_latents_for_stages(pipe, current_stage, *args, **kwargs):
    """`prepare_latents` of a patched Z-Image pipe.

    The stock method refuses `latents` of any shape but the target size's; lssgen passes the first stage's noise,
    smaller. During an lssgen call that noise is taken as it is (moved to the device, as the stock method does);
    outside one this is the stock method, untouched.
    """
    stock = functools.partial(type(pipe).prepare_latents, pipe)
    bound = _PREPARE_SIGNATURE.bind(*args, **kwargs).arguments
    latents = bound.get("latents")
    if current_stage() is None or latents is None:
        return stock(*args, **kwargs)
    if latents.shape[0] != bound["batch_size"]:
        raise ValueError(
            f"lssgen drew first-stage noise for {latents.shape[0]} images, the pipeline wants {bound['batch_size']}."
        )
    return latents.to(bound["device"])


class ZImageAdapter(Adapter):
    r"""
    Adapter for [`~diffusers.ZImagePipeline`] (Z-Image-Turbo, Z-Image and their LoRAs).

    The loop carries unpacked `(B, 16, h, w)` latents (the transformer patchifies them 2x2 and builds the image's
    3-D rotary positions, after the caption's, from each latent's own shape), so packing is the identity and no
    conditioning needs replacing per stage. What needs care:

    - `prepare_latents` refuses latents of another size than the target's: during an lssgen call a per-instance
      replacement takes the first stage's noise as it is;
    - the pipeline passes `sigmas = linspace(1, 1/n, n)` and FLUX.1's linear `mu` of the token count, not capped
      at `max_image_seq_len` (Z-Image-Turbo's scheduler does not shift dynamically: its static `shift` applies);
    - the transformer is given `1 - sigma` as its timestep and predicts the negated velocity; the pipeline negates
      it back before the scheduler's step, so re-noising follows the scheduler's sigmas as for FLUX.1;
    - the VAE is FLUX.1's: the pipeline decodes `latents / scaling_factor + shift_factor`;
    - classifier-free guidance (`guidance_scale` > 0) is one transformer call over a list of 2B latents.

    Published settings (diffusers' ZImagePipeline example, for Tongyi-MAI/Z-Image-Turbo): 8 steps,
    `guidance_scale=0.0` (guidance-distilled: no CFG), 1024x1024.

    Example:

    ```py
    >>> import lssgen
    >>> import torch
    >>> from diffusers import ZImagePipeline

    >>> pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", dtype=torch.bfloat16)
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", num_inference_steps=8, guidance_scale=0.0).images[0]
    ```
    """

    name = "zimage"
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageControlNetPipeline")
    image_to_image_pipelines = {"ZImagePipeline": "ZImageImg2ImgPipeline"}
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # the transformer's 2x2 patches (the pipeline's default `patch_size`)
    shorten_intermediate_steps = True
    # Z-Image-Turbo's 8 function evaluations: its model card says `num_inference_steps=9` ("results in 8 DiT
    # forwards", with the schedule of the diffusers of its release, whose last step was a no-op at sigma 0);
    # diffusers 0.42.1's ZImagePipeline sets sigmas linspace(1, 1/n, n), n forwards, and its docstring example
    # passes num_inference_steps=8, guidance_scale=0.0, 1024x1024.
    default_steps = 8
    default_guidance = 0.0
    base_size = 1024
    # 128 text tokens: an assumed prompt length (the pipeline keeps only the prompt's own tokens, at most
    # `max_sequence_length` = 512; the transformer pads the caption to a multiple of 32). Z-Image-Turbo runs
    # without CFG: one call per step.
    architectures = (
        Architecture(
            name="Z-Image-Turbo",
            model_class="ZImageTransformer2DModel",
            config=Z_IMAGE_TURBO_CONFIG,
            text_tokens=128,
            cfg_factor=1,
            scheduler=zimage_scheduler,
        ),
    )

    def check_patch_size(self, pipe: Any) -> None:
        # The pipeline calls the transformer with its default `patch_size=2`, which the checkpoint must have.
        if self.latent_multiple not in pipe.transformer.config.all_patch_size:
            raise ValueError(
                f"lssgen's {self.name} adapter expects a transformer with {self.latent_multiple}x"
                f"{self.latent_multiple} patches; this one has all_patch_size={pipe.transformer.config.all_patch_size}."
            )

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return 1024, 1024  # ZImagePipeline's own default height and width

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        return torch.float32  # the pipeline prepares and steps its latents in float32

    def batch_size(self, call: dict[str, Any]) -> int:
        # ZImagePipeline's `prompt_embeds` is a list of per-prompt `(tokens, features)` tensors.
        embeds = call.get("prompt_embeds")
        if call.get("prompt") is None and isinstance(embeds, (list, tuple)) and embeds:
            return len(embeds)
        return super().batch_size(call)

    def denoiser_latents(self, pipe, latent, stage):
        if isinstance(latent, (list, tuple)):  # the pipeline's list of `(C, 1, h, w)` latents
            latent = torch.stack([x[:, 0] for x in latent])
        return super().denoiser_latents(pipe, latent, stage)

    # Schedule ---------------------------------------------------------------------------------------------------
    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        # ZImagePipeline's `mu`: FLUX.1's `calculate_shift` (max_shift defaulting to 1.15) of the stage's token
        # count, not capped; its linspace sigmas go to any scheduler that takes sigmas.
        tokens = (latent_height // 2) * (latent_width // 2)
        mu = linear_time_shift(scheduler.config, tokens, 1.15, capped=False)
        return flow_stage_kwargs(scheduler, num_steps, mu, sigmas_for_flow_sigmas=True)

    # Hooks ------------------------------------------------------------------------------------------------------
    def install_hooks(self, pipe, current_stage):
        # Nothing to hook on the transformer: positions come from each latent's shape. `prepare_latents` is a
        # plain method: an instance attribute shadows it for this pipe only (a partial, so deep copies of the pipe
        # get one bound to themselves), and `remove_hooks` deletes it.
        self.check_patch_size(pipe)
        super().install_hooks(pipe, current_stage)
        # ZImageImg2ImgPipeline's `prepare_latents` takes given latents as they are: it needs no stand-in.
        if isinstance(pipe, (ZImagePipeline, ZImageControlNetPipeline)):
            pipe.__dict__[_PREPARE_LATENTS] = functools.partial(_prepare_latents_for_stages, pipe, current_stage)

    def remove_hooks(self, pipe):
        super().remove_hooks(pipe)
        pipe.__dict__.pop(_PREPARE_LATENTS, None)

    # ControlNet: ZImageControlNetPipeline's `prepare_image` preprocesses (a tensor is taken as it is, and the call
    # generates at its size) and repeats the control image; the pipeline then encodes it with the VAE (its mode),
    # normalises it as its latents, adds the frame axis and pads the channels with zeros up to the controlnet's
    # `control_in_dim`, and doubles it for classifier-free guidance call by call. It has no control window (no
    # `control_guidance_start/end`) and one controlnet, which takes the condition by position (`control_context`) and
    # makes its positions from the latents' shapes: nothing to hook but the condition.
    control_image_method = "prepare_image"
    control_image_argument = "control_image"
    control_condition_argument = "control_context"
    control_tensor_sets_size = True

    def stage_control_image(self, pipe, prepare, arguments, stage, run):
        prepared = super().stage_control_image(pipe, prepare, arguments, stage, run)
        config = pipe.vae.config
        latents = retrieve_latents(pipe.vae.encode(prepared), sample_mode="argmax")
        latents = ((latents - config.shift_factor) * config.scaling_factor)[:, :, None]
        padding = pipe.controlnet.config.control_in_dim - latents.shape[1]
        if padding > 0:  # a controlnet that takes more channels than the latents have (Z-Image's version 2.0)
            latents = torch.cat([latents, latents.new_zeros(latents.shape[0], padding, *latents.shape[2:])], dim=1)
        return latents

    def fit_control_condition(self, stock, condition):
        # The pipeline repeats its condition for the batch of a call with classifier-free guidance.
        return condition.repeat(stock.shape[0] // condition.shape[0], 1, 1, 1, 1)

    # VAE normalisation ------------------------------------------------------------------------------------------
    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        # ZImagePipeline decodes `latents / scaling_factor + shift_factor`.
        return LatentNormalization.shifted_and_scaled(pipe.vae.config)

    # FLOP counts ------------------------------------------------------------------------------------------------
    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        config = model.config
        zeros, timestep = dummy_tensors(model, batch)
        return {
            "x": [zeros(config.in_channels, 1, latent_height, latent_width) for _ in range(batch)],
            "t": timestep,
            "cap_feats": [zeros(text_tokens, config.cap_feat_dim) for _ in range(batch)],
        }


@hookimpl
def register_adapters(register):
    register(ZImageAdapter())
