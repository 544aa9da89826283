"""Chroma (`ChromaPipeline`): FLUX.1's latent layout, position ids and schedule rule, plus an attention mask built
from the latents the pipeline is handed, which must follow the stage."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..hookspecs import hookimpl
from .base import Architecture, InpaintLayout
from .flux import FLUX_DEV_CONFIG, FLUX_SCHEDULER_CONFIG, FluxAdapter, FluxImageIdsHook, packed_dummy_inputs

STAGE_HOOK = "lssgen_chroma_stage"

# Chroma1-HD's transformer `config.json`, as constructor arguments: FLUX.1-dev's blocks (19 double- and 38
# single-stream), without pooled text or guidance embeddings, the per-block modulation replaced by one small
# "approximator" network of the timestep.
CHROMA1_HD_CONFIG = {
    **{k: v for k, v in FLUX_DEV_CONFIG.items() if k not in ("pooled_projection_dim", "guidance_embeds")},
    "approximator_num_channels": 64,
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
}


# Chroma1-HD's scheduler (`scheduler/scheduler_config.json`): FLUX.1's, but a static shift of 3 (no dynamic shifting),
# so plans and shifts match the real model's.
CHROMA_SCHEDULER_CONFIG = {**FLUX_SCHEDULER_CONFIG, "use_dynamic_shifting": False}


def chroma_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with Chroma1-HD's config."""
    return FlowMatchEulerDiscreteScheduler(**CHROMA_SCHEDULER_CONFIG)


class ChromaStageHook(FluxImageIdsHook):
    """FLUX.1's position ids for the stage being denoised, and an attention mask as long as the tokens it is given.

    ChromaPipeline extends the prompt's mask with ones for `latents.shape[1]` image tokens, once, before the loop,
    from the latents it is handed: under lssgen those are the first stage's, so every later stage, the target-size
    one included (where `current_stage()` is None), would get a mask of the first stage's length. The image part is
    therefore rebuilt from the tokens of each call, whatever the stage; a mask of the right length is left alone.
    """

    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        mask = kwargs.get("attention_mask")
        hidden_states, text = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        if mask is None or hidden_states is None or text is None:
            return args, kwargs
        text_tokens, image_tokens = text.shape[1], hidden_states.shape[1]
        if mask.shape[1] != text_tokens + image_tokens:
            # As the pipeline builds it: the prompt's mask, then ones (in the mask's dtype) over the image tokens.
            ones = mask.new_ones(mask.shape[0], image_tokens)
            kwargs["attention_mask"] = torch.cat([mask[:, :text_tokens], ones], dim=1)
        return args, kwargs


class ChromaAdapter(FluxAdapter):
    r"""
    Adapter for [`~diffusers.ChromaPipeline`] (Chroma1-HD, Chroma1-Base and the Chroma checkpoints).

    Chroma keeps FLUX.1's 2x2-packed latents, position ids and FLUX.1 VAE, and its pipeline sets the same
    schedule (`sigmas = linspace(1, 1/n, n)`, a `mu` from the image token count for a dynamically shifting
    scheduler; Chroma1-HD's own scheduler shifts statically, by 3, at every size), so FLUX.1's adapter does
    almost everything. What differs:

    - the pipeline builds the transformer's attention mask (text mask, then ones over the image tokens) from the
      latents it is handed; a hook (`"lssgen_chroma_stage"`, with the position ids) gives each call a mask of the
      tokens it really has, in every stage;
    - it passes its sigmas to a scheduler with `use_flow_sigmas` too (FluxPipeline drops them);
    - real classifier-free guidance, two transformer calls per step (`guidance_scale` > 1), and no pooled text
      embedding or guidance embedding, which only changes what the FLOP count feeds the transformer.

    Published settings: 40 steps, guidance 3 (diffusers' Chroma example and the Chroma1-HD demo), shortening on
    as for FLUX.1, native size 1024 px.

    Example:

    ```py
    >>> import lssgen
    >>> import torch
    >>> from diffusers import ChromaPipeline

    >>> pipe = ChromaPipeline.from_pretrained("lodestones/Chroma1-HD", dtype=torch.bfloat16)
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", num_inference_steps=40, guidance_scale=3.0).images[0]
    ```
    """

    name = "chroma"
    pipeline_classes = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    # As FluxInpaintPipeline's (FLUX.1's packing).
    inpaint_layouts = {"ChromaInpaintPipeline": InpaintLayout()}
    image_to_image_pipelines = {"ChromaPipeline": "ChromaImg2ImgPipeline"}
    inpainting_pipelines = {"ChromaPipeline": "ChromaInpaintPipeline"}
    default_steps = 40
    default_guidance = 3.0
    stage_hook = ChromaStageHook
    stage_hook_name = STAGE_HOOK
    sigmas_for_flow_sigmas = True
    # 512 text tokens: the pipeline's T5 `max_sequence_length` default (padding is masked, not dropped, so it is
    # computed); real CFG, two calls per step.
    architectures = (
        Architecture(
            name="Chroma1-HD",
            model_class="ChromaTransformer2DModel",
            config=CHROMA1_HD_CONFIG,
            text_tokens=512,
            cfg_factor=2,
            scheduler=chroma_scheduler,
        ),
    )

    def prepare_call(self, pipe, call, plan):
        super().prepare_call(pipe, call, plan)
        if type(pipe).__name__ == "ChromaInpaintPipeline" and "guidance_embeds" not in pipe.transformer.config:
            raise ValueError(
                "ChromaInpaintPipeline reads `transformer.config.guidance_embeds`, which ChromaTransformer2DModel "
                "does not keep (Chroma has no guidance embedding), so the stock pipeline fails on it too: set it "
                "first with `pipe.transformer.register_to_config(guidance_embeds=False)`."
            )

    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        kwargs = packed_dummy_inputs(model, latent_height, latent_width, text_tokens, batch)
        tokens = text_tokens + kwargs["hidden_states"].shape[1]
        kwargs["attention_mask"] = kwargs["hidden_states"].new_ones(batch, tokens)
        return kwargs


@hookimpl
def register_adapters(register):
    register(ChromaAdapter())
