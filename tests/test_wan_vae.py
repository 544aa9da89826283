"""Wan's video VAE (`AutoencoderKLWan`) in `train-upsampler` and `eval-upsampler`: images as one-frame videos.

The tiny VAEs are random, built here and saved as real folders; the latent normalisation is checked against the
Wan pipelines' own code (diffusers 0.42.1: `pipeline_wan_i2v.py` encodes, `pipeline_wan.py` decodes).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from PIL import Image

import lssgen
from lssgen.cli import main
from lssgen.evaluation.upsampler import LEARNED
from lssgen.latents import LatentNormalization
from lssgen.loading import load_upsampler
from lssgen.tiny.qwenimage import build_tiny_qwenimage_vae
from lssgen.training.data import (
    decode,
    downsample_nearest,
    encode,
    is_video_vae,
    load_vae,
    vae_latent_channels,
    vae_spatial_factor,
)

# Per-channel statistics far from 0 / 1, so a missing or half-applied normalisation cannot pass.
MEAN, STD = [0.3, -0.5, 0.1, 0.8], [1.7, 0.6, 2.2, 1.1]
SMALL = {"block_out_channels": [32, 32], "norm_num_groups": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def build_tiny_wan_vae(version: str = "2.1") -> AutoencoderKLWan:
    """A random `AutoencoderKLWan`: Wan 2.1's layout (x8, causal in time) or Wan 2.2 TI2V-5B's (2x2 patchify of
    12 = 3 x 2 x 2 input channels, residual blocks, x16), with 4 latent channels and a tenth of its widths."""
    torch.manual_seed(0)
    common = {"base_dim": 16, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}
    if version == "2.2":
        extra = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2}
        return AutoencoderKLWan(**common, **extra, scale_factor_spatial=16, latents_mean=MEAN, latents_std=STD).eval()
    return AutoencoderKLWan(**common, latents_mean=MEAN, latents_std=STD).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A Wan pipeline's folder as far as a VAE goes: `vae/config.json` + `vae/diffusion_pytorch_model.safetensors`."""
    folder = tmp_path_factory.mktemp("wan")
    build_tiny_wan_vae().save_pretrained(folder / "vae")
    return folder


@pytest.fixture(scope="module")
def vae(pipeline_dir):
    return load_vae(str(pipeline_dir / "vae"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(6):  # smooth colour fields, 64-80 px: one is held out for validation
        size = int(rng.integers(64, 81))
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, 4, 4))).float()
        image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        Image.fromarray((image.clamp(0, 1).numpy() * 255).astype(np.uint8)).save(folder / f"{index}.png")
    return folder


def test_wan_vae_is_read_from_its_config(vae):
    assert type(vae) is AutoencoderKLWan and is_video_vae(vae)
    assert vae_latent_channels(vae) == 4 and vae_spatial_factor(vae) == 8
    wan22 = build_tiny_wan_vae("2.2")
    assert vae_latent_channels(wan22) == 4 and vae_spatial_factor(wan22) == 16  # its patchify included
    image_vae = AutoencoderKL(block_out_channels=[8, 8], norm_num_groups=8, latent_channels=4)
    assert not is_video_vae(image_vae) and vae_latent_channels(image_vae) == 4 and vae_spatial_factor(image_vae) == 2


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2", "qwenimage"])
def test_an_image_goes_through_as_a_one_frame_video(kind, vae):
    vae = {"wan2.1": lambda: vae, "wan2.2": lambda: build_tiny_wan_vae("2.2"), "qwenimage": build_tiny_qwenimage_vae}[
        kind
    ]().eval()
    norm = LatentNormalization.from_vae_config(vae.config)
    factor, channels = vae_spatial_factor(vae), vae_latent_channels(vae)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    latents = encode(vae, images, norm)
    with torch.no_grad():
        direct = vae.encode(images[:, :, None]).latent_dist.mode()  # the VAE called with a 5-D video
    assert direct.shape == (2, channels, 1, 64 // factor, 64 // factor)  # one frame in, one latent frame out
    assert latents.shape == (2, channels, 64 // factor, 64 // factor)
    assert torch.equal(latents, norm.from_vae(direct[:, :, 0]))

    decoded = decode(vae, latents, norm)
    with torch.no_grad():
        direct = vae.decode(norm.to_vae(latents)[:, :, None]).sample
    assert direct.shape == (2, 3, 1, 64, 64)
    assert decoded.shape == (2, 3, 64, 64) and torch.equal(decoded, direct[:, :, 0].clamp(-1, 1))

    # The x2 pairs the upsampler learns from: the half-size image's latent is half the size.
    assert encode(vae, downsample_nearest(images), norm).shape == (2, channels, 32 // factor, 32 // factor)


def test_normalisation_is_the_wan_pipelines(vae):
    norm = LatentNormalization.from_vae_config(vae.config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    # WanImageToVideoPipeline (Wan 2.2 TI2V's `expand_timesteps`) encodes a conditioning image as one frame and
    # normalises it as `(latents - latents_mean) * (1 / latents_std)`: the latent space the transformer sees.
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), expand_timesteps=True
    )
    _, condition, _ = pipe.prepare_latents(images, 1, 4, 32, 32, num_frames=1, dtype=torch.float32, device="cpu")
    assert condition.shape == (2, 4, 1, 4, 4)
    latents = encode(vae, images, norm)
    torch.testing.assert_close(latents, condition[:, :, 0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(latents, norm.to_vae(latents), atol=0.1)  # the statistics are not an identity

    # WanPipeline before `vae.decode` (pipeline_wan.py): `latents / (1 / latents_std) + latents_mean`, 5-D.
    config = vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
    torch.testing.assert_close(norm.to_vae(latents), (latents[:, :, None] / std + mean)[:, :, 0], rtol=1e-6, atol=1e-6)


def test_frames_other_than_one_are_refused(vae):
    norm = LatentNormalization.from_vae_config(vae.config)
    one_frame = torch.zeros(1, 3, 1, 32, 32)
    assert encode(vae, one_frame, norm).shape == (1, 4, 4, 4)  # a one-frame video is an image
    with pytest.raises(ValueError, match=r"hold 5 frames.*one frame at a time"):
        encode(vae, torch.zeros(1, 3, 5, 32, 32), norm)
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 2, 4, 4\) hold 2 frames"):
        decode(vae, torch.zeros(1, 4, 2, 4, 4), norm)
    image_vae = AutoencoderKL(block_out_channels=[8, 8], norm_num_groups=8, latent_channels=4)
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\)\."):
        encode(image_vae, one_frame, LatentNormalization())


def test_train_then_evaluate_through_the_command_line(pipeline_dir, vae, image_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "wan-x2"
    train = ["train-upsampler", "--vae", pipeline_dir / "vae", "--images", image_dir, "--out", out]
    train += ["--resolution", 32, "--steps", 4, "--batch-size", 2, "--config", config, "--device", "cpu"]
    train += ["--cache-latents", "--pixel-loss", "mse"]  # whole-image latents and decoding, under the gradient
    assert main([str(a) for a in train]) == 0, capsys.readouterr().err
    assert "trained 4 steps on 5 images" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "AutoencoderKLWan, 4 latent channels, x8, a video VAE" in card

    upsampler = load_upsampler(str(out), torch.float32, "cpu")
    assert upsampler.config.in_channels == upsampler.config.out_channels == vae.config.z_dim == 4
    assert isinstance(upsampler, lssgen.LatentUpsampler)
    norm = LatentNormalization.from_vae_config(vae.config)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        up = upsampler(encode(vae, downsample_nearest(images), norm))
    assert up.shape == encode(vae, images, norm).shape == (1, 4, 8, 8)

    report_dir = tmp_path / "eval"
    evaluate = ["eval-upsampler", "--vae", pipeline_dir, "--subfolder", "vae", "--images", image_dir]
    evaluate += ["--upsampler", out, "--resolution", 64, "--limit", 2, "--repeats", 1, "--grid", 1]
    assert main([str(a) for a in [*evaluate, "--out", report_dir, "--device", "cpu"]]) == 0, capsys.readouterr().err
    report = json.loads((report_dir / "report.json").read_text())
    assert report["image_count"] == 2 and report["vae"] == f"{pipeline_dir}/vae"
    assert all(math.isfinite(value) for value in report["mean"][LEARNED].values())


def test_an_upsampler_for_other_channels_is_refused(pipeline_dir, image_dir, tmp_path, capsys):
    torch.manual_seed(0)
    lssgen.LatentUpsampler(in_channels=16, out_channels=16, **SMALL).save_pretrained(tmp_path / "up16")
    args = ["eval-upsampler", "--vae", pipeline_dir / "vae", "--images", image_dir, "--resolution", 64]
    args += ["--upsampler", tmp_path / "up16", "--out", tmp_path / "eval", "--device", "cpu"]
    assert main([str(a) for a in args]) == 2
    assert "16 → 16 latent channels but the VAE has 4" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_statistics_for_other_channels_are_refused(image_dir, tmp_path, capsys):
    torch.manual_seed(0)
    # z_dim 4 with the default latents_mean/latents_std: Wan 2.1's 16 values, so the config contradicts the weights.
    AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(tmp_path / "vae")
    out = tmp_path / "up"
    args = ["train-upsampler", "--vae", tmp_path / "vae", "--images", image_dir, "--out", out, "--resolution", 32]
    assert main([str(a) for a in [*args, "--steps", 1, "--device", "cpu"]]) == 2
    assert "latents_mean/latents_std hold 16 values but its latents have 4 channels" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
