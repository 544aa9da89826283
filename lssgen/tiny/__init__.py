"""Small random-weight stock pipelines, built locally (no download), for the demo, tests and benchmarks.

The weights are random: images are noise. What they show is the machinery (shapes, schedules, timings).
"""

from .flux import FLUX_SCHEDULER_CONFIG, build_tiny_flux_pipeline, build_tiny_vae
from .text import build_tiny_clip, build_tiny_t5, character_tokenizer

__all__ = [
    "FLUX_SCHEDULER_CONFIG",
    "build_tiny_clip",
    "build_tiny_flux_pipeline",
    "build_tiny_t5",
    "build_tiny_vae",
    "character_tokenizer",
]
