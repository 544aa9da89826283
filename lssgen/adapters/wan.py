"""Wan 2.1 / 2.2 text-to-video (`WanPipeline`): unpacked `(B, 16, frames, h, w)` latents that the transformer
patchifies (1, 2, 2) itself, with rotary positions made from the latent's own shape; the scheduler's fixed
`flow_shift` (no resolution-dependent time shift); Wan 2.2's second expert, `transformer_2`, chosen per step by the
step's timestep; the video VAE's per-channel `latents_mean`/`latents_std`.

Stages scale height and width only: every stage denoises the same number of latent frames."""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.hooks import ModelHook
from diffusers.pipelines.wan.pipeline_wan import WanPipeline

from ..hookspecs import hookimpl
from ..latents import LatentNormalization
from ..shared_hooks import release_hook, share_hook
from .base import Adapter, Architecture, dummy_tensors

# The stock call's defaults (pipeline_wan.py, `WanPipeline.__call__`): 480x832, 81 frames.
_CALL_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(WanPipeline.__call__).parameters.items()
    if parameter.default is not parameter.empty
}

# Wan-AI/Wan2.1-T2V-14B's transformer as constructor arguments: WanTransformer3DModel's defaults, which diffusers
# took from that checkpoint, and the numbers of the Wan 2.1 report (a DiT of 40 blocks, width 5120 = 40 heads of
# 128, FFN 13824, (1, 2, 2) patches, umT5-XXL text features of 4096 channels, a 256-channel sinusoidal timestep).
# Wan2.2-T2V-A14B's two experts (high noise: `transformer`, low noise: `transformer_2`) each have this config.
WAN_14B_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

# The scheduler of the diffusers Wan checkpoints: UniPC on flow-matching sigmas with a fixed shift, 3.0 by default
# (diffusers' Wan docs: `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
# flow_shift=...)`, "the default value is 3.0 for Wan"; its examples use 5.0 for 720P, 3.0 for 480P).
WAN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}


# The power law of Wan 2.1's VAE latent spectrum, as SPEED measured it (DESIGN.md §1b).
WAN21_LATENT_SPECTRUM = (219.484718, 2.422687)


def wan21_scheduler() -> UniPCMultistepScheduler:
    """Wan2.1-T2V-14B's sampling scheduler at 720P: diffusers' WanPipeline example sets `flow_shift=5.0` for
    720P (3.0 for 480P), and Wan2.1's own `generate.py` samples text-to-video with shift 5.0."""
    return UniPCMultistepScheduler(**{**WAN_SCHEDULER_CONFIG, "flow_shift": 5.0})


def wan22_scheduler() -> UniPCMultistepScheduler:
    """Wan2.2-T2V-A14B's sampling scheduler: shift 12.0, the `sample_shift` of Wan2.2's own `t2v_A14B` config
    (`wan/configs/wan_t2v_A14B.py`: shift 12.0, 40 steps, boundary 0.875, guidance 3.0 low / 4.0 high noise)."""
    return UniPCMultistepScheduler(**{**WAN_SCHEDULER_CONFIG, "flow_shift": 12.0})


def latent_frame_count(num_frames: Any, temporal_factor: int) -> int:
    """Latent frames of a `num_frames` call, by WanPipeline's own rule: `num_frames` that is not `k *
    temporal_factor + 1` is rounded down to one that is (at least 1), then compressed by `temporal_factor`."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral):
        raise TypeError(f"`num_frames` must be an int (e.g. 81), got {type(num_frames).__name__} {num_frames!r}.")
    if num_frames % temporal_factor != 1:
        num_frames = num_frames // temporal_factor * temporal_factor + 1
    return (max(num_frames, 1) - 1) // temporal_factor + 1


PER_TOKEN_TIMESTEPS_HOOK = "lssgen_wan_per_token_timesteps"


class PerTokenTimestepsHook(ModelHook):
    """With `expand_timesteps` (Wan2.2 TI2V-5B), WanPipeline gives the transformer one timestep per video token,
    `(mask[0][0][:, ::2, ::2] * t).flatten()`, from a mask of ones it builds once, before the loop, in the shape of
    the first latents: the first stage's, smaller than the later stages'. Every entry of that mask is 1 (text to
    video conditions no frame), so each token's timestep is `t`: where the count does not match the latent's
    tokens, this gives `t` to each of them, which is what the stock pipeline passes at that size. Stateless, and a
    no-op whenever the counts match (always outside lssgen)."""

    def pre_forward(self, module, *args, **kwargs):
        hidden_states, timestep = kwargs.get("hidden_states"), kwargs.get("timestep")
        if hidden_states is None or timestep is None or timestep.ndim != 2:
            return args, kwargs
        p_t, p_h, p_w = module.config.patch_size
        frames, height, width = hidden_states.shape[2:]
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        if timestep.shape[1] != tokens:
            kwargs["timestep"] = timestep[:, :1].expand(timestep.shape[0], tokens)
        return args, kwargs


class WanAdapter(Adapter):
    r"""
    Adapter for [`~diffusers.WanPipeline`] (Wan 2.1 and Wan 2.2 text-to-video, and their LoRAs).

    The loop carries unpacked `(B, 16, frames, h, w)` latents in float32, and `prepare_latents` takes given
    latents of any shape as they are: the first stage's noise goes in through `latents`, packing is the identity,
    and stages keep the frame count while halving height and width. The transformer makes its 3-D rotary positions
    from the latent's shape, so no conditioning needs replacing per stage. What needs care:

    - the pipeline calls `scheduler.set_timesteps(num_inference_steps)` and nothing else: every stage gets that
      schedule for its own step count, with the scheduler's fixed `flow_shift` (no size-dependent shift);
    - Wan 2.2 picks `transformer` (high noise) for a step whose timestep is `>= boundary_ratio *
      num_train_timesteps`, else `transformer_2` (with `guidance_scale_2`). Each stage's timesteps are those of its
      own schedule, so the expert switches at the same noise level in every stage (with `start_sigma` 0.75 and
      Wan2.2-A14B's boundary 0.875 the later stages are all low-noise, `transformer_2` only);
    - the video VAE compresses 4x in time and 8x in space (`vae_scale_factor_spatial`; the pipeline has no
      `vae_scale_factor`), and the pipeline decodes `latents / (1 / latents_std) + latents_mean`;
    - the learned and interpolating upsamplers scale each frame (frames folded into the batch); the pixel round
      trip decodes the clip, resizes every frame and encodes the clip again;
    - classifier-free guidance (`guidance_scale` > 1) is two transformer calls per step;
    - with `expand_timesteps` (Wan2.2 TI2V-5B) the pipeline sizes its per-token timesteps once, at the first
      stage's size: a hook (`PerTokenTimestepsHook`) gives every token of a later stage the step's timestep.

    Published settings: Wan2.1-T2V-14B 50 steps, guidance 5.0 (diffusers' example; `flow_shift` 5.0 at 720P, 3.0 at
    480P); Wan2.2-T2V-A14B 40 steps, guidance 4.0 / `guidance_scale_2` 3.0, `boundary_ratio` 0.875. A stage needs
    an exact half of the target, so a side must be a multiple of 32 px for one low-resolution stage: 832x480 works,
    1280x720 is generated at 1280x704 (with a warning).

    Example:

    ```py
    >>> import lssgen
    >>> import torch
    >>> from diffusers import WanPipeline

    >>> pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-14B-Diffusers", dtype=torch.bfloat16)
    >>> lssgen.patch(pipe)  # min_resolution defaults to 240 for Wan: 832x480 runs one stage at 416x240 first
    >>> video = pipe("a lighthouse at dusk", height=480, width=832, num_frames=81, guidance_scale=5.0).frames[0]
    ```
    """

    name = "wan"
    pipeline_classes = ("WanPipeline",)
    denoiser = "transformer"
    flow = True
    per_prompt_argument = "num_videos_per_prompt"
    latent_multiple = 2  # the transformer's (1, 2, 2) patches: height and width in pairs of latent cells
    shorten_intermediate_steps = True  # as for the other flow-matching families
    # Wan2.1-T2V-14B: diffusers' WanPipeline (`num_inference_steps=50`, its docstring example's
    # `guidance_scale=5.0`) and its modular Wan blocks (modular_pipelines/wan/denoise.py: a CFG guider of 5.0).
    # Wan2.2-T2V-A14B's 40 steps are in its `Architecture`; its guidance 4.0 / `guidance_scale_2` 3.0 and boundary
    # 0.875 are the defaults of diffusers' modular Wan 2.2 blocks (same file: `guider` 4.0, `guider_2` 3.0,
    # `boundary_ratio` 0.875).
    default_steps = 50
    default_guidance = 5.0
    # The native size the step count is published for, the reference for shortening: the pipeline's default
    # 832x480 (480P, which every Wan T2V model generates; the 14B models also do 720P: pass base_height=720,
    # base_width=1280 there).
    base_height = _CALL_DEFAULTS["height"]
    base_width = _CALL_DEFAULTS["width"]
    base_size = base_height
    # Half of 480P's short side: one low-resolution stage at 416x240 for 832x480 (and 640x352 for 1280x704); the
    # image models' 512 would be larger than the short side of both published sizes.
    min_resolution = 240
    # 81 frames (the pipeline's default and the model cards'), 21 latent frames: the clip FLOP counts are made for.
    flop_latent_frames = latent_frame_count(_CALL_DEFAULTS["num_frames"], 4)
    # 512 text tokens: the pipeline pads every prompt to `max_sequence_length` = 512. CFG: two calls per step.
    architectures = (
        Architecture(
            name="Wan2.1-T2V-14B",
            model_class="WanTransformer3DModel",
            config=WAN_14B_CONFIG,
            text_tokens=512,
            cfg_factor=2,
            scheduler=wan21_scheduler,
            sizes=((480, 832), (720, 1280)),
        ),
        # Two experts of the same architecture, one per step: a step costs what a Wan2.1-14B step costs, but
        # Wan2.2's published step count is 40.
        Architecture(
            name="Wan2.2-T2V-A14B",
            model_class="WanTransformer3DModel",
            config=WAN_14B_CONFIG,
            text_tokens=512,
            cfg_factor=2,
            scheduler=wan22_scheduler,
            sizes=((480, 832), (720, 1280)),
            default_steps=40,  # `sample_steps` of Wan2.2's `t2v_A14B` config
        ),
    )

    def _transformer(self, pipe: Any) -> Any:
        # Either expert may be left out of a Wan 2.2 pipeline (`_optional_components`); the pipeline reads the
        # config of `transformer`, else `transformer_2`.
        return pipe.transformer if pipe.transformer is not None else pipe.transformer_2

    def denoisers(self, pipe: Any) -> list[Any]:
        return [model for model in (pipe.transformer, pipe.transformer_2) if model is not None]

    def latent_spectrum(self, pipe: Any) -> tuple[float, float] | None:
        # Measured for Wan 2.1's VAE (16 channels; Wan 2.2 A14B uses it too), not for Wan 2.2 TI2V's (48). No pipe:
        # the published 14B models' (the FLOP tables).
        return WAN21_LATENT_SPECTRUM if pipe is None or pipe.vae.config.z_dim == 16 else None

    def latent_channels(self, pipe: Any) -> int:
        return self._transformer(pipe).config.in_channels

    def check_patch_size(self, pipe: Any) -> None:
        patch_size = tuple(self._transformer(pipe).config.patch_size)
        if patch_size[1:] != (self.latent_multiple, self.latent_multiple):
            raise ValueError(
                f"lssgen's {self.name} adapter expects a transformer with (t, {self.latent_multiple}, "
                f"{self.latent_multiple}) patches; this one has patch_size={patch_size}. Register an adapter subclass "
                "with `latent_multiple` set to the spatial patch size."
            )

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        return torch.float32  # the pipeline prepares and steps its latents in float32

    def vae_scale_factor(self, pipe: Any) -> int:
        return pipe.vae_scale_factor_spatial

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return _CALL_DEFAULTS["height"], _CALL_DEFAULTS["width"]

    def latent_shape(self, pipe, batch, latent_height, latent_width, call):
        # The frames `prepare_latents` would make for this call; the stages only ever change h and w.
        frames = latent_frame_count(call["num_frames"], pipe.vae_scale_factor_temporal)
        return (batch, self.latent_channels(pipe), frames, latent_height, latent_width)

    # Hooks ------------------------------------------------------------------------------------------------------
    def install_hooks(self, pipe, current_stage):
        # Rotary positions come from the latent's shape, and `prepare_latents` returns given latents as they are:
        # only per-token timesteps (`expand_timesteps`) need a hook, on each expert.
        self.check_patch_size(pipe)
        super().install_hooks(pipe, current_stage)
        if pipe.config.get("expand_timesteps", False):
            for model in self.denoisers(pipe):
                share_hook(model, PER_TOKEN_TIMESTEPS_HOOK, lambda _: PerTokenTimestepsHook(), pipe, current_stage)

    def remove_hooks(self, pipe):
        super().remove_hooks(pipe)
        for model in self.denoisers(pipe):
            release_hook(model, PER_TOKEN_TIMESTEPS_HOOK, pipe)

    # VAE normalisation ------------------------------------------------------------------------------------------
    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        # WanPipeline decodes `latents / (1 / latents_std) + latents_mean` (no scaling factor).
        config = pipe.vae.config
        return LatentNormalization(tuple(config.latents_mean), tuple(config.latents_std), 1.0)

    # FLOP counts ------------------------------------------------------------------------------------------------
    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        config = model.config
        zeros, timestep = dummy_tensors(model, batch)
        return {
            "hidden_states": zeros(batch, config.in_channels, self.flop_latent_frames, latent_height, latent_width),
            "timestep": timestep,
            "encoder_hidden_states": zeros(batch, text_tokens, config.text_dim),
        }


@hookimpl
def register_adapters(register):
    register(WanAdapter())
