"""The scene world and what is built on it: procedural GenEval-style scenes (`world`), a judge for them (`scorer`)
and the small text-to-image model trained on them (`model`, whose denoiser is `denoiser`).

A tool above the runtime core: it imports `lssgen`, never the other way round.
"""

from .world import (
    CATEGORIES,
    COLOURS,
    EVALUATION_PER_CATEGORY,
    EVALUATION_SEED,
    SHAPES,
    Check,
    InstanceTally,
    Scene,
    SceneObject,
    caption_for,
    evaluation_scenes,
    parse_caption,
    render,
    sample_hard_scene,
    sample_scene,
    satisfies,
    tally_instances,
    wrong_check,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "EVALUATION_PER_CATEGORY",
    "EVALUATION_SEED",
    "SHAPES",
    "Check",
    "InstanceTally",
    "Scene",
    "SceneObject",
    "caption_for",
    "evaluation_scenes",
    "parse_caption",
    "render",
    "sample_hard_scene",
    "sample_scene",
    "satisfies",
    "tally_instances",
    "wrong_check",
]
