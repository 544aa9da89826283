r"""
FLUX.2's tiny autoencoder (taef2) as a diffusers VAE component of a `Flux2Pipeline` / `Flux2KleinPipeline` folder.

What the FLUX.2 pipelines read from their `vae` (diffusers 0.42.1, `pipeline_flux2_klein.py`):
`config.block_out_channels` (its length gives the x8 `vae_scale_factor`), `bn.running_mean`, `bn.running_var` and
`config.batch_norm_eps` (the latent normalisation over 2x2 patches), `encode(images)` (read by `retrieve_latents`
through `.latents`), `decode(latents, return_dict=False)[0]` with images in [-1, 1], `dtype` and the device of
its parameters. [`TinyFlux2Autoencoder`] has exactly those, around the taef2 encoder and decoder of
`lssgen.autoencoders.taesd`; a pipeline folder records it in `model_index.json` as
`["lssgen.autoencoders.flux2", "TinyFlux2Autoencoder"]`, which diffusers loads once `lssgen` is imported.

taef2's weights are not ours to redistribute in lssgen's repository, so a model built from them
(`from_taesd_folder`) saves only its config and BatchNorm statistics, and loading it reads the weights from a
taef2 folder again (`find_taef2`: `taef2=`, then `$LSSGEN_TAEF2`, then `../shared/data/taef2`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKLFlux2, ConfigMixin, Flux2Pipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from safetensors.torch import load_file, save_file

from lssgen.console import declare_drop_in

from .taesd import WIDTH, TinyAutoencoder, build_decoder, build_encoder, is_tiny_autoencoder_folder

TAEF2_ENV = "LSSGEN_TAEF2"
STATISTICS_FILE = "latent_statistics.safetensors"

# ModelMixin and ConfigMixin stay importable from this module on purpose: diffusers' loader finds the load method of
# a component from a non-diffusers library by looking these base classes up in the component's module.
__all__ = ["ConfigMixin", "ModelMixin", "TinyFlux2Autoencoder", "find_taef2"]


class TinyFlux2Autoencoder(ModelMixin, ConfigMixin):
    r"""
    taef2 with FLUX.2's latent normalisation: a drop-in `vae` for the FLUX.2 pipelines.

    Args:
        latent_channels (`int`, defaults to `32`): channels of the latent (32 for FLUX.2).
        encoder_extra_branch_at (`list[int]`), decoder_extra_branch_at (`list[int]`): layers with taef2's extra
            1x1 branch (see `lssgen.autoencoders.taesd`).
        batch_norm_eps (`float`, defaults to `1e-4`): as `AutoencoderKLFlux2`'s.
        block_out_channels (`list[int]`): only its length matters (4: the pipelines' x8 `vae_scale_factor`).
        weights_from_taef2_folder (`bool`, defaults to `False`): the encoder and decoder are taef2's: saving writes
            only the config and `bn`, loading reads them from a taef2 folder (`from_taesd_folder` sets it).

    `bn` holds one running mean and variance per channel of the 2x2-patchified latent (128 for FLUX.2); the
    pipelines divide by them, so set them to the statistics of the latents a model is trained on.

    Example:

    ```py
    >>> vae = TinyFlux2Autoencoder.from_taesd_folder("data/taef2")
    >>> latents = vae.encode(images).latents  # images in [-1, 1]; (B, 32, H/8, W/8)
    >>> images = vae.decode(latents, return_dict=False)[0]
    ```
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 32,
        encoder_extra_branch_at: list[int] = (11, 12, 13),
        decoder_extra_branch_at: list[int] = (2, 3, 4),
        batch_norm_eps: float = 1e-4,
        block_out_channels: list[int] = (WIDTH,) * 4,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        weights_from_taef2_folder: bool = False,
    ):
        super().__init__()
        self.encoder = build_encoder(latent_channels, set(encoder_extra_branch_at))
        self.decoder = build_decoder(latent_channels, set(decoder_extra_branch_at))
        self.bn = nn.BatchNorm2d(4 * latent_channels, eps=batch_norm_eps, affine=False, track_running_stats=True)

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        latents = self.encoder((images + 1) / 2)  # taef2 takes images in [0, 1]
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True, **kwargs):
        images = self.decoder(latents) * 2 - 1
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images).latents).sample

    @classmethod
    def from_taesd_folder(cls, folder: str | Path, **config) -> TinyFlux2Autoencoder:
        """taef2 from the original `taef2_encoder.pth` / `taef2_decoder.pth` in `folder`, BN statistics at 0 / 1
        (or `config`'s, e.g. a saved model's)."""
        tiny = TinyAutoencoder.from_folder(folder)
        extra = [sorted(i for i, layer in enumerate(part) if getattr(layer, "pool", None) is not None)
                 for part in (tiny.encoder, tiny.decoder)]  # fmt: skip
        config = {**config, "latent_channels": tiny.config.latent_channels, "weights_from_taef2_folder": True}
        model = cls(**{**config, "encoder_extra_branch_at": extra[0], "decoder_extra_branch_at": extra[1]})
        model.encoder.load_state_dict(tiny.encoder.state_dict())
        model.decoder.load_state_dict(tiny.decoder.state_dict())
        return model.eval().requires_grad_(False)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        if not self.config.weights_from_taef2_folder:
            return super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        save_file({"running_mean": self.bn.running_mean.float(), "running_var": self.bn.running_var.float()},
                  folder / STATISTICS_FILE)  # fmt: skip

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, taef2: str | Path | None = None,
                        **kwargs) -> TinyFlux2Autoencoder:  # fmt: skip
        r"""
        Load a saved model. One that names taef2 (`weights_from_taef2_folder`) takes the encoder and decoder
        from the taef2 folder `taef2` or `find_taef2`'s; any other goes through diffusers' `from_pretrained`.
        """
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if not (folder / STATISTICS_FILE).is_file():
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        config = {k: v for k, v in cls.load_config(folder).items() if not k.startswith("_")}
        model = cls.from_taesd_folder(find_taef2(taef2), **config)
        statistics = load_file(folder / STATISTICS_FILE)
        model.bn.running_mean.copy_(statistics["running_mean"])
        model.bn.running_var.copy_(statistics["running_var"])
        # `dtype` from a user; `torch_dtype` from diffusers' pipeline loader, which still passes that name to
        # components that are not transformers models.
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if not isinstance(dtype, torch.dtype) or dtype == model.dtype:
            return model
        # torch's own cast: ModelMixin.to warns on every dtype cast that some modules "should be kept in float32",
        # listing none (diffusers 0.42 tests `[] is not None`); this model has none to keep.
        return nn.Module.to(model, dtype)

    @torch.no_grad()
    def set_latent_statistics(self, latents: torch.Tensor) -> None:
        """Set `bn` to the per-channel mean and variance of 2x2-patchified `latents` `(B, C, h, w)`: what the
        pipelines then normalise by (unit-scale latents for a transformer trained on latents like these)."""
        patches = Flux2Pipeline._patchify_latents(latents.float())
        self.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        self.bn.running_var.copy_(patches.var(dim=(0, 2, 3)))


# The FLUX.2 pipelines annotate their `vae` as `AutoencoderKLFlux2`; this model reads and writes the same latents
# through the same attributes (see the module's docstring) without being one: a subclass would inherit tiling,
# slicing, a KL posterior and QKV fusion it cannot honour.
declare_drop_in(TinyFlux2Autoencoder, stands_for=AutoencoderKLFlux2)


def find_taef2(folder: str | Path | None = None) -> Path:
    r"""
    The taef2 folder (`taef2_encoder.pth`, `taef2_decoder.pth`) to load taef2's weights from: `folder` if given,
    else `$LSSGEN_TAEF2`, else `../shared/data/taef2` from the working directory or from lssgen's checkout.
    Raises a `FileNotFoundError` that says where it looked and how to point it at one.
    """
    if folder is not None:
        candidates = [Path(folder)]
    else:
        checkout = Path(__file__).resolve().parents[2]  # lssgen/autoencoders/flux2.py -> the checkout
        candidates = [Path(p) for p in (os.environ.get(TAEF2_ENV),) if p]
        candidates += [Path("../shared/data/taef2"), checkout.parent / "shared" / "data" / "taef2"]
    for candidate in candidates:
        if is_tiny_autoencoder_folder(candidate):
            return candidate
    raise FileNotFoundError(
        "This VAE is taef2 (github.com/madebyollin/taesd, MIT), whose weights lssgen does not redistribute, and no "
        f"taef2 folder was found (looked in: {', '.join(str(c) for c in candidates)}). Put taef2_encoder.pth and "
        f"taef2_decoder.pth in a folder and set {TAEF2_ENV} to it (or pass taef2=FOLDER)."
    )
