"""Qwen-Image (`QwenImagePipeline`): FLUX.1's 2x2 packing of 16-channel latents, a centred rotary embedding of the
shapes in `img_shapes`, an uncapped linear time shift from the image token count, and a video VAE (latents with a
frame axis) normalised per channel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import ModelHook

from ..hookspecs import hookimpl
from ..latents import LatentNormalization
from .base import Adapter, Architecture, InpaintLayout, flow_stage_kwargs, linear_time_shift
from .flux import FluxAdapter, packed_dummy_inputs

IMG_SHAPES_HOOK = "lssgen_qwenimage_img_shapes"

# Qwen/Qwen-Image's transformer `config.json`, as constructor arguments: a 20B MMDiT of 60 double-stream blocks
# (the hub file also lists `pooled_projection_dim`, which the diffusers class does not take).
QWEN_IMAGE_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


# Qwen/Qwen-Image's `scheduler/scheduler_config.json`: an exponential time shift from the image token count (its own
# range, 256..8192 tokens, 0.5..0.9), and the schedule stretched to end at sigma 0.02 before the final 0.
QWENIMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def qwenimage_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with Qwen-Image's config."""
    return FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER_CONFIG)


class QwenImageShapesHook(ModelHook):
    """Gives the transformer the `img_shapes` of the stage being denoised.

    QwenImagePipeline builds `img_shapes` (frames, rows, columns of the token grid, per prompt) once, for the target
    size, before the loop. The transformer derives the image's rotary embedding from them (centred on the grid) and
    where the text's positions start (after the grid's larger half side), so during a low-resolution stage they must
    describe the smaller grid. Shapes after a sample's first (reference images, in the edit pipelines) are kept.
    """

    def __init__(self, current_stage: Callable):
        super().__init__()
        self.current_stage = current_stage

    def pre_forward(self, module, *args, **kwargs):
        stage = self.current_stage()
        img_shapes = kwargs.get("img_shapes")
        if stage is None or img_shapes is None:
            return args, kwargs
        # Plain ints, rebuilt each call: under torch.compile each stage size is one guard, one graph.
        shape = (1, stage.latent_height // 2, stage.latent_width // 2)
        kwargs["img_shapes"] = [[shape, *sample[1:]] if isinstance(sample, list) else shape for sample in img_shapes]
        return args, kwargs


class QwenImageAdapter(FluxAdapter):
    r"""
    Adapter for [`~diffusers.QwenImagePipeline`] (Qwen-Image, Qwen-Image-2512 and their LoRAs).

    Qwen-Image packs its 16-channel latents 2x2 into 64-channel tokens with FLUX.1's code, and its pipeline sets
    FLUX.1's kind of schedule (`sigmas = linspace(1, 1/n, n)` and a linear `mu` from the image token count), so
    FLUX.1's adapter does the packing. What differs:

    - positions come from `img_shapes`, not position ids; a hook (`"lssgen_qwenimage_img_shapes"`) gives each
      low-resolution stage's calls the stage's token grid. The text mask is text-only (the attention processor
      appends the image's ones from the tokens it is given), so it needs nothing;
    - `mu` is not capped at the scheduler's `max_image_seq_len` (8192 tokens for Qwen-Image): the pipeline
      extrapolates past it, and each stage gets what the stock pipeline sets at its size. The scheduler stretches
      every schedule to end at `shift_terminal` (0.02), which makes a 1-step schedule NaN, in the stock pipeline
      too: a plan whose stage would get 1 step is refused with an error;
    - the VAE is a video VAE: it decodes `(B, 16, frames, h, w)`, and the pipeline de-normalises with per-channel
      `latents_mean`/`latents_std`; `latents_to_vae` gives exactly that (one frame);
    - true classifier-free guidance, two transformer calls per step, when `true_cfg_scale` > 1 and a negative
      prompt is given (`guidance_scale` is only for guidance-distilled checkpoints).

    Published settings (the Qwen/Qwen-Image model card's example): 50 steps, `true_cfg_scale=4.0` with the negative
    prompt `" "`, 1328x1328 for 1:1, the native size and so the reference for shortening (on, as for the other flow
    models). `default_guidance` is that `true_cfg_scale`.

    Example:

    ```py
    >>> import lssgen
    >>> import torch
    >>> from diffusers import QwenImagePipeline

    >>> pipe = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype=torch.bfloat16)
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", negative_prompt=" ", true_cfg_scale=4.0, height=1024, width=1024).images[0]
    ```
    """

    name = "qwenimage"
    pipeline_classes = (
        "QwenImagePipeline",
        "QwenImageImg2ImgPipeline",
        "QwenImageInpaintPipeline",
        "QwenImageControlNetPipeline",
    )
    # Its `prepare_latents` gives (latents, noise, image latents), packed as FLUX.1's from `(B, 1, C, h, w)`, but only
    # when it draws the noise itself: given latents, it returns them alone.
    inpaint_layouts = {"QwenImageInpaintPipeline": InpaintLayout(draws_noise=True)}
    image_to_image_pipelines = {"QwenImagePipeline": "QwenImageImg2ImgPipeline"}
    inpainting_pipelines = {"QwenImagePipeline": "QwenImageInpaintPipeline"}
    # https://huggingface.co/Qwen/Qwen-Image (model card, "Quick Start"): num_inference_steps=50, true_cfg_scale=4.0,
    # negative_prompt=" ", aspect_ratios["1:1"] = (1328, 1328).
    default_steps = 50
    default_guidance = 4.0
    guidance_argument = "true_cfg_scale"  # `guidance_scale` is only for guidance-distilled checkpoints
    base_size = 1328
    stage_hook = QwenImageShapesHook
    stage_hook_name = IMG_SHAPES_HOOK
    # ControlNet (QwenImageControlNetPipeline) as FLUX.1's (`prepare_image`, a tensor taken at its own size, the
    # `img_shapes` hook on the controlnet too), with the video VAE's encoding (see `stage_control_image`). Its
    # multi-controlnet holds one (union) controlnet, run once per control image: the control hook on the multi-model
    # gives each call its own image's condition. QwenImageControlNetInpaintPipeline is not served.
    # The pipeline passes its linspace sigmas to any scheduler, one with `use_flow_sigmas` included.
    sigmas_for_flow_sigmas = True
    # 128 text tokens: an assumed prompt length. The pipeline does not pad (the embedding is as long as the prompt,
    # at most `max_sequence_length` = 512 tokens), so there is no fixed default; at 1024² the text is 3% of the
    # sequence. True CFG: two calls per step (counted at the prompt's length both times).
    architectures = (
        Architecture(
            name="Qwen-Image",
            model_class="QwenImageTransformer2DModel",
            config=QWEN_IMAGE_CONFIG,
            text_tokens=128,
            cfg_factor=2,
            scheduler=qwenimage_scheduler,
        ),
    )

    def latent_channels(self, pipe: Any) -> int:
        # Its `out_channels` counts the unpacked channels (16), not the packed ones FLUX.1's does.
        return pipe.transformer.config.in_channels // 4

    def unpack(self, pipe, latents, latent_height, latent_width):
        # The pipeline's `_unpack_latents` gives the VAE's `(B, C, 1, h, w)`: the frame axis goes.
        return super().unpack(pipe, latents, latent_height, latent_width)[:, :, 0]

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        # QwenImagePipeline's `mu`: FLUX.1's formula (its own `calculate_shift`, max_shift defaulting to 1.15) of the
        # stage's token count, extrapolated past `max_image_seq_len` rather than capped.
        tokens = (latent_height // 2) * (latent_width // 2)
        mu = linear_time_shift(scheduler.config, tokens, 1.15, capped=False)
        return flow_stage_kwargs(scheduler, num_steps, mu, sigmas_for_flow_sigmas=self.sigmas_for_flow_sigmas)

    # VAE normalisation ------------------------------------------------------------------------------------------
    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        # QwenImagePipeline decodes `latents / (1 / latents_std) + latents_mean`, whatever else the config holds.
        config = pipe.vae.config
        return LatentNormalization(tuple(config.latents_mean), tuple(config.latents_std), 1.0)

    def latents_to_vae(self, pipe, latents):
        """Unpacked pipeline latents `(B, 16, h, w)` → what `vae.decode` takes: `(B, 16, 1, h, w)`, one frame."""
        return super().latents_to_vae(pipe, latents)[:, :, None]

    def vae_to_latents(self, pipe, vae_latents):
        """What `vae.encode` gives, `(B, 16, 1, h, w)` (or a frame-less `(B, 16, h, w)`) → unpacked pipeline
        latents `(B, 16, h, w)`."""
        if vae_latents.ndim == 5:
            vae_latents = vae_latents[:, :, 0]
        return super().vae_to_latents(pipe, vae_latents)

    def encode_pixels(self, pipe, pixels):
        # Qwen-Image's VAE is a video VAE: an image is one frame, `(B, 3, 1, H, W)`.
        return super().encode_pixels(pipe, pixels[:, :, None])

    # FLOP counts ------------------------------------------------------------------------------------------------
    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        kwargs = packed_dummy_inputs(model, latent_height, latent_width, text_tokens, batch)
        del kwargs["img_ids"], kwargs["txt_ids"]  # positions come from the shapes instead
        # No text mask: the pipeline passes none for a prompt without padding (a mask of all ones becomes None).
        kwargs["img_shapes"] = [[(1, latent_height // 2, latent_width // 2)]] * batch
        return kwargs

    def stage_control_image(self, pipe, prepare, arguments, stage, run):
        # The generic preparation at the stage's size (not FLUX.1's, which encodes it FLUX.1's way).
        prepared = Adapter.stage_control_image(self, pipe, prepare, arguments, stage, run)
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet import retrieve_latents

        # Encoded as the pipeline encodes its control image: one frame, sampled with the call's generator, normalised
        # by the VAE's per-channel mean and std, frames before channels, packed 2x2.
        frames = prepared.unsqueeze(2) if prepared.ndim == 4 else prepared
        latents = retrieve_latents(pipe.vae.encode(frames), generator=run.generator)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device)
        latents = ((latents - mean) * inverse_std).permute(0, 2, 1, 3, 4)
        batch, _, channels, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width).to(self.latent_dtype(pipe))


class QwenImageEditAdapter(QwenImageAdapter):
    r"""
    Adapter for [`~diffusers.QwenImageEditPipeline`] (Qwen-Image-Edit: editing with a reference image).

    Qwen-Image's transformer, packing and schedule; what differs is the reference and the default size:

    - the pipeline encodes the reference image once, resized to about 1024² pixels at its aspect ratio, and appends
      its packed latents after the generated image's tokens in every transformer call; `img_shapes` lists the
      generated image's token grid first, then the reference's. The shapes hook rewrites only the first per stage
      (the reference's shape, its rotary embedding and its tokens are the same in every stage), and the loop's
      latents (which lssgen switches per stage) are the generated image's alone;
    - without `height`/`width` the pipeline generates at the reference's aspect ratio at about 1024² pixels
      (`size_from_inputs`): the stages are planned on that size, and the call is given it.
    """

    name = "qwenimage-edit"
    pipeline_classes = ("QwenImageEditPipeline",)
    # An editing pipeline has no image-to-image class (the family's maps its text-to-image class): Hires fix refuses it.
    image_to_image_pipelines = {}
    inpainting_pipelines = {}
    architectures = ()  # the same transformer as Qwen-Image, counted there
    # Which of a list of reference images sets the default size: QwenImageEditPipeline reads the first.
    size_reference = 0

    def size_from_inputs(self, pipe, call):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        image = call.get("image")
        if isinstance(image, list):
            image = image[self.size_reference] if image else None
        size = getattr(image, "size", None)  # a PIL image's (width, height); the pipeline reads nothing else
        if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
            return None  # the stock call raises its own error for such an `image`
        # The stock rule: the reference's aspect ratio at 1024² pixels, in whole multiples of 32.
        width, height = calculate_dimensions(1024 * 1024, size[0] / size[1])[:2]
        return height, width


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    r"""
    Adapter for [`~diffusers.QwenImageEditPlusPipeline`] (Qwen-Image-Edit-2509 and later: several reference images).

    As [`QwenImageEditAdapter`], with one entry of `img_shapes` (and one block of reference tokens) per reference
    image, and the default size taken from the last reference.
    """

    name = "qwenimage-edit-plus"
    pipeline_classes = ("QwenImageEditPlusPipeline",)
    size_reference = -1


@hookimpl
def register_adapters(register):
    register(QwenImageAdapter())
    register(QwenImageEditAdapter())
    register(QwenImageEditPlusAdapter())
