"""A model folder says how to call it (`lssgen.json`): `lssgen.load_pipeline` makes its native size the stock
call's default and `lssgen.patch` takes its lssgen defaults; `lssgen.patch` on FLUX.2 uses the shipped upsampler
when the VAE latent fits it. Real folders saved with `save_pretrained`, real pipelines with tiny random weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLFlux2, DiffusionPipeline, Flux2Pipeline, Flux2Transformer2DModel

import lssgen
from lssgen import LatentUpsampler, ModelDefaults, weights_path
from lssgen.tiny.flux2 import build_tiny_flux2_pipeline, tiny_flux2_prompt_embeds
from lssgen.weights import shipped

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE = 128  # the tiny folders' native size: the pipeline classes' own default is 1024
FILE_DEFAULTS = ModelDefaults(
    height=NATIVE,
    width=NATIVE,
    num_inference_steps=3,
    guidance_scale=2.5,
    max_sequence_length=16,
    patch={"min_resolution": 32, "upsampler": "x2"},
)


def _small_upsampler(channels: int, seed: int = 0) -> LatentUpsampler:
    torch.manual_seed(seed)
    return LatentUpsampler(in_channels=channels, out_channels=channels, block_out_channels=(16, 16), norm_num_groups=8)


@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory, tiny_flux_dir):
    """The tiny FLUX.1 folder (it has text encoders, so the stock loader loads it whole) with an lssgen.json."""
    folder = tmp_path_factory.mktemp("flux-with-defaults") / "model"
    shutil.copytree(tiny_flux_dir, folder)
    ModelDefaults(height=NATIVE, width=NATIVE, num_inference_steps=3, guidance_scale=2.5, max_sequence_length=16).save(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def saved_flux2(tmp_path_factory):
    """A tiny FLUX.2 folder (no text encoder: call with `prompt_embeds`), an upsampler folder `x2` inside it."""
    folder = tmp_path_factory.mktemp("flux2-with-defaults") / "model"
    build_tiny_flux2_pipeline(seed=0).save_pretrained(folder)
    _small_upsampler(32).save_pretrained(folder / "x2")
    return folder


@pytest.fixture
def flux2_folder(saved_flux2, tmp_path):
    """A fresh copy of the tiny FLUX.2 folder with `FILE_DEFAULTS` in its lssgen.json, for a test to change."""
    folder = tmp_path / "model"
    shutil.copytree(saved_flux2, folder)
    FILE_DEFAULTS.save(folder)
    return folder


def _load_flux2(folder) -> Flux2Pipeline:
    # The stock loader: the folder saved no text encoder or tokenizer, so the call says so.
    pipe = Flux2Pipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux2_images(pipe, **kwargs) -> torch.Tensor:
    embeds = tiny_flux2_prompt_embeds(pipe, "a red star")
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=embeds, output_type="pt", generator=generator, **kwargs).images


def _shipped_flux2_x2() -> LatentUpsampler:
    return LatentUpsampler.from_pretrained(weights_path("flux2-x2"))


# --- load_pipeline and model_defaults ------------------------------------------------------------------------------
def test_load_pipeline_makes_the_native_size_the_stock_calls_default(saved_flux, tiny_flux_dir):
    pipe = lssgen.load_pipeline(saved_flux)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=1, max_sequence_length=16, output_type="pt").images
    assert image.shape[-2:] == (NATIVE, NATIVE)
    # The same folder without the file loads as the stock loader loads it: the class's own default size.
    stock = lssgen.load_pipeline(tiny_flux_dir)
    assert stock.default_sample_size == DiffusionPipeline.from_pretrained(tiny_flux_dir).default_sample_size == 128
    assert lssgen.model_defaults(stock).call_arguments() == {} and lssgen.model_defaults(stock).patch == {}


def test_call_defaults_are_read_from_the_folder_or_a_pipe_loaded_from_it(saved_flux):
    expected = {"height": NATIVE, "width": NATIVE, "num_inference_steps": 3, "guidance_scale": 2.5}
    expected["max_sequence_length"] = 16
    assert lssgen.model_defaults(saved_flux).call_arguments() == expected
    # A pipe loaded with the stock loader knows its folder too (diffusers records it in `name_or_path`).
    pipe = DiffusionPipeline.from_pretrained(saved_flux)
    assert lssgen.model_defaults(pipe).call_arguments() == expected
    assert lssgen.model_defaults(lssgen.tiny.build_tiny_flux_pipeline()) == ModelDefaults()  # built in code: none
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red star", output_type="pt", **lssgen.model_defaults(pipe).call_arguments()).images
    assert images.shape[-2:] == (NATIVE, NATIVE)


def test_defaults_round_trip_through_the_file(tmp_path):
    path = FILE_DEFAULTS.save(tmp_path)
    assert path == tmp_path / "lssgen.json" and json.loads(path.read_text())["format"] == 1
    (tmp_path / "x2").mkdir()  # the relative upsampler folder the file names must exist
    read = ModelDefaults.from_folder(tmp_path)
    assert read.call_arguments() == FILE_DEFAULTS.call_arguments() and read.patch == FILE_DEFAULTS.patch
    assert read.upsampler_path() == tmp_path / "x2"
    # The base size is the native size unless the file says otherwise.
    assert read.patch_options() == {"base_height": NATIVE, "base_width": NATIVE, "min_resolution": 32}


# --- patch takes the folder's lssgen defaults -----------------------------------------------------------------------
def test_patch_takes_base_size_min_resolution_and_upsampler_from_the_folder(flux2_folder):
    pipe = _load_flux2(flux2_folder)
    lssgen.patch(pipe)
    state = pipe._lssgen
    assert (state.defaults.base_height, state.defaults.base_width, state.defaults.min_resolution) == (128, 128, 32)
    folders = LatentUpsampler.from_pretrained(flux2_folder / "x2")
    assert all(torch.equal(a, b) for a, b in zip(state.upsampler.state_dict().values(), folders.state_dict().values()))
    plan = lssgen.plan_for(pipe, NATIVE, NATIVE, 3)
    assert [stage.height for stage in plan.stages] == [32, 64, 128]
    assert f"learned upsampler (x2, named in {flux2_folder.name}/lssgen.json)" in plan.describe()
    seen = []
    state.upsampler.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    images = _flux2_images(pipe, height=NATIVE, width=NATIVE, num_inference_steps=3)
    assert images.shape[-2:] == (NATIVE, NATIVE) and seen == [4, 8]  # the folder's upsampler ran between stages


def test_arguments_given_to_patch_override_the_folders(flux2_folder):
    pipe = _load_flux2(flux2_folder)
    mine = _small_upsampler(32, seed=1)
    lssgen.patch(pipe, mine, min_resolution=64, base_height=256)
    state = pipe._lssgen
    assert state.upsampler is mine
    assert (state.defaults.min_resolution, state.defaults.base_height, state.defaults.base_width) == (64, 256, 128)
    lssgen.patch(pipe, None)  # None still means latent interpolation, whatever the folder names
    assert pipe._lssgen.upsampler is None and pipe._lssgen.defaults.min_resolution == 32
    assert "latent interpolation" in lssgen.plan_for(pipe, NATIVE, NATIVE, 3).describe()


def test_a_folder_may_choose_the_shipped_upsampler_or_none(flux2_folder):
    for upsampler, expected in (("flux2-x2", _shipped_flux2_x2().config.block_out_channels), (None, None)):
        ModelDefaults(height=NATIVE, width=NATIVE, patch={"upsampler": upsampler}).save(flux2_folder)
        pipe = lssgen.patch(_load_flux2(flux2_folder))
        chosen = pipe._lssgen.upsampler
        assert (None if chosen is None else chosen.config.block_out_channels) == expected


# --- FLUX.2: the shipped upsampler by default -----------------------------------------------------------------------
def test_flux2_uses_the_shipped_upsampler_when_the_vae_latent_fits_it():
    pipe = build_tiny_flux2_pipeline(seed=0)  # AutoencoderKLFlux2's 32 latent channels, as the real VAE
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, min_resolution=32)
    shipped_weights = _shipped_flux2_x2().state_dict()
    chosen = pipe._lssgen.upsampler.state_dict()
    assert chosen.keys() == shipped_weights.keys()
    assert all(torch.equal(chosen[name], shipped_weights[name]) for name in chosen)
    description = lssgen.plan_for(pipe, NATIVE, NATIVE, 3).describe()
    assert "learned upsampler (flux2-x2, shipped with lssgen for flux2)" in description
    images = _flux2_images(pipe, height=NATIVE, width=NATIVE, num_inference_steps=3)
    assert images.shape[-2:] == (NATIVE, NATIVE) and torch.isfinite(images).all()


def _flux2_with_16_channel_latents() -> Flux2Pipeline:
    """The tiny FLUX.2 pipeline with a VAE of 16 latent channels (and a transformer for them): not FLUX.2's
    latent layout, so the shipped upsampler does not fit it."""
    pipe = build_tiny_flux2_pipeline(seed=0)
    torch.manual_seed(0)
    vae_config = {**pipe.vae.config, "latent_channels": 16}
    transformer_config = {**pipe.transformer.config, "in_channels": 64}
    vae = AutoencoderKLFlux2.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    transformer = Flux2Transformer2DModel.from_config(
        {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    )
    pipe = Flux2Pipeline(pipe.scheduler, vae.eval(), None, None, transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux2_with_another_vae_latent_falls_back_to_latent_interpolation():
    pipe = _flux2_with_16_channel_latents()
    lssgen.patch(pipe, min_resolution=32)
    assert pipe._lssgen.upsampler is None
    description = lssgen.plan_for(pipe, NATIVE, NATIVE, 3).describe()
    assert "latent interpolation (bicubic x2; no upsampler: the shipped flux2-x2 works on 32-channel latents, " in (
        description
    )
    assert "this pipeline's VAE has 16" in description
    images = _flux2_images(pipe, height=NATIVE, width=NATIVE, num_inference_steps=3)
    assert images.shape[-2:] == (NATIVE, NATIVE) and torch.isfinite(images).all()


def test_upsampler_none_means_latent_interpolation_on_flux2():
    pipe = build_tiny_flux2_pipeline(seed=0)
    lssgen.patch(pipe, None, min_resolution=32)
    assert pipe._lssgen.upsampler is None
    assert "latent interpolation (bicubic x2; no upsampler: upsampler=None given to lssgen.patch)" in (
        lssgen.plan_for(pipe, NATIVE, NATIVE, 3).describe()
    )
    with pytest.raises(ValueError, match="needs a latent upsampler"):
        _flux2_images(pipe, height=NATIVE, width=NATIVE, num_inference_steps=3, scaling_space="learned")


# --- bad files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("contents", "key"),
    [
        ({"height": "256", "width": 256}, "`height`"),
        ({"height": 256}, "`height` and `width`"),
        ({"height": 100, "width": 100}, "`height`/`width` 100 is not a multiple of the VAE's scale factor 8"),
        ({"num_inference_steps": 0}, "`num_inference_steps`"),
        ({"max_sequence_length": 32.5}, "`max_sequence_length`"),
        ({"guidance_scale": "4"}, "`guidance_scale`"),
        ({"steps": 20}, r"unknown key\(s\) \['steps'\]"),
        ({"format": 2}, "`format` is 2"),
        ({"patch": [64]}, "`patch` must be a JSON object"),
        ({"patch": {"min_resoltion": 64}}, r"unknown `patch` key\(s\) \['min_resoltion'\]"),
        ({"patch": {"min_resolution": -64}}, "in `patch`: `min_resolution` must be a positive"),
        ({"patch": {"scaling_space": "bicubic"}}, "in `patch`: Unknown `scaling_space`"),
        ({"patch": {"upsampler": "flux9-x2"}}, "`patch.upsampler` 'flux9-x2' is neither shipped"),
        ({"patch": {"upsampler": 2}}, "`patch.upsampler` must be"),
        ("{not json", "lssgen.json is not valid JSON"),
        ("[256, 256]", "lssgen.json holds a JSON list"),
    ],
)
def test_a_bad_file_is_a_clear_error_naming_the_file_and_the_key(saved_flux, tmp_path, contents, key):
    folder = tmp_path / "model"
    shutil.copytree(saved_flux, folder)
    file = folder / "lssgen.json"
    file.write_text(contents if isinstance(contents, str) else json.dumps(contents))
    with pytest.raises(ValueError, match=f"{re.escape(str(folder))}.*{key}"):
        lssgen.load_pipeline(folder)


def test_a_file_broken_after_loading_is_reported_by_patch(flux2_folder):
    pipe = _load_flux2(flux2_folder)
    (flux2_folder / "lssgen.json").write_text(json.dumps({"patch": {"min_resolution": "64"}}))
    with pytest.raises(ValueError, match=f"{re.escape(str(flux2_folder / 'lssgen.json'))}: in `patch`: `min_res"):
        lssgen.patch(pipe)
    assert not lssgen.is_patched(pipe)


# --- the shipped scene model ---------------------------------------------------------------------------------------
@pytest.mark.usefixtures("taef2_dir")  # skips without taef2's weights, fails under CI
def test_the_shipped_scene_model_is_called_as_it_was_trained():
    assert "scene-t2i" in shipped()
    from lssgen.scenes.model import TrainSettings, folder_defaults

    folder = weights_path("scene-t2i")
    # The shipped file is the one the trainer writes.
    assert lssgen.model_defaults(folder) == ModelDefaults(
        **{**vars(folder_defaults(TrainSettings(out="", taef2=""))), "folder": folder}
    )
    pipe = lssgen.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    assert lssgen.model_defaults(pipe).call_arguments() == {
        "height": 256,
        "width": 256,
        "num_inference_steps": 20,
        "guidance_scale": 4.0,
        "max_sequence_length": 32,
    }
    image = pipe(prompt="a photo of a red star", num_inference_steps=2, max_sequence_length=32).images[0]
    assert image.size == (256, 256)  # the stock call with no size: the native size, not 1024 px
    lssgen.patch(pipe)
    plan = lssgen.plan_for(pipe)
    assert [stage.height for stage in plan.stages] == [64, 128, 256]
    assert pipe._lssgen.upsampler.config.block_out_channels == _shipped_flux2_x2().config.block_out_channels
    assert "learned upsampler" in plan.describe()


def test_the_scene_model_trainer_writes_the_file(tmp_path, taef2_dir):
    from lssgen.scenes import model as scene_model

    out = tmp_path / "scene-t2i"
    settings = scene_model.TrainSettings(
        out=str(out), taef2=str(taef2_dir), work=str(tmp_path / "work"), scenes=4, steps=1, batch=2, threads=1,
        checkpoint_every=1, sample_every=1000, samples=1, channels="8,16",
    )  # fmt: skip
    scene_model.train(settings)
    written = lssgen.model_defaults(out)
    assert written.call_arguments() == {**lssgen.model_defaults(weights_path("scene-t2i")).call_arguments()}
    assert written.patch == {"base_height": 256, "base_width": 256, "min_resolution": 64, "upsampler": "flux2-x2"}


def test_load_pipeline_imports_the_components_the_folder_names(taef2_dir):
    # diffusers loads a component of a library outside its own list only from a module already imported, and
    # `import lssgen` imports no tool: in a fresh process, load_pipeline must import lssgen.scenes.denoiser and
    # lssgen.autoencoders.flux2 itself.
    script = (
        "import sys, lssgen\n"
        "assert 'lssgen.scenes.denoiser' not in sys.modules\n"
        "pipe = lssgen.load_pipeline(lssgen.weights_path('scene-t2i'))\n"
        "print(type(pipe.transformer).__name__, type(pipe.vae).__name__)\n"
    )
    env = {**os.environ, "LSSGEN_TAEF2": str(taef2_dir)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["SceneDenoiser", "TinyFlux2Autoencoder"]
