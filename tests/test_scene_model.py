"""The scene model (`lssgen.scenes.model`): its folder is a stock `Flux2KleinPipeline` with taef2 as the VAE, string
prompts go through its own tokenizer and text encoder, lssgen's FLUX.2 route runs on it, and training learns and
resumes exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file

import lssgen
from lssgen.autoencoders.flux2 import STATISTICS_FILE, TAEF2_ENV, TinyFlux2Autoencoder, find_taef2
from lssgen.scenes import model as scene_model
from lssgen.scenes import world as scenes
from lssgen.scenes.denoiser import SceneDenoiser
from lssgen.scenes.model import TrainSettings, _Trainer, build_pipeline, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _taef2() -> Path | None:
    try:
        return find_taef2()
    except FileNotFoundError:
        return None


TAEF2 = _taef2()
# The tests on taef2's weights skip without them, and fail under CI (tests/conftest.py's `taef2_dir`).
needs_taef2 = pytest.mark.usefixtures("taef2_dir")
TINY = "8,16"  # U-Net channels per level


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """An untrained scene model (random taef2-shaped VAE with non-trivial BN statistics) saved and loaded back with
    the stock loader."""
    vae = TinyFlux2Autoencoder()
    vae.set_latent_statistics(torch.randn(2, 32, 8, 8) * 0.7 + 0.2)
    folder = tmp_path_factory.mktemp("scene-model")
    build_pipeline(vae, seed=0, channels=scene_model.parse_channels(TINY)).save_pretrained(folder)
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, vae, pipe


def test_the_folder_loads_with_the_stock_loader(saved_pipeline):
    folder, vae, pipe = saved_pipeline
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["lssgen.autoencoders.flux2", "TinyFlux2Autoencoder"]
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert index["transformer"] == ["lssgen.scenes.denoiser", "SceneDenoiser"]
    assert isinstance(pipe.transformer, SceneDenoiser) and pipe.transformer.config.in_channels == 128
    assert isinstance(pipe.vae, TinyFlux2Autoencoder) and pipe.vae_scale_factor == 8
    assert torch.equal(pipe.vae.bn.running_mean, vae.bn.running_mean)
    assert torch.equal(pipe.vae.bn.running_var, vae.bn.running_var)
    for name, weights in vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], weights), name


def test_string_prompts_go_through_the_pipelines_own_encoder(saved_pipeline):
    _, _, pipe = saved_pipeline
    # The pipeline's defaults: 512 tokens, hidden states 9, 18 and 27 of the 28-layer encoder.
    embeds, _ = pipe.encode_prompt(["a photo of a red star", "a photo of a blue star", "a photo of a red star"])
    assert embeds.shape == (3, 512, 3 * scene_model.TEXT_WIDTH)
    assert torch.equal(embeds[0], embeds[2]) and not torch.allclose(embeds[0], embeds[1])
    images = pipe(
        prompt=["a photo of three circles", "a photo of a star left of a heart"],
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=32,
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_the_denoiser_reads_flux2_patches_as_the_pipeline_lays_them_out(saved_pipeline):
    _, _, pipe = saved_pipeline
    latents = torch.randn(2, 32, 6, 10)  # a non-square 3x5-token grid
    patches = Flux2KleinPipeline._patchify_latents(latents)
    tokens = Flux2KleinPipeline._pack_latents(patches)
    ids = Flux2KleinPipeline._prepare_latent_ids(patches)
    seen = {}
    hook = pipe.transformer.unet.register_forward_pre_hook(lambda module, args: seen.update(sample=args[0]))
    try:
        with torch.no_grad():
            out = pipe.transformer(hidden_states=tokens, encoder_hidden_states=torch.randn(2, 4, 96),
                                   timestep=torch.tensor([0.5, 0.5]), img_ids=ids, return_dict=False)[0]  # fmt: skip
    finally:
        hook.remove()
    assert torch.equal(seen["sample"], latents)  # the U-Net sees the unpatchified latents
    assert out.shape == tokens.shape


def test_the_denoiser_refuses_ids_of_another_grid(saved_pipeline):
    """A stage denoised with the previous stage's position ids is an error, not a picture of the wrong size."""
    _, _, pipe = saved_pipeline
    tokens = torch.randn(1, 16, 128)
    stale = Flux2KleinPipeline._prepare_latent_ids(torch.empty(1, 128, 2, 2))  # 4 tokens' ids for 16 tokens
    with pytest.raises(ValueError, match="2x2 token grid"):
        pipe.transformer(hidden_states=tokens, encoder_hidden_states=torch.randn(1, 4, 96),
                         timestep=torch.tensor([0.5]), img_ids=stale)  # fmt: skip


def test_channels_are_checked():
    assert scene_model.parse_channels("32,64,128") == (32, 64, 128)
    for bad in ("32", "32,x", "32,60"):
        with pytest.raises(ValueError, match="multiples of 8"):
            scene_model.parse_channels(bad)


def test_caption_words_are_single_tokens_in_the_chat_template():
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a photo of an orange crescent and a blue heart"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokens = tokenizer.tokenize(text)
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"] and "Ġcrescent" in tokens and "Ġorange" in tokens
    longest = max(scene_model.all_captions(), key=lambda caption: len(tokenizer.tokenize(caption)))
    assert len(tokenizer.tokenize(longest)) == len(longest.split())


@pytest.mark.parametrize("space", ["learned", "latent", "pixel"])
def test_a_three_stage_plan_with_flux2_x2_runs_on_it(saved_pipeline, space):
    _, _, pipe = saved_pipeline
    upsampler = lssgen.LatentUpsampler.from_pretrained(ROOT / "weights" / "flux2-x2")
    lssgen.patch(pipe, upsampler)
    try:
        options = {"min_resolution": 64, "scaling_space": space, "num_inference_steps": 4}
        plan = lssgen.plan_for(pipe, 256, 256, **options)
        assert [stage.height for stage in plan.stages] == [64, 128, 256]
        images = pipe(prompt="a photo of a red star", height=256, width=256, max_sequence_length=32,
                      output_type="pt", **options).images  # fmt: skip
    finally:
        lssgen.unpatch(pipe)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def _settings(tmp_path, name, **overrides):
    values = dict(out=str(tmp_path / name), taef2=str(TAEF2), scenes=4, steps=2, batch=2, threads=1,
                  checkpoint_every=1, sample_every=1000, samples=1, channels=TINY)  # fmt: skip
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The latent cache of the 4 scenes the training tests use, built once (rendering and encoding take seconds)."""
    work = tmp_path_factory.mktemp("cache-work")
    trainer = _Trainer(_settings(work, "out", work=str(work)), "")
    return work / scene_model.CACHE, trainer


@needs_taef2
def test_a_training_step_lowers_the_loss_of_its_batch(cache):
    _, trainer = cache
    before, size = trainer.loss_at(0, trainer.transformer)
    assert size == 256 and torch.isfinite(before)
    for _ in range(3):
        trainer.train_step(0)
    after, _ = trainer.loss_at(0, trainer.transformer)
    assert after.item() < before.item()
    # The BN statistics are the training latents': the normalised tokens the transformer sees are unit-scale.
    tokens = torch.cat([t.flatten(0, 1) for t in trainer.tokens.values()])
    assert tokens.std().item() == pytest.approx(1.0, abs=0.25)


@needs_taef2
def test_resume_continues_exactly_where_it_stopped(tmp_path, cache):
    cached, _ = cache
    for run in ("straight", "resumed"):
        shutil.copytree(cached, tmp_path / f"{run}.work" / scene_model.CACHE)
    straight = _settings(tmp_path, "straight", work=str(tmp_path / "straight.work"), steps=3)
    scene_model.train(straight)
    first = _settings(tmp_path, "resumed", work=str(tmp_path / "resumed.work"), steps=2)
    scene_model.train(first)
    scene_model.train(_settings(tmp_path, "resumed", work=str(tmp_path / "resumed.work"), steps=3, resume=True))
    # taef2's weights are never written (not ours to redistribute): the VAE folder is its config and BN statistics.
    assert sorted(p.name for p in (tmp_path / "resumed" / "vae").iterdir()) == ["config.json", STATISTICS_FILE]
    for part in ("transformer/diffusion_pytorch_model.safetensors", f"vae/{STATISTICS_FILE}"):
        a = load_file(tmp_path / "straight" / part)
        b = load_file(tmp_path / "resumed" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    history = json.loads((tmp_path / "resumed" / scene_model.HISTORY_FILE).read_text())
    assert [h["step"] for h in history["history"]] == [1, 2, 3]
    assert [(r["from_step"], r["to_step"]) for r in history["runs"]] == [(0, 2), (2, 3)]
    card = (tmp_path / "resumed" / "README.md").read_text()
    assert "--resume" in card and "Step 3 of" in card and (tmp_path / "resumed" / "samples.png").is_file()
    loaded = Flux2KleinPipeline.from_pretrained(tmp_path / "resumed")
    assert isinstance(loaded.vae, TinyFlux2Autoencoder)
    taef2 = TinyFlux2Autoencoder.from_taesd_folder(TAEF2).encoder.state_dict()
    assert all(torch.equal(taef2[k], v) for k, v in loaded.vae.encoder.state_dict().items())


@needs_taef2
def test_a_taef2_vae_saves_no_taef2_weights_and_says_where_to_find_them(tmp_path, monkeypatch):
    vae = TinyFlux2Autoencoder.from_taesd_folder(TAEF2)
    vae.set_latent_statistics(torch.randn(2, 32, 4, 4) * 3 + 1)
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", STATISTICS_FILE]
    monkeypatch.setenv(TAEF2_ENV, str(TAEF2))
    loaded = TinyFlux2Autoencoder.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    expected = vae.to(torch.bfloat16).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    monkeypatch.setenv(TAEF2_ENV, str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no taef2 folder was found.*{TAEF2_ENV}") as missing:
        TinyFlux2Autoencoder.from_pretrained(tmp_path / "vae", taef2=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(missing.value)


@needs_taef2
def test_bad_arguments_are_clear_errors(tmp_path, cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scene_model.main(["train", "--out", str(tmp_path / "out"), "--taef2", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and "--taef2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scene_model.main(["train", "--out", str(tmp_path / "out"), "--taef2", str(TAEF2), "--resume"])
    assert "no checkpoint" in capsys.readouterr().err
    cached, _ = cache
    work = tmp_path / "work"
    shutil.copytree(cached, work / scene_model.CACHE)
    scene_model.train(_settings(tmp_path, "out", work=str(work), steps=1))
    with pytest.raises(ValueError, match="--lr 0.001 \\(now 0.002\\)"):
        scene_model.train(_settings(tmp_path, "out", work=str(work), steps=2, lr=2e-3, resume=True))
    with pytest.raises(ValueError, match="pass --resume"):
        scene_model.train(_settings(tmp_path, "out", work=str(work), steps=2))


def test_scene_captions_are_all_known():
    captions = set(scene_model.all_captions())
    assert all(scenes.sample_scene(0, i).caption in captions for i in range(60))
    assert all(scene.caption in captions for scene in scenes.evaluation_scenes())


def test_evaluate_scores_every_held_out_prompt_per_category(saved_pipeline):
    from lssgen.scenes.scorer import SceneScorer

    _, _, pipe = saved_pipeline
    scorer = SceneScorer.from_pretrained(ROOT / "weights" / "scene-scorer")
    report = scene_model.evaluate_model(pipe, scorer, height=64, width=64, num_inference_steps=1,
                                        max_sequence_length=32)  # fmt: skip
    assert list(report) == list(scenes.CATEGORIES)
    for numbers in report.values():
        assert numbers["images"] == scenes.EVALUATION_PER_CATEGORY
        assert 0 <= numbers["accuracy"] <= 1 and 0 <= numbers["chance"] <= 1


def test_object_tokens_cover_each_objects_box_and_check_the_cache():
    captions = [scenes.sample_scene(0, i).caption for i in range(6)]
    masks = scene_model.object_tokens(0, captions)
    for index in range(6):
        for size in scene_model.SIZES:
            side = size // 16
            grid = masks[size][index].view(side, side)
            for obj in scenes.sample_scene(0, index).objects:
                column, row = (int(v * side) for v in obj.centre)
                assert grid[row, column] == 1  # the token under each object's centre
            assert 0 < grid.mean() < 1
    # The largest object's box is 0.35 of the side: at 256 px it touches at most 7 of 16 tokens across.
    assert masks[256][0].view(16, 16).sum(dim=1).max() <= 7
    with pytest.raises(ValueError, match="holds other scenes"):
        scene_model.object_tokens(0, captions[1:])


def test_reference_tokens_are_accepted_and_ignored(saved_pipeline):
    """FLUX.2's pipelines append reference images' tokens (time id 10, 20, ...) after the generated image's:
    the scene model, trained without references, gives the generated tokens the same prediction as without them
    and zeros for the references; references placed first are refused."""
    _, _, pipe = saved_pipeline
    latents = torch.randn(1, 32, 4, 6)
    patches = Flux2KleinPipeline._patchify_latents(latents)
    tokens, ids = Flux2KleinPipeline._pack_latents(patches), Flux2KleinPipeline._prepare_latent_ids(patches)
    reference = torch.randn(1, 128, 4, 4)
    reference_tokens = Flux2KleinPipeline._pack_latents(reference)
    reference_ids = Flux2KleinPipeline._prepare_image_ids([reference])
    text = torch.randn(1, 4, 96)
    with torch.no_grad():
        alone = pipe.transformer(hidden_states=tokens, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                                 img_ids=ids, return_dict=False)[0]  # fmt: skip
        both = pipe.transformer(hidden_states=torch.cat([tokens, reference_tokens], dim=1), encoder_hidden_states=text,
                                timestep=torch.tensor([0.5]), img_ids=torch.cat([ids, reference_ids], dim=1),
                                return_dict=False)[0]  # fmt: skip
        assert torch.equal(both[:, : tokens.shape[1]], alone)
        assert torch.equal(both[:, tokens.shape[1] :], torch.zeros_like(reference_tokens))
        with pytest.raises(ValueError, match="reference tokens"):
            pipe.transformer(hidden_states=torch.cat([reference_tokens, tokens], dim=1), encoder_hidden_states=text,
                             timestep=torch.tensor([0.5]), img_ids=torch.cat([reference_ids, ids], dim=1))  # fmt: skip


@needs_taef2
def test_the_stock_inpaint_pipeline_runs_the_shipped_model_with_its_image_as_reference():
    """Flux2KleinInpaintPipeline loads the shipped scene model's folder and runs it: with a mask that repaints
    everything it is FLUX.2 klein's img2img (the pipeline appends the image's tokens as a reference)."""
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline.from_pretrained(lssgen.weights_path("scene-t2i"))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt="a photo of a red circle", image=image, mask_image=torch.ones(1, 1, 256, 256), strength=0.6,
               height=256, width=256, num_inference_steps=4, max_sequence_length=32, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
