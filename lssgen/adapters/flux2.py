"""FLUX.2 (`Flux2Pipeline`, `Flux2KleinPipeline`, and `Flux2KleinInpaintPipeline`): 2x2-patchified,
BatchNorm-normalised, token-packed latents, 4-D position ids (t, h, w, l), and a time shift from the token count
*and* the step count.

The two pipelines share the latent format: the VAE gives 32 channels at 1/8 of the image; the pipeline folds 2x2
cells into 128 channels at 1/16 (`_patchify_latents`), normalises those with the VAE's BatchNorm running statistics
and packs them row-major into tokens. lssgen's unpacked layout is the 32-channel grid at 1/8 (still BN-normalised),
so stage sizes follow the image exactly as for FLUX.1; packing and unpacking are pure permutations, so i.i.d.
re-noising in the unpacked layout is i.i.d. in the packed one too.

diffusers 0.42.1 has no FLUX.2 img2img class: `Flux2KleinInpaintPipeline` with a mask that repaints every pixel is
one. It appends the input image's target-size latents as reference tokens (kept in every stage, like `image=`
references), and after every step blends `(1 - mask) * noised image + mask * latents`, with a mask of one value per
token; `lssgen.inpainting` keeps that blend at every stage's size.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline
from PIL import Image

from ..hookspecs import hookimpl
from .base import Adapter, InpaintLayout, flow_stage_kwargs

IMAGE_IDS_HOOK = "lssgen_flux2_image_ids"
# Instance attributes, not hooks: see `Flux2Adapter.install_hooks`.
_PREPARE_LATENTS = "prepare_latents"


def _signature_without_self(method) -> inspect.Signature:
    """A stock method's signature without `self`, to read its arguments whether passed by position or keyword."""
    return inspect.Signature(list(inspect.signature(method).parameters.values())[1:])


_PREPARE_SIGNATURE = _signature_without_self(Flux2Pipeline.prepare_latents)
# Flux2KleinInpaintPipeline scales an input image above this many pixels down to it before taking its size.
_INPAINT_MAX_PIXELS = 1024 * 1024


def _latent_ids(batch: int, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ids `Flux2Pipeline._prepare_latent_ids` gives a `rows` x `cols` token grid, `(batch, rows * cols, 4)`
    with (t, h, w, l) = (0, row, col, 0), row-major; made on `device` directly (a few aranges, no host copy)."""
    zero = torch.zeros(1, device=device, dtype=dtype)
    rows_, cols_ = torch.arange(rows, device=device, dtype=dtype), torch.arange(cols, device=device, dtype=dtype)
    return torch.cartesian_prod(zero, rows_, cols_, zero).unsqueeze(0).expand(batch, -1, -1)


class Flux2ImageIdsHook(ModelHook):
    """Gives the transformer the position ids of the stage being denoised.

    The pipelines build the latent ids once, for the target size, before the loop; during a low-resolution stage
    they must describe the smaller token grid instead. With reference images (`image=`), their tokens follow the
    latents in `hidden_states` and their ids follow the latent ids in `img_ids`; those are kept as they are.
    """

    def __init__(self, current_stage: Callable):
        super().__init__()
        self.current_stage = current_stage

    def pre_forward(self, module, *args, **kwargs):
        stage = self.current_stage()
        img_ids, hidden_states = kwargs.get("img_ids"), kwargs.get("hidden_states")
        if stage is None or img_ids is None or hidden_states is None:
            return args, kwargs
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        # Whatever `hidden_states` holds beyond this stage's tokens is reference-image tokens, whose ids are the
        # same number of trailing ids.
        references = hidden_states.shape[1] - rows * cols
        batched = img_ids.ndim == 3
        ids = img_ids if batched else img_ids[None]
        # Built afresh each call (a few small aranges) rather than cached: under torch.compile a cache would become
        # guarded state and cost extra recompilations; this way each stage size compiles once.
        stage_ids = _latent_ids(ids.shape[0], rows, cols, ids.device, ids.dtype)
        new_ids = torch.cat([stage_ids, ids[:, ids.shape[1] - references :]], dim=1) if references else stage_ids
        kwargs["img_ids"] = new_ids if batched else new_ids[0]
        return args, kwargs


def _prepare_latents_for_stages(pipe, *args, **kwargs):
    """`prepare_latents` of a patched FLUX.2 pipe.

    The stock method takes `latents` as a 4-D `(B, 128, h, w)` grid and derives the latent ids from its shape; the
    pipeline then uses those ids for every transformer call and to unpack the final tokens. lssgen passes the first
    stage's noise, already packed; the ids must still describe the target size (`height`/`width`), since the last
    stage denoises at that size and the pipeline unpacks with them. The ids hook swaps in each low-resolution
    stage's ids. Outside an lssgen call this is the stock method, untouched.
    """
    stock = functools.partial(type(pipe).prepare_latents, pipe)
    bound = _PREPARE_SIGNATURE.bind(*args, **kwargs).arguments
    latents = bound.get("latents")
    # Packed (3-D) latents are lssgen's first stage, of whatever size (the stock method refuses them); a first
    # stage at the target size (a bottleneck plan) reads no low-resolution stage, so that cannot tell.
    if latents is None or latents.ndim != 3:
        return stock(*args, **kwargs)
    batch, device = bound["batch_size"], bound["device"]
    if latents.shape[0] != batch:
        raise ValueError(f"lssgen drew first-stage noise for {latents.shape[0]} images, the pipeline wants {batch}.")
    # The stock rounding of the size to whole 2x2 patches of the x8 latent.
    rows = int(bound["height"]) // (pipe.vae_scale_factor * 2)
    cols = int(bound["width"]) // (pipe.vae_scale_factor * 2)
    return latents.to(device=device, dtype=bound["dtype"]), _latent_ids(batch, rows, cols, device, torch.int64)


class Flux2Adapter(Adapter):
    name = "flux2"
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline")
    # Flux2Pipeline has none: its Mistral text encoder is not the inpainting pipeline's.
    image_to_image_pipelines = {"Flux2KleinPipeline": "Flux2KleinInpaintPipeline"}
    inpainting_pipelines = {"Flux2KleinPipeline": "Flux2KleinInpaintPipeline"}
    # Its `prepare_latents` takes latents patchified 2x2 and gives (latents, noise, packed image latents, image
    # latents, ids); `prepare_mask_latents` the mask alone, one value per token.
    inpaint_layouts = {"Flux2KleinInpaintPipeline": InpaintLayout(mask=None, latents_patch=2)}
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # 2x2 patches
    # The method's published settings cover FLUX.1, not FLUX.2: FLUX.1's are used (50 steps, shortened stages);
    # 4.0 is both pipelines' own default guidance.
    shorten_intermediate_steps = True
    default_steps = 50
    default_guidance = 4.0
    base_size = 1024
    stage_hook = Flux2ImageIdsHook
    stage_hook_name = IMAGE_IDS_HOOK
    # The learned upsampler and bicubic interpolation work on the VAE's own 32-channel latent, before the
    # pipeline's patchify + BatchNorm: upsampler weights then do not depend on a checkpoint's BN statistics (the
    # space the taef2 tiny autoencoder encodes too), and the normalised grid is not spatially uniform (each cell of
    # a 2x2 patch has its own statistics), which bicubic interpolation across cells would mix up.
    scale_in_vae_space = True
    # Trained here on that raw latent (weights/flux2-x2); `patch` checks the pipe's VAE has its 32 channels.
    default_upsampler = "flux2-x2"

    def latent_channels(self, pipe: Any) -> int:
        return pipe.transformer.config.in_channels // 4

    # Packing ----------------------------------------------------------------------------------------------------
    def pack(self, pipe, latents):
        """`(B, 32, h, w)` → tokens `(B, h/2 * w/2, 128)`, the pipeline's own patchify and packing."""
        # Contiguous, like what the scheduler's step returns: `_pack_latents` ends in a permute, and a stage's first
        # transformer call with other strides than the rest would cost torch.compile an extra graph per stage.
        return pipe._pack_latents(pipe._patchify_latents(latents)).contiguous()

    def unpack(self, pipe, latents, latent_height, latent_width):
        """Tokens `(B, h/2 * w/2, 128)` → `(B, 32, h, w)`: the tokens are row-major (the pipeline's ids say so), so
        a reshape undoes `_pack_latents` without scattering by ids."""
        batch, _, channels = latents.shape
        grid = latents.reshape(batch, latent_height // 2, latent_width // 2, channels).permute(0, 3, 1, 2)
        return pipe._unpatchify_latents(grid)

    # Schedule ---------------------------------------------------------------------------------------------------
    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        # FLUX.2's empirical shift depends on the token count and the step count; the stage's own full step count
        # n_k is what the stock pipeline would pass for a stock call of that size and length. There is no
        # `max_image_seq_len` cap: the rule has its own linear branch above 4300 tokens.
        tokens = (latent_height // 2) * (latent_width // 2)
        return flow_stage_kwargs(scheduler, num_steps, compute_empirical_mu(tokens, num_steps))

    # Image-to-image (Flux2KleinInpaintPipeline) ----------------------------------------------------------------
    def image_to_image_size(self, pipe, call):
        """Flux2KleinInpaintPipeline generates at its input image's size, whatever `height`/`width` say: the image's
        size, scaled down to 1024² pixels if larger, rounded down to whole 16-pixel patches."""
        if not isinstance(pipe, Flux2KleinInpaintPipeline):
            return None
        image = call["image"]
        multiple = pipe.vae_scale_factor * 2
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == pipe.latent_channels * 4:
            return image.shape[2] * multiple, image.shape[3] * multiple  # latents
        height, width = pipe._get_raw_image_size(image[0] if isinstance(image, list) else image)
        if height * width > _INPAINT_MAX_PIXELS:
            scale = math.sqrt(_INPAINT_MAX_PIXELS / (height * width))
            height, width = int(height * scale), int(width * scale)
        return height // multiple * multiple, width // multiple * multiple

    def image_to_image_arguments(self, pipe, image):
        if not isinstance(pipe, Flux2KleinInpaintPipeline):
            return {}
        return {"mask_image": Image.new("L", image.size, 255)}  # white: repaint every pixel

    # Hooks ------------------------------------------------------------------------------------------------------
    def install_hooks(self, pipe, current_stage):
        super().install_hooks(pipe, current_stage)
        # `prepare_latents` is a plain method, not a module, so no ModelHook can reach it; an instance attribute
        # shadows the class's method for this pipe only and `remove_hooks` deletes it again. Partials (not
        # closures) so that deep copies of the pipe get copies bound to themselves.
        if not isinstance(pipe, Flux2KleinInpaintPipeline):  # whose preparation lssgen.inpainting stands in for
            pipe.__dict__[_PREPARE_LATENTS] = functools.partial(_prepare_latents_for_stages, pipe)

    def remove_hooks(self, pipe):
        super().remove_hooks(pipe)
        pipe.__dict__.pop(_PREPARE_LATENTS, None)

    # VAE normalisation ------------------------------------------------------------------------------------------
    def _bn_stats(self, pipe, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(
            bn.running_var.view(1, -1, 1, 1).to(like.device, torch.float32) + pipe.vae.config.batch_norm_eps
        )
        return mean, std

    def latents_to_vae(self, pipe, latents):
        """Unpacked pipeline latents `(B, 32, h, w)` → the VAE's latent (what `vae.decode` takes), float32."""
        patches = pipe._patchify_latents(latents.float())
        mean, std = self._bn_stats(pipe, patches)
        return pipe._unpatchify_latents(patches * std + mean)

    def vae_to_latents(self, pipe, vae_latents):
        """The VAE's latent (what `vae.encode` gives) → unpacked pipeline latents `(B, 32, h, w)`, float32."""
        patches = pipe._patchify_latents(vae_latents.float())
        mean, std = self._bn_stats(pipe, patches)
        return pipe._unpatchify_latents((patches - mean) / std)


@hookimpl
def register_adapters(register):
    register(Flux2Adapter())
