"""Small random-weight stock pipelines, built locally (no download), for the demo, tests and benchmarks.

The weights are random: images are noise. What they show is the machinery (shapes, schedules, timings).
"""

from .chroma import build_tiny_chroma_pipeline
from .cogview4 import build_tiny_cogview4_pipeline
from .flux import FLUX_SCHEDULER_CONFIG, build_tiny_flux_pipeline, build_tiny_vae
from .flux2 import build_tiny_flux2_pipeline, tiny_flux2_prompt_embeds
from .qwenimage import build_tiny_qwenimage_pipeline, tiny_qwenimage_prompt_embeds
from .sd import build_tiny_sd_pipeline
from .sd3 import build_tiny_sd3_pipeline
from .sdxl import build_tiny_sdxl_pipeline
from .text import build_tiny_clip, build_tiny_t5, character_tokenizer
from .wan import build_tiny_wan_pipeline
from .zimage import build_tiny_zimage_pipeline, tiny_zimage_prompt_embeds

__all__ = [
    "FLUX_SCHEDULER_CONFIG",
    "build_tiny_chroma_pipeline",
    "build_tiny_clip",
    "build_tiny_cogview4_pipeline",
    "build_tiny_flux2_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_qwenimage_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_t5",
    "build_tiny_vae",
    "build_tiny_wan_pipeline",
    "build_tiny_zimage_pipeline",
    "character_tokenizer",
    "tiny_flux2_prompt_embeds",
    "tiny_qwenimage_prompt_embeds",
    "tiny_zimage_prompt_embeds",
]
