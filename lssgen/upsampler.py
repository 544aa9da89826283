"""The tiny learned x2 upsampler that works inside a pipeline's latent space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _UpsamplerBlock(nn.Module):
    """GroupNorm → (transposed) conv → act → GroupNorm → conv → act, plus a projected, resized skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        upsample: bool,
        stride: int,
        norm_num_groups: int,
        act_fn: str,
        interpolate: str,
    ):
        super().__init__()
        self.stride = stride
        self.upsample = upsample
        self.interpolate = interpolate
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if stride == 1:
            self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        elif upsample:
            self.conv1 = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=stride, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = get_activation(act_fn)
        # The released weights have no `skip_proj` tensors when the channel count is unchanged.
        self.skip_proj = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(self.norm1(x)))
        h = self.act(self.conv2(self.norm2(h)))
        skip = self.skip_proj(x)
        if self.stride != 1:
            factor = self.stride if self.upsample else 1 / self.stride
            skip = F.interpolate(skip, scale_factor=factor, mode=self.interpolate)
        return h + skip


class _ResidualUpsampler(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        channels = list(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        block_inputs = [channels[0], *channels[:-1]]
        self.up_blocks = nn.ModuleList(
            _UpsamplerBlock(
                c_in,
                c_out,
                upsample=up,
                stride=stride,
                norm_num_groups=config.norm_num_groups,
                act_fn=config.act_fn,
                interpolate=config.interpolate,
            )
            for c_in, c_out, up, stride in zip(block_inputs, channels, config.is_up_samples, config.strides)
        )
        self.norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1])
        self.act_out = get_activation(config.act_fn)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act_out(self.norm_out(x)))


class LatentUpsampler(ModelMixin, ConfigMixin):
    r"""
    A small residual CNN that scales a normalised latent up by `prod(strides)` (x2 by default).

    The module and config layout match the released LSSGen upsampler weights, so a folder holding
    `config.json` (`_class_name: "LatentUpSampler"`) and `diffusion_pytorch_model.safetensors` loads with
    [`~LatentUpsampler.from_pretrained`] with no missing or unexpected keys.

    Args:
        in_channels (`int`, defaults to `16`): latent channels of the pipeline's VAE.
        out_channels (`int`, defaults to `16`): channels produced; equal to `in_channels` for pipeline use.
        block_out_channels (`tuple[int]`, defaults to `(128, 64)`): width of each residual block.
        is_up_samples (`tuple[bool]`, defaults to `(True, False)`): whether a strided block scales up or down.
        strides (`tuple[int]`, defaults to `(2, 1)`): stride of each block's first convolution.
        norm_num_groups (`int`, defaults to `32`): GroupNorm groups; must divide every block width.
        act_fn (`str`, defaults to `"silu"`): activation name understood by diffusers.
        interpolate (`str`, defaults to `"bilinear"`): resize mode of the skip connections.

    Example:

    ```py
    >>> import torch, lssgen
    >>> up = lssgen.LatentUpsampler(in_channels=16, out_channels=16)
    >>> up(torch.randn(1, 16, 32, 32)).shape
    torch.Size([1, 16, 64, 64])
    ```
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        block_out_channels: tuple[int, ...] = (128, 64),
        is_up_samples: tuple[bool, ...] = (True, False),
        strides: tuple[int, ...] = (2, 1),
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        interpolate: str = "bilinear",
    ):
        super().__init__()
        if not (len(block_out_channels) == len(is_up_samples) == len(strides)) or not block_out_channels:
            raise ValueError(
                "`block_out_channels`, `is_up_samples` and `strides` must be non-empty and of equal length, got "
                f"{list(block_out_channels)}, {list(is_up_samples)}, {list(strides)}."
            )
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"Every entry of `block_out_channels` must be divisible by `norm_num_groups`={norm_num_groups}; "
                f"{bad} is not. Choose widths that are multiples of {norm_num_groups} or lower `norm_num_groups`."
            )
        self.upsampler = _ResidualUpsampler(self.config)

    @property
    def scale_factor(self) -> float:
        """How much the upsampler scales each spatial side."""
        factor = 1.0
        for up, stride in zip(self.config.is_up_samples, self.config.strides):
            factor *= stride if up else 1 / stride
        return factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.upsampler(latent)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> LatentUpsampler:
        r"""
        Load weights saved by [`~LatentUpsampler.save_pretrained`] or released in the LSSGen format.

        Only safetensors files are read: pickled `.bin` weights can run code when loaded.

        Example:

        ```py
        >>> up = lssgen.LatentUpsampler.from_pretrained("path/to/flux-x2", torch_dtype=torch.bfloat16)
        ```
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "LatentUpsampler loads safetensors weights only. Convert the checkpoint with "
                "`safetensors.torch.save_file` and drop `use_safetensors=False`."
            )
        kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
