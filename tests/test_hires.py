"""Hires fix (issue #21): `lssgen.hires_fix` and `lssgen generate --image` enlarge an image with an image-to-image
call whose first stage is the image's own size; at `start_sigma=1.0` it is the stock recipe (the image resized in
pixels, img2img at the target size)."""

from __future__ import annotations

import pytest
import test_flux
import test_flux2
import torch
from diffusers import Flux2KleinInpaintPipeline, FluxImg2ImgPipeline
from PIL import Image

import lssgen
from lssgen.cli import main
from lssgen.tiny import build_tiny_cogview4_pipeline, build_tiny_flux_pipeline
from lssgen.tiny.flux2 import build_tiny_flux2_pipeline

INPUT = Image.fromarray((torch.rand(128, 96, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
PLAN = {"shorten_intermediate_steps": False}


@pytest.fixture
def text_to_image():
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, None, **PLAN)
    return pipe


def _first_tokens_and_sizes(pipe, run):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        output = run()
    finally:
        hook.remove()
    return output, seen


def _call(pipe):
    """The tiny pipe's prompt, steps and a fresh seeded generator; no size (the Hires fix gives it)."""
    call = test_flux.flux_call_kwargs(pipe, num_inference_steps=8)
    del call["height"], call["width"]
    return call


def test_hires_fix_starts_at_the_images_size_and_is_the_documented_img2img_call(text_to_image):
    output, tokens = _first_tokens_and_sizes(
        text_to_image,
        lambda: lssgen.hires_fix(text_to_image, INPUT, height=256, width=192, strength=0.6, **_call(text_to_image)),
    )
    assert output.images.shape == (1, 3, 256, 192)
    # FLUX.1 packs 2x2 cells of the x8 latent: the first stage is 128 x 96 px, the input's size; the last 256 x 192.
    assert tokens[0] == (128 // 16) * (96 // 16) and tokens[-1] == (256 // 16) * (192 // 16)
    # The same call by hand: the family's img2img pipeline, the image resized in pixels, the first stage at its size.
    img2img = FluxImg2ImgPipeline(**build_tiny_flux_pipeline(seed=0).components)
    img2img.set_progress_bar_config(disable=True)
    lssgen.patch(img2img, None, **PLAN)
    resized = INPUT.resize((192, 256), Image.Resampling.LANCZOS)
    by_hand = img2img(image=resized, strength=0.6, height=256, width=192, min_resolution=96, **_call(img2img)).images
    assert torch.equal(output.images, by_hand)
    # Stock: every step at the target size; what stock FluxImg2ImgPipeline makes of the resized image.
    stock = lssgen.hires_fix(
        text_to_image, INPUT, height=256, width=192, strength=0.6, start_sigma=1.0, **_call(text_to_image)
    )
    lssgen.unpatch(img2img)
    by_hand = img2img(image=resized, strength=0.6, height=256, width=192, **_call(img2img)).images
    assert torch.equal(stock.images, by_hand) and not torch.equal(stock.images, output.images)
    # The img2img pipe it used is gone: the shared transformer's hook serves the text-to-image pipe alone.
    assert len(text_to_image.transformer._diffusers_hook.get_hook("lssgen_flux_image_ids").lssgen_stages.by_pipe) == 1


def test_hires_fix_of_flux2_klein_repaints_everything_through_its_inpainting_pipeline():
    pipe = build_tiny_flux2_pipeline(seed=0, klein=True)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, None)
    img2img, arguments = lssgen.hires.hires_fix_call(pipe, INPUT, 256, 192)
    assert isinstance(img2img, Flux2KleinInpaintPipeline) and arguments["min_resolution"] == 96
    assert arguments["mask_image"].size == (192, 256) and arguments["mask_image"].getextrema() == (255, 255)
    call = test_flux2.flux2_call_kwargs(pipe, klein=True)
    del call["height"], call["width"]
    assert lssgen.hires_fix(pipe, INPUT, height=256, width=192, **call).images.shape == (1, 3, 256, 192)


def test_bad_hires_input_is_a_clear_error():
    pipe = build_tiny_flux_pipeline(seed=0)
    with pytest.raises(TypeError, match="`image` must be a PIL image"):
        lssgen.hires_fix(pipe, torch.rand(1, 3, 64, 64), height=128, width=128)
    with pytest.raises(ValueError, match="`height` must be a positive number of pixels"):
        lssgen.hires_fix(pipe, INPUT, height=0, width=128)
    with pytest.raises(ValueError, match="lssgen knows no image-to-image pipeline for CogView4Pipeline"):
        lssgen.image_to_image_pipeline(build_tiny_cogview4_pipeline(seed=0))


def test_generate_image_enlarges_it_to_twice_its_size(tiny_flux_dir, tmp_path, capsys):
    INPUT.save(tmp_path / "in.png")
    argv = ["generate", "--model", tiny_flux_dir, "--image", tmp_path / "in.png", "--steps", 6, "--device", "cpu"]
    argv += ["--baseline", "--out", tmp_path / "big.png"]
    assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1/2    96x128" in printed and "2/2    192x256" in printed  # the plan: the image's size, then twice it
    assert Image.open(tmp_path / "big.png").size == Image.open(tmp_path / "big-stock.png").size == (192, 256)
    assert "speed-up:" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--strength", "0.5"], "--strength needs --image"), (["--image", "missing.png"], "--image missing.png")],
)
def test_generate_image_errors_are_one_line(tiny_flux_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", str(tiny_flux_dir), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
