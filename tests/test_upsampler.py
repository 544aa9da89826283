"""The learned latent upsampler: shapes, size, saving/loading (including the published folder format), errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lssgen import LatentUpsampler

SMALL_4CH = dict(in_channels=4, out_channels=4, block_out_channels=[64, 32])

# The published layout for the 16-channel [128, 64] config, shapes worked out by hand:
#   conv_in  Conv2d(16 -> 128, 3x3)
#   block 0  128 -> 128, stride 2 up: norm1 GN(128), conv1 ConvTranspose2d(128 -> 128, 4x4) with weight
#            [in, out, 4, 4], norm2 GN(128), conv2 Conv2d(128 -> 128, 3x3), no skip_proj (channels unchanged)
#   block 1  128 -> 64, stride 1: norm1 GN(128), conv1 Conv2d(128 -> 64, 3x3), norm2 GN(64),
#            conv2 Conv2d(64 -> 64, 3x3), skip_proj Conv2d(128 -> 64, 1x1)
#   norm_out GN(64), conv_out Conv2d(64 -> 16, 3x3)
PUBLISHED_SHAPES = {
    "upsampler.conv_in.weight": (128, 16, 3, 3),
    "upsampler.conv_in.bias": (128,),
    "upsampler.up_blocks.0.norm1.weight": (128,),
    "upsampler.up_blocks.0.norm1.bias": (128,),
    "upsampler.up_blocks.0.conv1.weight": (128, 128, 4, 4),
    "upsampler.up_blocks.0.conv1.bias": (128,),
    "upsampler.up_blocks.0.norm2.weight": (128,),
    "upsampler.up_blocks.0.norm2.bias": (128,),
    "upsampler.up_blocks.0.conv2.weight": (128, 128, 3, 3),
    "upsampler.up_blocks.0.conv2.bias": (128,),
    "upsampler.up_blocks.1.norm1.weight": (128,),
    "upsampler.up_blocks.1.norm1.bias": (128,),
    "upsampler.up_blocks.1.conv1.weight": (64, 128, 3, 3),
    "upsampler.up_blocks.1.conv1.bias": (64,),
    "upsampler.up_blocks.1.norm2.weight": (64,),
    "upsampler.up_blocks.1.norm2.bias": (64,),
    "upsampler.up_blocks.1.conv2.weight": (64, 64, 3, 3),
    "upsampler.up_blocks.1.conv2.bias": (64,),
    "upsampler.up_blocks.1.skip_proj.weight": (64, 128, 1, 1),
    "upsampler.up_blocks.1.skip_proj.bias": (64,),
    "upsampler.norm_out.weight": (64,),
    "upsampler.norm_out.bias": (64,),
    "upsampler.conv_out.weight": (16, 64, 3, 3),
    "upsampler.conv_out.bias": (16,),
}

PUBLISHED_CONFIG = {
    "_class_name": "LatentUpSampler",
    "_diffusers_version": "0.30.0",
    "in_channels": 16,
    "out_channels": 16,
    "block_out_channels": [128, 64],
    "is_up_samples": [True, False],
    "strides": [2, 1],
    "norm_num_groups": 32,
    "act_fn": "silu",
    "interpolate": "bilinear",
}

# Parameter counts by hand:
#  16-ch: conv_in 18,560; block 0 256 + 262,272 + 256 + 147,584 = 410,368;
#         block 1 256 + 73,792 + 128 + 36,928 + 8,256 = 119,360; norm_out 128; conv_out 9,232 -> 557,648.
#  4-ch [64, 32]: conv_in 2,368; block 0 128 + 65,600 + 128 + 36,928 = 102,784;
#         block 1 128 + 18,464 + 64 + 9,248 + 2,080 = 29,984; norm_out 64; conv_out 1,156 -> 136,356.
PARAMS_16CH = 557_648
PARAMS_4CH = 136_356


def seeded(config: dict | None = None, seed: int = 0) -> LatentUpsampler:
    torch.manual_seed(seed)
    return LatentUpsampler(**(config or {})).eval()


def write_published_folder(folder, generator: torch.Generator) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIG, indent=2))
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in PUBLISHED_SHAPES.items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return tensors


# --------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------


def test_default_config_is_the_16_channel_one():
    up = LatentUpsampler()
    assert up.config.in_channels == 16
    assert up.config.out_channels == 16
    assert list(up.config.block_out_channels) == [128, 64]
    assert list(up.config.is_up_samples) == [True, False]
    assert list(up.config.strides) == [2, 1]
    assert up.config.norm_num_groups == 32
    assert up.config.act_fn == "silu"
    assert up.config.interpolate == "bilinear"


@pytest.mark.parametrize(
    ("config", "shape_in", "shape_out"),
    [
        ({}, (1, 16, 32, 32), (1, 16, 64, 64)),
        ({}, (2, 16, 8, 8), (2, 16, 16, 16)),
        ({}, (1, 16, 12, 20), (1, 16, 24, 40)),
        (SMALL_4CH, (1, 4, 16, 16), (1, 4, 32, 32)),
        (SMALL_4CH, (3, 4, 10, 6), (3, 4, 20, 12)),
    ],
)
def test_output_is_twice_the_size(config, shape_in, shape_out):
    up = seeded(config)
    with torch.no_grad():
        out = up(torch.randn(shape_in))
    assert tuple(out.shape) == shape_out
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("config", [{}, SMALL_4CH])
def test_scale_factor_is_two(config):
    assert LatentUpsampler(**config).scale_factor == 2


def test_different_channel_counts_in_and_out():
    up = seeded(dict(in_channels=4, out_channels=8, block_out_channels=[64, 32]))
    with torch.no_grad():
        assert tuple(up(torch.randn(1, 4, 6, 6)).shape) == (1, 8, 12, 12)


# --------------------------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------------------------


def test_parameter_counts():
    assert sum(p.numel() for p in LatentUpsampler().parameters()) == PARAMS_16CH
    assert sum(p.numel() for p in LatentUpsampler(**SMALL_4CH).parameters()) == PARAMS_4CH


def test_module_layout_matches_published_keys():
    state = LatentUpsampler().state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == PUBLISHED_SHAPES


def test_safetensors_file_size(tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    LatentUpsampler().save_pretrained(big)
    LatentUpsampler(**SMALL_4CH).save_pretrained(small)
    big_size = os.path.getsize(big / "diffusion_pytorch_model.safetensors")
    small_size = os.path.getsize(small / "diffusion_pytorch_model.safetensors")
    # 557,648 float32 parameters = 2,230,592 bytes plus a small header.
    assert 0.5e6 <= big_size <= 2.3e6
    assert big_size >= PARAMS_16CH * 4
    assert small_size < big_size
    assert small_size >= PARAMS_4CH * 4


# --------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, SMALL_4CH])
def test_save_and_load_round_trip(tmp_path, config):
    up = seeded(config, seed=3)
    up.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))

    loaded = LatentUpsampler.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LatentUpsampler)
    for key in PUBLISHED_CONFIG:
        if not key.startswith("_"):
            expected, actual = up.config[key], loaded.config[key]
            if isinstance(expected, (list, tuple)):
                expected, actual = list(expected), list(actual)
            assert actual == expected, key
    original, restored = up.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name

    channels = up.config.in_channels
    x = torch.randn(2, channels, 8, 12)
    with torch.no_grad():
        assert torch.equal(up(x), loaded(x))


def test_saved_config_has_published_keys(tmp_path):
    LatentUpsampler().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("in_channels", "out_channels", "block_out_channels", "is_up_samples", "strides"):
        assert config[key] == PUBLISHED_CONFIG[key]
    for key in ("norm_num_groups", "act_fn", "interpolate"):
        assert config[key] == PUBLISHED_CONFIG[key]


def test_loads_published_folder_without_missing_or_unexpected_keys(tmp_path):
    folder = tmp_path / "flux-x2"
    written = write_published_folder(folder, torch.Generator().manual_seed(7))

    up, info = LatentUpsampler.from_pretrained(folder, output_loading_info=True)
    assert isinstance(up, LatentUpsampler)
    assert info["missing_keys"] == []
    assert info["unexpected_keys"] == []
    assert info.get("mismatched_keys", []) == []
    state = up.state_dict()
    assert torch.equal(state["upsampler.up_blocks.0.conv1.weight"], written["upsampler.up_blocks.0.conv1.weight"])
    assert torch.equal(
        state["upsampler.up_blocks.1.skip_proj.weight"], written["upsampler.up_blocks.1.skip_proj.weight"]
    )
    assert torch.equal(state["upsampler.conv_out.bias"], written["upsampler.conv_out.bias"])
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    assert up.scale_factor == 2
    with torch.no_grad():
        assert tuple(up(torch.randn(1, 16, 12, 20)).shape) == (1, 16, 24, 40)


def test_published_folder_loads_in_bfloat16(tmp_path):
    folder = tmp_path / "flux-x2"
    written = write_published_folder(folder, torch.Generator().manual_seed(8))
    up = LatentUpsampler.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert up.dtype == torch.bfloat16
    assert torch.equal(up.state_dict()["upsampler.conv_in.weight"], written["upsampler.conv_in.weight"].bfloat16())


def test_saved_file_is_readable_as_plain_safetensors(tmp_path):
    up = seeded(seed=5)
    up.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert set(tensors) == set(PUBLISHED_SHAPES)
    assert torch.equal(tensors["upsampler.conv_in.weight"], up.state_dict()["upsampler.conv_in.weight"])


def test_use_safetensors_false_is_refused(tmp_path):
    """Asking for pickled weights is refused with the way to convert them."""
    LatentUpsampler(**SMALL_4CH).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        LatentUpsampler.from_pretrained(tmp_path, use_safetensors=False)
    assert str(error.value) == (
        "LatentUpsampler loads safetensors weights only. Convert the checkpoint with `safetensors.torch.save_file` "
        "and drop `use_safetensors=False`."
    )


def test_bin_only_folder_does_not_load(tmp_path):
    up = LatentUpsampler(**SMALL_4CH)
    up.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(up.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; it must not unpickle the file
        LatentUpsampler.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Invalid configs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(block_out_channels=[128, 64, 32]),
        dict(is_up_samples=[True]),
        dict(strides=[2, 1, 1]),
        dict(block_out_channels=[128], is_up_samples=[True, False], strides=[2]),
        dict(block_out_channels=[], is_up_samples=[], strides=[]),
    ],
)
def test_mismatched_block_lists_are_rejected(config):
    with pytest.raises(ValueError, match="block_out_channels.*is_up_samples.*strides"):
        LatentUpsampler(**config)


@pytest.mark.parametrize(
    "config",
    [
        dict(block_out_channels=[128, 48]),
        dict(block_out_channels=[100, 64]),
        dict(block_out_channels=[64, 32], norm_num_groups=64),
    ],
)
def test_width_not_divisible_by_groups_is_rejected(config):
    with pytest.raises(ValueError, match="norm_num_groups"):
        LatentUpsampler(**config)


# --------------------------------------------------------------------------------------------------------------
# dtype and gradients
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, SMALL_4CH])
def test_bfloat16_forward(config):
    up = seeded(config).to(torch.bfloat16)
    x = torch.randn(1, up.config.in_channels, 8, 10, dtype=torch.bfloat16)
    with torch.no_grad():
        out = up(x)
    assert out.dtype == torch.bfloat16
    assert tuple(out.shape) == (1, up.config.out_channels, 16, 20)
    assert torch.isfinite(out.float()).all()


def test_gradients_flow():
    up = seeded(SMALL_4CH).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 16, 16)
    loss = torch.nn.functional.mse_loss(up(x), target)
    loss.backward()
    conv_in = up.upsampler.conv_in
    assert conv_in.weight.grad is not None
    assert conv_in.bias.grad is not None
    assert conv_in.weight.grad.abs().sum() > 0
    assert x.grad is not None
    assert all(p.grad is not None for p in up.parameters())


# --------------------------------------------------------------------------------------------------------------
# Values: an independent forward written from the architecture's description
# --------------------------------------------------------------------------------------------------------------

# GroupNorm epsilons of the published implementation (DESIGN.md section 1.8 names none): 1e-6 in the blocks,
# torch's default 1e-5 in `norm_out`.
BLOCK_NORM_EPS = 1e-6
OUT_NORM_EPS = 1e-5


def reference_forward(weights: dict[str, torch.Tensor], config: dict, x: torch.Tensor) -> torch.Tensor:
    """DESIGN.md section 1.8 in plain `torch.nn.functional`: `conv_in` (3x3) -> blocks of [GroupNorm ->
    ConvTranspose2d(k=4, s=2, p=1) or Conv2d(3x3) -> SiLU -> GroupNorm -> Conv2d(3x3) -> SiLU] plus the block input,
    1x1-projected where the width changes and resized by `interpolate` where the block changes the size ->
    GroupNorm -> SiLU -> `conv_out` (3x3)."""
    F = torch.nn.functional
    assert config["act_fn"] == "silu"
    groups = config["norm_num_groups"]

    def w(name):
        return weights[f"upsampler.{name}.weight"], weights[f"upsampler.{name}.bias"]

    h = F.conv2d(x, *w("conv_in"), padding=1)
    widths = config["block_out_channels"]
    for i, (width_out, up, stride) in enumerate(zip(widths, config["is_up_samples"], config["strides"])):
        block = f"up_blocks.{i}"
        y = F.group_norm(h, groups, *w(f"{block}.norm1"), eps=BLOCK_NORM_EPS)
        if stride == 1:
            y = F.conv2d(y, *w(f"{block}.conv1"), padding=1)
        elif up:
            y = F.conv_transpose2d(y, *w(f"{block}.conv1"), stride=stride, padding=1)
        else:
            y = F.conv2d(y, *w(f"{block}.conv1"), stride=stride, padding=1)
        y = F.silu(y)
        y = F.silu(
            F.conv2d(F.group_norm(y, groups, *w(f"{block}.norm2"), eps=BLOCK_NORM_EPS), *w(f"{block}.conv2"), padding=1)
        )
        skip = F.conv2d(h, *w(f"{block}.skip_proj")) if h.shape[1] != width_out else h
        if stride != 1:
            skip = F.interpolate(skip, scale_factor=stride if up else 1 / stride, mode=config["interpolate"])
        h = y + skip
    h = F.silu(F.group_norm(h, groups, *w("norm_out"), eps=OUT_NORM_EPS))
    return F.conv2d(h, *w("conv_out"), padding=1)


@pytest.mark.parametrize(
    "config",
    [
        {},
        SMALL_4CH,
        dict(
            in_channels=4,
            out_channels=4,
            block_out_channels=[32, 32, 16],
            is_up_samples=[True, False, False],
            strides=[2, 2, 1],
            norm_num_groups=8,
            interpolate="bicubic",
        ),
    ],
    ids=["published-16ch", "published-4ch", "up-down-bicubic"],
)
def test_forward_matches_an_independent_functional_forward(config):
    up = seeded(config).double()
    # Seeded, non-trivial GroupNorm scales and shifts (the init's ones and zeros would hide a swapped affine).
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in up.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    # Small inputs: the group variances stay near the GroupNorm epsilons, so a wrong epsilon moves the output far
    # beyond float64 rounding.
    x = 1e-2 * torch.randn(2, up.config.in_channels, 6, 10, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = up(x)
        expected = reference_forward(up.state_dict(), dict(up.config), x)
    scale = int(up.scale_factor)
    assert out.shape == expected.shape == (2, up.config.out_channels, 6 * scale, 10 * scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
