"""Loading what the commands run: a diffusers pipeline and a latent upsampler, with clear errors."""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: str) -> torch.dtype:
    """float32 on the CPU, bfloat16 on an accelerator."""
    return torch.float32 if device.startswith("cpu") else torch.bfloat16


def load_pipeline(model: str, device: str, dtype: torch.dtype) -> Any:
    """A diffusers pipeline from a folder or hub id, on `device`; a `ValueError` that says what to pass if not."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load a diffusers pipeline from --model {model!r}: {str(error).rstrip('.')}. Give a pipeline "
            "folder (with model_index.json) or a hub id."
        ) from None
    return pipe.to(device)


def load_upsampler(path: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A `LatentUpsampler` folder, on `device`; a `ValueError` naming the folder if it cannot be read."""
    from .upsampler import LatentUpsampler

    try:
        upsampler = LatentUpsampler.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(f"--upsampler {path}: cannot load a LatentUpsampler: {error}") from None
    return upsampler.to(device)
