"""FLOP counts of the real denoisers, and the speedup bound they put on an LSSGen plan.

A denoiser is built on the `meta` device (no weights, no memory) from its published config and run once under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention from shapes alone.
The bound speedup of a plan is FLOPs(plain N steps at the target size) / FLOPs(the plan): what a perfectly
compute-bound run could gain, before the (small) cost of upsampling and re-noising between stages.

`python -m lssgen.flops` prints the table for the five built-in families at 1024² and 2048².
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .adapters.cogview4 import CogView4Adapter
from .adapters.flux import FluxAdapter
from .adapters.sd import SDAdapter
from .adapters.sd3 import SD3Adapter
from .adapters.sdxl import SDXLAdapter
from .plan import StagePlan, plan_stages

VAE_SCALE_FACTOR = 8  # pixels per latent cell for all five families

# Published configs of the denoisers (the models' `config.json`), as constructor arguments.
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
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}
COGVIEW4_6B_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 28,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "condition_dim": 256,
    "pos_embed_max_size": 128,
    "sample_size": 128,
    "rope_axes_dim": (256, 256),
}


@dataclass(frozen=True)
class Architecture:
    """A denoiser and the facts of its pipeline that set the cost of a generation."""

    name: str
    model_class: str  # a diffusers model class name
    config: dict
    text_tokens: int  # length of `encoder_hidden_states` in a default call
    cfg_factor: int  # denoiser batch per image: 2 with classifier-free guidance, 1 for guidance-distilled models
    adapter: Callable[[], Any]  # builds the family's adapter (its schedule facts)
    scheduler: Callable[[], Any]  # builds a fresh scheduler with the published config

    @property
    def steps(self) -> int:
        """The family's published step count (its adapter's default)."""
        return self.adapter.default_steps


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny.flux import FLUX_SCHEDULER_CONFIG

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def _sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny.sd3 import SD3_SCHEDULER_CONFIG

    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    from .tiny.sdxl import SDXL_SCHEDULER_CONFIG

    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def _sd_scheduler():
    from diffusers import PNDMScheduler

    from .tiny.sd import SD_SCHEDULER_CONFIG

    return PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)  # the config holds keys PNDM ignores


def _cogview4_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny.cogview4 import COGVIEW4_SCHEDULER_CONFIG

    return FlowMatchEulerDiscreteScheduler(**COGVIEW4_SCHEDULER_CONFIG)


# Text tokens: FLUX.1-dev's T5 `max_sequence_length` default (512); SD3's 77 CLIP + 256 T5 tokens (the
# pipeline's default max_sequence_length); CLIP's 77 for the UNets; CogView4 pads the GLM prompt to a multiple
# of 16, and 128 is a typical prompt's length (its cost is small next to 4096 image tokens at 1024²).
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="FLUX.1-dev",
            model_class="FluxTransformer2DModel",
            config=FLUX_DEV_CONFIG,
            text_tokens=512,
            cfg_factor=1,
            adapter=FluxAdapter,
            scheduler=_flux_scheduler,
        ),
        Architecture(
            name="SD3.5-large",
            model_class="SD3Transformer2DModel",
            config=SD35_LARGE_CONFIG,
            text_tokens=333,
            cfg_factor=2,
            adapter=SD3Adapter,
            scheduler=_sd3_scheduler,
        ),
        Architecture(
            name="SDXL",
            model_class="UNet2DConditionModel",
            config=SDXL_UNET_CONFIG,
            text_tokens=77,
            cfg_factor=2,
            adapter=SDXLAdapter,
            scheduler=_sdxl_scheduler,
        ),
        Architecture(
            name="SD1.5",
            model_class="UNet2DConditionModel",
            config=SD15_UNET_CONFIG,
            text_tokens=77,
            cfg_factor=2,
            adapter=SDAdapter,
            scheduler=_sd_scheduler,
        ),
        Architecture(
            name="CogView4-6B",
            model_class="CogView4Transformer2DModel",
            config=COGVIEW4_6B_CONFIG,
            text_tokens=128,
            cfg_factor=2,
            adapter=CogView4Adapter,
            scheduler=_cogview4_scheduler,
        ),
    )
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` as FlopCounterMode counts them (2 per multiply-add; elementwise ops are not counted).

    Attention runs on SDPA's math backend: on CPU the default fused kernel (`_scaled_dot_product_flash_attention_
    for_cpu`) has no FLOP formula and would count as 0, while the math path is plain matmuls, counted exactly.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def dummy_inputs(model: torch.nn.Module, latent_height: int, latent_width: int, text_tokens: int, batch: int = 1):
    """Keyword arguments of one forward call of `model`, on the model's device, shaped as its pipeline calls it."""
    config, cls = model.config, type(model).__name__
    device = next(model.parameters()).device

    def zeros(*shape):
        return torch.zeros(*shape, device=device)

    timestep = torch.ones(batch, device=device)
    if cls == "FluxTransformer2DModel":
        # FluxPipeline packs 2x2 latent cells into one token of 4x the channels.
        tokens = (latent_height // 2) * (latent_width // 2)
        kwargs = {
            "hidden_states": zeros(batch, tokens, config.in_channels),
            "encoder_hidden_states": zeros(batch, text_tokens, config.joint_attention_dim),
            "pooled_projections": zeros(batch, config.pooled_projection_dim),
            "timestep": timestep,
            "img_ids": zeros(tokens, 3),
            "txt_ids": zeros(text_tokens, 3),
        }
        if config.guidance_embeds:
            kwargs["guidance"] = timestep
        return kwargs
    sample = zeros(batch, config.in_channels, latent_height, latent_width)
    if cls == "SD3Transformer2DModel":
        return {
            "hidden_states": sample,
            "encoder_hidden_states": zeros(batch, text_tokens, config.joint_attention_dim),
            "pooled_projections": zeros(batch, config.pooled_projection_dim),
            "timestep": timestep,
        }
    if cls == "UNet2DConditionModel":
        kwargs = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": zeros(batch, text_tokens, config.cross_attention_dim),
        }
        if config.addition_embed_type == "text_time":
            # SDXL: pooled text embedding plus 6 size/crop ids, each embedded in `addition_time_embed_dim`.
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": zeros(batch, pooled), "time_ids": zeros(batch, 6)}
        return kwargs
    if cls == "CogView4Transformer2DModel":
        size = zeros(batch, 2)
        return {
            "hidden_states": sample,
            "encoder_hidden_states": zeros(batch, text_tokens, config.text_embed_dim),
            "timestep": timestep,
            "original_size": size,
            "target_size": size,
            "crop_coords": size,
        }
    raise ValueError(f"No dummy inputs for {cls}.")


def denoiser_flops(model: torch.nn.Module, latent_height: int, latent_width: int, *, text_tokens: int, batch=1) -> int:
    """FLOPs of one forward call of `model` on a `latent_height` x `latent_width` latent with `text_tokens`
    text tokens. `model` may live on the `meta` device: only shapes are needed."""
    kwargs = dummy_inputs(model, latent_height, latent_width, text_tokens, batch)
    with torch.no_grad():
        return count_flops(lambda: model(**kwargs, return_dict=False))


@functools.cache
def meta_model(name: str) -> torch.nn.Module:
    """The architecture `name` on the `meta` device: its real shapes, no weights."""
    import diffusers

    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        return getattr(diffusers, arch.model_class)(**arch.config).eval()


@functools.cache
def call_flops(name: str, latent_height: int, latent_width: int) -> int:
    """FLOPs of one denoising step of architecture `name` for one image, classifier-free guidance included."""
    arch = ARCHITECTURES[name]
    # Counted at batch 1 and scaled: every op is per-sample, so FLOPs are exactly linear in the batch.
    per_sample = denoiser_flops(meta_model(name), latent_height, latent_width, text_tokens=arch.text_tokens)
    return arch.cfg_factor * per_sample


def plan_flops(arch: str | Architecture, plan: StagePlan, flops: Callable[[int, int], int] | None = None) -> int:
    """FLOPs of a whole plan: each stage's denoiser steps times the per-step FLOPs at its latent size.

    `flops(latent_height, latent_width)` gives the per-step cost; by default the architecture's `call_flops`.
    """
    name = arch if isinstance(arch, str) else arch.name
    if flops is None:
        flops = functools.partial(call_flops, name)
    return sum(stage.num_denoiser_steps * flops(stage.latent_height, stage.latent_width) for stage in plan.stages)


def make_plan(name: str, resolution: int, **settings) -> StagePlan:
    """The LSSGen plan of architecture `name` at `resolution`² with its published steps and native base size;
    `start_sigma=1.0` gives the plain full-resolution plan."""
    arch = ARCHITECTURES[name]
    adapter = arch.adapter()
    return plan_stages(
        resolution,
        resolution,
        arch.steps,
        scheduler=arch.scheduler(),
        facts=adapter,
        vae_scale_factor=VAE_SCALE_FACTOR,
        base_height=adapter.base_size,
        base_width=adapter.base_size,
        **settings,
    )


def bound_speedup(name: str, resolution: int, **settings) -> float:
    """FLOPs of plain generation over FLOPs of the LSSGen plan with `settings`, at `resolution`²."""
    full = plan_flops(name, make_plan(name, resolution, start_sigma=1.0))
    return full / plan_flops(name, make_plan(name, resolution, **settings))


DEFAULT_SETTINGS = tuple(
    {"start_sigma": sigma, "shorten_intermediate_steps": shorten, "min_resolution": min_resolution}
    for sigma, shorten, min_resolution in itertools.product((0.75, 0.667), (True, False), (512, 256))
)


def flop_bound_table(
    resolutions: Iterable[int] = (1024, 2048),
    settings: Iterable[dict] = DEFAULT_SETTINGS,
    architectures: Iterable[str] = tuple(ARCHITECTURES),
) -> str:
    """A markdown table of the bound speedup of each architecture and setting at each square resolution.

    A cell is "-" where the setting gives no low-resolution stage (min_resolution above half the short side).
    """
    resolutions, settings = tuple(resolutions), tuple(settings)
    header = ["model", "steps", "start_sigma", "shorten", "min_res"] + [f"{r}²" for r in resolutions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in architectures:
        for setting in settings:
            cells = []
            for resolution in resolutions:
                if setting["min_resolution"] * 2 > resolution:
                    cells.append("-")
                else:
                    cells.append(f"{bound_speedup(name, resolution, **setting):.2f}x")
            row = [name, str(ARCHITECTURES[name].steps), f"{setting['start_sigma']}"]
            row += ["on" if setting["shorten_intermediate_steps"] else "off", str(setting["min_resolution"])]
            lines.append("| " + " | ".join(row + cells) + " |")
    return "\n".join(lines)


def per_call_table(resolutions: Iterable[int] = (512, 1024, 2048)) -> str:
    """A markdown table of TFLOPs per denoising step (per image, guidance included) at each square size."""
    resolutions = tuple(resolutions)
    header = ["model", "text tokens", "CFG x"] + [f"TFLOPs/step {r}²" for r in resolutions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, arch in ARCHITECTURES.items():
        side = [r // VAE_SCALE_FACTOR for r in resolutions]
        cells = [f"{call_flops(name, s, s) / 1e12:.2f}" for s in side]
        lines.append("| " + " | ".join([name, str(arch.text_tokens), str(arch.cfg_factor)] + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    start = time.perf_counter()
    print(per_call_table())
    print()
    print(flop_bound_table())
    print(f"\n(counted in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
