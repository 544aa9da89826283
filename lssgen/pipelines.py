"""The pipeline names of the published LSSGen code, as thin loaders of patched stock pipelines.

Code written for the published repository keeps working:

```py
>>> from lssgen.pipelines import LSSFluxPipeline
>>> pipe = LSSFluxPipeline.from_pretrained(MODEL, latent_upsampler=UPSAMPLER, torch_dtype=torch.bfloat16)
>>> image = pipe(prompt, start_sigma=0.75, shorten_intermediate_steps=True, min_resolution=512).images[0]
```

`pipe` is the stock diffusers pipeline (e.g. `FluxPipeline`), patched with [`lssgen.patch`].
"""

from __future__ import annotations

import os
from typing import Any

import diffusers

from .patch import patch
from .upsampler import LatentUpsampler


class _PatchedLoader:
    stock_class_name = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is a loader: use `{type(self).__name__}.from_pretrained(path, "
            f"latent_upsampler=...)`, or build a `diffusers.{self.stock_class_name}` and call `lssgen.patch` on it."
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, latent_upsampler: Any = None, **kwargs: Any
    ) -> Any:
        r"""
        Load the stock pipeline with `diffusers.<Pipeline>.from_pretrained(path, **kwargs)` and patch it.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a pipeline folder or hub id.
            latent_upsampler (`LatentUpsampler`, `str` or `os.PathLike`, *optional*): the upsampler, or a folder
                to load one from (in `torch_dtype`, if given).
            **kwargs: passed to the stock `from_pretrained` (`torch_dtype`, `variant`, components, ...).
        """
        stock_class = getattr(diffusers, cls.stock_class_name)
        pipe = stock_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if isinstance(latent_upsampler, (str, os.PathLike)):
            dtype = kwargs.get("torch_dtype")
            latent_upsampler = LatentUpsampler.from_pretrained(latent_upsampler, torch_dtype=dtype)
        return patch(pipe, latent_upsampler)


def _loader(name: str, stock_class_name: str) -> type:
    doc = f"Loads a `diffusers.{stock_class_name}` patched with lssgen (the published name `{name}`)."
    return type(name, (_PatchedLoader,), {"stock_class_name": stock_class_name, "__doc__": doc})


LSSFluxPipeline = _loader("LSSFluxPipeline", "FluxPipeline")
LSSStableDiffusion3Pipeline = _loader("LSSStableDiffusion3Pipeline", "StableDiffusion3Pipeline")
LSSStableDiffusionXLPipeline = _loader("LSSStableDiffusionXLPipeline", "StableDiffusionXLPipeline")
LSSStableDiffusionPipeline = _loader("LSSStableDiffusionPipeline", "StableDiffusionPipeline")
LSSCogView4Pipeline = _loader("LSSCogView4Pipeline", "CogView4Pipeline")

__all__ = [
    "LSSCogView4Pipeline",
    "LSSFluxPipeline",
    "LSSStableDiffusion3Pipeline",
    "LSSStableDiffusionPipeline",
    "LSSStableDiffusionXLPipeline",
]
