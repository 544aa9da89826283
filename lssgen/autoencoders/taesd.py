"""Tiny autoencoders in the original `.pth` layout (TAESD, taef1, taef2), usable wherever lssgen takes a VAE.

The original weights are two state dicts of `torch.nn.Sequential` models, one for the encoder and one for the
decoder, with integer-indexed layers. diffusers' `AutoencoderTiny` renumbers them and has no place for the small
extra branch of FLUX.2's tiny autoencoder (taef2), so they are loaded here as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput

WIDTH = 64  # every tiny autoencoder of this family is 64 channels wide
ENCODER_SUFFIX, DECODER_SUFFIX = "encoder.pth", "decoder.pth"


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    """Soft clamp of the decoder's input latents to about [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """Three 3x3 convolutions with a residual connection; optionally the extra 1x1 branch of taef2 (`pool`),
    added to the input first."""

    def __init__(self, channels: int, extra_branch: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.pool = None
        if extra_branch:
            hidden = 4 * channels
            self.pool = nn.Sequential(
                nn.Conv2d(channels, hidden, 1, bias=False),
                nn.GroupNorm(4, hidden),
                nn.ReLU(),
                nn.Conv2d(hidden, channels, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


def _blocks_with_extra_branch(state_dict: dict[str, torch.Tensor]) -> set[int]:
    return {int(match.group(1)) for key in state_dict if (match := re.match(r"(\d+)\.pool\.", key))}


def build_encoder(latent_channels: int, extra_branch_at: set[int] = frozenset()) -> nn.Sequential:
    """Image in [0, 1] → latent at 1/8 size. Layer indices follow the original layout."""
    layers: list[nn.Module] = [_conv(3, WIDTH), _Block(WIDTH)]
    for _ in range(3):  # three x2 downsamplings, each followed by three blocks
        layers.append(_conv(WIDTH, WIDTH, stride=2, bias=False))
        for _ in range(3):
            layers.append(_Block(WIDTH, len(layers) in extra_branch_at))
    layers.append(_conv(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def build_decoder(latent_channels: int, extra_branch_at: set[int] = frozenset()) -> nn.Sequential:
    """Latent → image in about [0, 1] at 8x the size. Layer indices follow the original layout."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
    for _ in range(3):  # three blocks, then a x2 upsampling
        for _ in range(3):
            layers.append(_Block(WIDTH, len(layers) in extra_branch_at))
        layers += [nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
    layers += [_Block(WIDTH, len(layers) in extra_branch_at), _conv(WIDTH, 3)]
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    r"""
    A tiny autoencoder (TAESD family) with the interface lssgen uses of a diffusers VAE: `encode(images)` with
    images in [-1, 1] gives an output with `.latents`, `decode(latents)` gives images in about [-1, 1], and
    `config` has `latent_channels`, `block_out_channels` (for the 8x spatial factor) and an identity latent
    normalisation (`scaling_factor` 1, `shift_factor` 0): the latents are the VAE's own, un-normalised.

    Example:

    ```py
    >>> vae = TinyAutoencoder.from_pth("taef2_encoder.pth", "taef2_decoder.pth")
    >>> latents = vae.encode(images).latents  # (B, 32, H/8, W/8) for taef2
    ```
    """

    def __init__(self, latent_channels: int, encoder_extra_branch_at=(), decoder_extra_branch_at=()):
        super().__init__()
        self.encoder = build_encoder(latent_channels, set(encoder_extra_branch_at))
        self.decoder = build_decoder(latent_channels, set(decoder_extra_branch_at))
        self.config = SimpleNamespace(
            latent_channels=latent_channels,
            block_out_channels=(WIDTH,) * 4,
            scaling_factor=1.0,
            shift_factor=0.0,
            latents_mean=None,
            latents_std=None,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        latents = self.encoder((images + 1) / 2)
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        images = self.decoder(latents) * 2 - 1
        return DecoderOutput(sample=images) if return_dict else (images,)

    @classmethod
    def from_pth(cls, encoder_path: str | Path, decoder_path: str | Path) -> TinyAutoencoder:
        """Load the two original state dicts; the extra branch is built where the weights have one."""
        encoder_state = _load_state_dict(encoder_path)
        decoder_state = _load_state_dict(decoder_path)
        out_key = max((k for k in encoder_state if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))
        latent_channels = encoder_state[out_key].shape[0]
        model = cls(latent_channels, _blocks_with_extra_branch(encoder_state), _blocks_with_extra_branch(decoder_state))
        for part, state, path in (
            (model.encoder, encoder_state, encoder_path),
            (model.decoder, decoder_state, decoder_path),
        ):
            try:
                part.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise ValueError(
                    f"{path} is not a tiny-autoencoder state dict in the original TAESD layout: {error}"
                ) from None
        return model.eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: str | Path) -> TinyAutoencoder:
        """Load the one `*encoder.pth` and one `*decoder.pth` in `folder` (e.g. taef2_encoder.pth/_decoder.pth)."""
        encoder_path, decoder_path = find_pth_pair(folder)
        return cls.from_pth(encoder_path, decoder_path)


def find_pth_pair(folder: str | Path) -> tuple[Path, Path]:
    """The `*encoder.pth` and `*decoder.pth` files in `folder`; a clear error unless there is exactly one of each."""
    folder = Path(folder)
    pairs = []
    for suffix in (ENCODER_SUFFIX, DECODER_SUFFIX):
        found = sorted(folder.glob(f"*{suffix}"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise ValueError(
                f"{folder}: expected exactly one *{suffix} file of a tiny autoencoder, found {names}. "
                "Point at a folder holding one encoder and one decoder .pth, or at a diffusers VAE folder."
            )
        pairs.append(found[0])
    return pairs[0], pairs[1]


def is_tiny_autoencoder_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob(f"*{ENCODER_SUFFIX}")) and any(path.glob(f"*{DECODER_SUFFIX}"))


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise ValueError(f"Cannot read {path} as a PyTorch state dict: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return state
