"""A tiny random-weight stock `PixArtSigmaPipeline` for the plugin tests (no download), and how to call it.

Imported by tests/test_plugin.py and, by path, by the script that test runs in a throw-away virtualenv.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

from lssgen.tiny.flux import build_tiny_vae
from lssgen.tiny.text import build_tiny_t5, character_tokenizer, eval_mode

TEXT_DIM = 32
TEXT_TOKENS = 32
# PixArt-Sigma's schedule: DPM-Solver++ (2M) over linear betas, predicting noise.
PIXART_SCHEDULER_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
}


def build_tiny_pixart_sigma_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """A stock PixArtSigmaPipeline whose transformer has `sample_size` 32, so it generates 256 px by default and
    bins sizes with the stock 256 px aspect-ratio table."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,  # learned sigma, as the released models: the pipeline keeps the first half
        cross_attention_dim=16,
        caption_channels=TEXT_DIM,
        use_additional_conditions=False,  # PixArtSigmaPipeline passes no resolution conditioning
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=character_tokenizer(TEXT_TOKENS),
        text_encoder=build_tiny_t5(TEXT_DIM),
        vae=build_tiny_vae(4),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return eval_mode(pipe)


def pixart_call_kwargs(prompts: str | list[str] = "a red fox in the snow", seed: int = 0, **overrides) -> dict:
    kwargs = {
        "prompt": prompts,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "max_sequence_length": TEXT_TOKENS,
        "clean_caption": False,  # cleaning needs bs4 and ftfy, and would only warn without them
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


def record_denoiser_calls(pipe) -> tuple[list[tuple[tuple[int, int], float]], torch.utils.hooks.RemovableHandle]:
    """Record the latent size and timestep of every transformer call; remove the returned handle to stop."""
    calls = []

    def record(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        calls.append((tuple(hidden_states.shape[-2:]), float(kwargs["timestep"][0])))

    return calls, pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)


def planned_calls(plan) -> list[tuple[tuple[int, int], float]]:
    """The (latent size, timestep) of every transformer call a plan asks for (CFG runs as one batched call)."""
    return [((stage.latent_height, stage.latent_width), t) for stage in plan.stages for t in stage.timesteps]
