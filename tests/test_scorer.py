"""The scene scorer: the committed weights judge fresh renders right, wrong captions wrong; saving, the CLI."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lssgen.scenes.scorer import (
    MAX_OBJECTS,
    MERGE_DISTANCES,
    THRESHOLDS,
    TRAIN_SEED,
    TUNING_HEADING,
    VALIDATION_SEED,
    SceneScorer,
    _object_rows,
    _objects,
    _targets,
    hard_training_scene,
    main,
    render_pool,
    tune_decoding,
)
from lssgen.scenes.world import (
    ATTRIBUTES,
    CATEGORIES,
    COLOURS,
    LAYOUTS,
    SHAPES,
    caption_for,
    render,
    sample_hard_scene,
    sample_scene,
    wrong_check,
)

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


def _perfect_maps(objects, side, offset=(0, 0), crop=None):
    """What a perfect network would output for `objects` rows: the training targets, as probabilities, colour logits
    and log sizes (zero where none)."""
    centres, colours, sizes = _targets(objects[None], side, torch.tensor([offset]), crop or side)
    colour_logits = torch.nn.functional.one_hot(colours[0].clamp(min=0), len(COLOURS)).permute(2, 0, 1).float()
    return centres[0], colour_logits, sizes[0].nan_to_num(0)[None]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_targets_decode_back_to_every_object_even_touching_or_partly_hidden(layout):
    # 16 objects at a third of the usual size: small, and in pairs touching or hiding up to 40% of each other.
    scene = sample_hard_scene(7, 0, 16, scale=0.33, layout=layout)
    side = 128  # the map of a 256 px scorer
    found = _objects(*_perfect_maps(_object_rows(scene), side), threshold=0.3, merge_distance=0.3)
    assert len(found) == len(scene.objects) == 16
    for obj in scene.objects:  # each once, at its centre's map pixel, with its shape, colour and size
        (match,) = [o for o in found if max(abs(a - b) for a, b in zip(o.centre, obj.centre)) <= 0.5 / side]
        assert (match.shape, match.colour) == (obj.shape, obj.colour)
        assert match.size == pytest.approx(obj.size, rel=1e-4)


def test_targets_of_a_window_are_that_window_of_the_whole_maps():
    objects = _object_rows(hard_training_scene(TRAIN_SEED, 5))
    whole = _targets(objects[None], 128, torch.tensor([[0, 0]]), 128)
    window = _targets(objects[None], 128, torch.tensor([[40, 16]]), 64)
    assert torch.equal(window[0], whole[0][..., 16:80, 40:104]) and torch.equal(window[1], whole[1][..., 16:80, 40:104])
    assert torch.equal(window[2].isnan(), whole[2][..., 16:80, 40:104].isnan())
    assert (whole[0] == 1).sum() == (objects[:, 0] >= 0).sum()  # one centre pixel per object


def test_peaks_of_one_object_are_one_object_and_weak_peaks_none():
    centres = torch.zeros(len(SHAPES), 64, 64)
    centres[SHAPES.index("star"), 20, 20] = 0.9
    centres[SHAPES.index("star"), 20, 23] = 0.8  # 3 px away, for a star 16 px wide: the same star
    centres[SHAPES.index("circle"), 40, 40] = 0.6  # a circle, of its own
    centres[SHAPES.index("heart"), 10, 50] = 0.2  # under the threshold: nothing
    colours = torch.zeros(len(COLOURS), 64, 64)
    colours[list(COLOURS).index("red")] = 1
    sizes = torch.full((1, 64, 64), math.log(16))
    found = _objects(centres, colours, sizes, threshold=0.3, merge_distance=0.3)
    assert [(o.shape, o.colour, o.centre) for o in found] == [
        ("star", "red", (20.5 / 64, 20.5 / 64)),
        ("circle", "red", (40.5 / 64, 40.5 / 64)),
    ]
    assert found[0].size == pytest.approx(16 / 64)
    # Smaller objects are nearer than that apart: two stars 8 px wide, 3 px apart, are two.
    assert len(_objects(centres, colours, sizes - math.log(2), threshold=0.3, merge_distance=0.3)) == 3


def test_the_pool_holds_ordinary_and_hard_scenes_with_their_objects():
    pool = render_pool(TRAIN_SEED, 2, 64, hard=2, progress=False)
    assert pool["images"].shape == (4, 3, 64, 64) and pool["images"].dtype == torch.uint8
    assert pool["objects"].shape == (4, MAX_OBJECTS, 5)
    scenes = [sample_scene(TRAIN_SEED, 0), sample_scene(TRAIN_SEED, 1)]
    scenes += [hard_training_scene(TRAIN_SEED, 0), hard_training_scene(TRAIN_SEED, 1)]
    for rows, scene in zip(pool["objects"], scenes, strict=True):
        assert torch.equal(rows, _object_rows(scene)) and int((rows[:, 0] >= 0).sum()) == len(scene.objects)
    assert len(hard_training_scene(TRAIN_SEED, 0).objects) >= 2


def test_tuning_picks_the_pair_that_counts_best(monkeypatch):
    # The network's maps are the validation scenes' targets, plus a weaker peak (0.28) 8 map pixels right of every
    # centre: thresholds under 0.28 count a ghost beside every object; 0.3 and above count exactly what was drawn.
    scenes = [hard_training_scene(VALIDATION_SEED, i) for i in range(3)] + [sample_scene(VALIDATION_SEED, 0)]
    side = 32  # the map of a 64 px scorer
    rows = torch.stack([_object_rows(scene) for scene in scenes])
    centres, colours, sizes = _targets(rows, side, torch.zeros(4, 2, dtype=torch.long), side)
    centres = torch.maximum(centres, (centres == 1).roll(8, dims=-1) * 0.28)
    colour_logits = torch.nn.functional.one_hot(colours.clamp(min=0), len(COLOURS)).permute(0, 3, 1, 2) * 10.0
    maps = (centres.clamp(1e-6, 1 - 1e-6).logit(), colour_logits, sizes.nan_to_num(0)[:, None])
    scorer = SceneScorer(resolution=64)
    monkeypatch.setattr(scorer, "forward", lambda pixels: tuple(m[: len(pixels)] for m in maps))
    tuned = tune_decoding(scorer, hard=3, ordinary=1, progress=False)
    assert set(tuned["right"]) == {(t, m) for t in THRESHOLDS for m in MERGE_DISTANCES} and tuned["images"] == 4
    assert all(tuned["right"][t, m] == 1 for t in THRESHOLDS if t >= 0.3 for m in MERGE_DISTANCES)
    assert all(tuned["right"][t, m] == 0 for t in THRESHOLDS if t < 0.28 for m in MERGE_DISTANCES)
    assert tuned["threshold"] >= 0.3
    assert (scorer.config.threshold, scorer.config.merge_distance) == (tuned["threshold"], tuned["merge_distance"])


def test_train_resume_and_evaluate_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "scorer"
    common = ["--pool", "6", "--hard-pool", "6", "--crop", "64", "--batch-size", "4", "--report-scenes", "12"]
    common += ["--save-every", "1", "--tune-scenes", "2", "2"]
    assert main(["train", "--out", str(out), "--steps", "2", *common]) == 0
    card = (out / "README.md").read_text()
    assert card.count("| single_object (object) |") == 1 and "--hard-pool 6" in card
    assert main(["train", "--out", str(out), "--steps", "2", *common]) == 2
    assert "not empty. Pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--steps", "3", "--resume", *common]) == 0  # up to a larger step count
    assert "resuming from step 2" in capsys.readouterr().out
    # The card says how every step was made: the first run's command, then the resumed one's.
    card = (out / "README.md").read_text()
    assert "--steps 2 --pool 6" in card and "# to step 2`; then `" in card and "--steps 3 --resume" in card
    assert main(["train", "--out", str(out / "odd"), "--steps", "1", *common[:4], "--crop", "63"]) == 2
    assert "--crop must be an even number" in capsys.readouterr().err
    # Tuning in place: the chosen pair lands in config.json, and the card's section is replaced, not added again.
    assert main(["tune", "--scorer", str(out), "--hard", "3", "--ordinary", "1"]) == 0
    config = SceneScorer.load_config(out)
    assert (config["threshold"], config["merge_distance"]) in {(t, m) for t in THRESHOLDS for m in MERGE_DISTANCES}
    card = (out / "README.md").read_text()
    assert card.count(TUNING_HEADING) == 1 and "on 4 validation renders" in card and "| single_object" in card
    # A fine-tune starts from another scorer's weights: at learning rate 0 it keeps them.
    assert main(["train", "--out", str(tmp_path / "tuned"), "--init", str(out), "--steps", "1", "--lr", "0",
                 *common]) == 0  # fmt: skip
    before, after = SceneScorer.from_pretrained(out), SceneScorer.from_pretrained(tmp_path / "tuned")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert main(["train", "--out", str(tmp_path / "both"), "--init", str(out), "--resume", *common]) == 2
    assert "--init starts a new run from a scorer, --resume continues this one" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--init", str(tmp_path / "missing"), *common]) == 2
    assert f"--init {tmp_path / 'missing'}" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["evaluate", "--scorer", str(out), "--scenes", "6"]) == 0
    assert "| color_attr (attribution) |" in capsys.readouterr().out
    assert main(["evaluate", "--scorer", str(tmp_path / "missing"), "--scenes", "6"]) == 2
