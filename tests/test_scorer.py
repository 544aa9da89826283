"""The scene scorer: the committed weights judge fresh renders right, wrong captions wrong; saving, the CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lssgen.scenes.scorer import TRAIN_SEED, SceneScorer, _connected_regions, main
from lssgen.scenes.world import ATTRIBUTES, CATEGORIES, caption_for, render, sample_scene, wrong_check

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "scene-scorer"
FRESH_SEED = 12345  # no training run or report uses it
PER_CATEGORY = 16


@pytest.fixture(scope="module")
def scorer():
    return SceneScorer.from_pretrained(WEIGHTS).eval()


@pytest.fixture(scope="module")
def fresh():
    scenes = [sample_scene(FRESH_SEED, i) for i in range(PER_CATEGORY * len(CATEGORIES))]
    return scenes, [render(scene, 128) for scene in scenes]


def test_the_committed_scorer_judges_fresh_renders(scorer, fresh):
    assert FRESH_SEED != TRAIN_SEED
    scenes, images = fresh
    rng = np.random.default_rng(0)
    right = scorer.score(images, scenes)
    wrong = scorer.score(images, [wrong_check(scene.check, rng) for scene in scenes])
    for attribute in set(ATTRIBUTES.values()):
        picked = [i for i, scene in enumerate(scenes) if ATTRIBUTES[scene.category] == attribute]
        accepted = np.mean([right[i].passed for i in picked])
        rejected = np.mean([not wrong[i].passed for i in picked])
        assert accepted >= 0.95 and rejected >= 0.95, (attribute, accepted, rejected)
    assert {result.attribute for result in right} == set(ATTRIBUTES.values())
    # What it saw: the drawn objects' shapes and colours, near their centres.
    for scene, result in zip(scenes[:12], right[:12]):
        assert sorted((o.shape, o.colour) for o in result.found) == sorted((o.shape, o.colour) for o in scene.objects)


@pytest.mark.parametrize("category", ["counting", "position", "color_attr", "colors"])
def test_a_deliberately_wrong_caption_is_scored_false(scorer, category):
    scene = sample_scene(FRESH_SEED + 1, 0, category=category)
    wrong = caption_for(wrong_check(scene.check))  # wrong count, swapped sides, swapped colours, other colour
    image = render(scene, 256)
    right_result, wrong_result = scorer.score([image, image], [scene.caption, wrong])
    assert right_result.passed and right_result.caption == scene.caption
    assert not wrong_result.passed and wrong_result.category == category, wrong


def test_saved_and_loaded_scorer_is_the_same_and_takes_tensors(scorer, fresh, tmp_path):
    scorer.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert sum(p.stat().st_size for p in WEIGHTS.glob("*.safetensors")) < 3 * 2**20
    loaded = SceneScorer.from_pretrained(tmp_path).eval()
    scenes, images = fresh
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255) for image in images[:6]])
    pixels = pixels.permute(0, 3, 1, 2)
    assert torch.equal(scorer(scorer.prepare(pixels))[0], loaded(loaded.prepare(pixels))[0])
    from_pil = [r.passed for r in scorer.score(images[:6], scenes[:6])]
    assert [r.passed for r in scorer.score(pixels, [s.caption for s in scenes[:6]])] == from_pil


def test_features_work_as_a_kid_feature_module(scorer, fresh):
    scenes, images = fresh
    pixels = torch.stack([torch.from_numpy(np.array(image)) for image in images[:24]]).permute(0, 3, 1, 2)
    features = scorer.features(pixels.float() / 255)
    assert features.shape == (24, 2 * scorer.config.block_out_channels[-1]) and torch.isfinite(features).all()
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    kid = kid_module.KernelInceptionDistance(feature=scorer.feature_extractor(), subset_size=8, subsets=5)
    kid.update(pixels[:12], real=True)
    kid.update(pixels[12:], real=False)
    mean, std = kid.compute()
    assert torch.isfinite(mean) and torch.isfinite(std)


def test_bad_input_is_a_clear_error(scorer, fresh):
    scenes, images = fresh
    with pytest.raises(ValueError, match="not in the scene vocabulary"):
        scorer.score(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError, match="2 images but 1 scenes"):
        scorer.score(images[:2], scenes[:1])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) tensor"):
        scorer.score(torch.zeros(1, 64, 64), scenes[:1])


def test_connected_regions_are_8_connected():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 3, 3] = True  # touches the first block at a corner
    mask[0, 6:8, 5:8] = True
    labels = _connected_regions(mask)
    assert len(labels.unique()) == 3 and labels[0, 3, 3] == labels[0, 1, 1] != labels[0, 7, 7]


def test_train_resume_and_evaluate_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "scorer"
    common = ["--pool", "12", "--batch-size", "4", "--report-scenes", "12", "--save-every", "1"]
    assert main(["train", "--out", str(out), "--steps", "2", "--classifier-steps", "1", *common]) == 0
    card = (out / "README.md").read_text()
    assert card.count("| single_object (object) |") == 1 and "--classifier-steps 1" in card
    assert main(["train", "--out", str(out), "--steps", "2", *common]) == 2
    assert "not empty. Pass --resume" in capsys.readouterr().err
    # Resumed in the second stage (the shape classifier), up to a larger step count.
    assert main(["train", "--out", str(out), "--steps", "2", "--classifier-steps", "2", "--resume", *common]) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    assert main(["evaluate", "--scorer", str(out), "--scenes", "6"]) == 0
    assert "| color_attr (attribution) |" in capsys.readouterr().out
    assert main(["evaluate", "--scorer", str(tmp_path / "missing"), "--scenes", "6"]) == 2
