import pytest
import torch

from lssgen.tiny import build_tiny_flux_pipeline


@pytest.fixture
def flux_pipe():
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    """Arguments of a small, seeded call of the tiny Flux pipeline."""
    kwargs = {
        "prompt": prompts,
        "max_sequence_length": 32,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs
