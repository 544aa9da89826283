"""The pipeline names of the published LSSGen code, as thin loaders of patched stock pipelines.

Code written for the published repository keeps working:

```py
>>> from lssgen.pipelines import LSSFluxPipeline
>>> pipe = LSSFluxPipeline.from_pretrained(MODEL, latent_upsampler=UPSAMPLER, dtype=torch.bfloat16)
>>> image = pipe(prompt, start_sigma=0.75, shorten_intermediate_steps=True, min_resolution=512).images[0]
```

`pipe` is the stock diffusers pipeline (e.g. `FluxPipeline`), patched with [`lssgen.patch`]. The published code's
`torch_dtype=` is still accepted: it is passed on as `dtype=`, the name diffusers now reads.
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
                to load one from (in `dtype`, if given).
            **kwargs: passed to the stock `from_pretrained` (`dtype`, `variant`, components, ...). `torch_dtype`,
                as the published code passes it, is passed on as `dtype`.
        """
        if "torch_dtype" in kwargs:
            if kwargs.get("dtype") is not None:
                raise ValueError(
                    "Got both `dtype` and `torch_dtype`: they are the same argument (diffusers renamed `torch_dtype` "
                    "to `dtype`); pass only `dtype`."
                )
            # Renamed here rather than by diffusers, whose rename prints a FutureWarning the user did not cause.
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        stock_class = getattr(diffusers, cls.stock_class_name)
        pipe = stock_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if isinstance(latent_upsampler, (str, os.PathLike)):
            latent_upsampler = LatentUpsampler.from_pretrained(latent_upsampler, dtype=kwargs.get("dtype"))
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
