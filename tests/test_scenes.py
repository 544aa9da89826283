"""The scene renderer: deterministic, the whole vocabulary, ground truth that matches the pixels and the caption."""

import numpy as np
import pytest
from PIL import Image

from lssgen.scenes.world import (
    ATTRIBUTES,
    CATEGORIES,
    COLOURS,
    EVALUATION_PER_CATEGORY,
    EVALUATION_SEED,
    SHAPES,
    TEXTURES,
    Check,
    Wanted,
    caption_for,
    evaluation_scenes,
    parse_caption,
    relation_holds,
    render,
    render_with_labels,
    sample_scene,
    satisfies,
    wrong_check,
)

SCENES = [sample_scene(7, i) for i in range(120)]


def test_same_seed_same_scene_and_pixels_other_seed_other_scene():
    first, again = sample_scene(3, 11), sample_scene(3, 11)
    assert first == again
    assert np.array_equal(np.asarray(render(first, 64)), np.asarray(render(again, 64)))
    others = [sample_scene(4, 11), sample_scene(3, 17)]  # index 17 is the same category as 11
    assert all(other.category == first.category and other != first for other in others)
    for other in others:
        difference = np.abs(np.asarray(render(first, 64), float) - np.asarray(render(other, 64), float)).mean()
        assert difference > 10


def test_every_category_shape_colour_and_texture_appears():
    assert [scene.category for scene in SCENES[:6]] == list(CATEGORIES)
    assert {o.shape for scene in SCENES for o in scene.objects} == set(SHAPES)
    assert {o.colour for scene in SCENES for o in scene.objects} == set(COLOURS)
    assert {scene.texture for scene in SCENES} == set(TEXTURES)
    counts = {w.count for scene in SCENES if scene.category == "counting" for w in scene.check.wanted}
    assert counts == {1, 2, 3, 4}
    assert {scene.check.relation for scene in SCENES if scene.category == "position"} == {
        "left of",
        "right of",
        "above",
        "below",
    }
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and set(ATTRIBUTES) == set(CATEGORIES)


def test_captions_parse_back_to_the_check_and_the_objects_satisfy_it():
    for scene in SCENES:
        assert parse_caption(scene.caption) == scene.check, scene.caption
        assert satisfies(scene.check, scene.objects), scene.caption
        # A deliberately wrong caption: another shape, count, colour, the opposite side, swapped colours.
        wrong = wrong_check(scene.check, np.random.default_rng(0))
        assert wrong.category == scene.category and not satisfies(wrong, scene.objects), caption_for(wrong)
        assert parse_caption(caption_for(wrong)) == wrong
    assert SCENES[2].caption.startswith("a photo of ")
    assert caption_for(Check("colors", (Wanted("star", "orange"),))) == "a photo of an orange star"
    assert caption_for(Check("counting", (Wanted("cross", count=3),))) == "a photo of three crosses"
    assert parse_caption("A photo of  a Red circle and a blue square.").category == "color_attr"


@pytest.mark.parametrize(
    "caption",
    ["a photo of a dog", "a photo of a orange star", "a photo of three circle", "a photo of five stars", ""],
)
def test_a_caption_outside_the_vocabulary_is_a_clear_error(caption):
    with pytest.raises(ValueError, match="not in the scene vocabulary.*shapes: circle"):
        parse_caption(caption)


def test_relations_are_unambiguous_in_position_scenes():
    positions = [scene for scene in SCENES if scene.category == "position"]
    for scene in positions:
        a, b = scene.objects
        assert relation_holds(a.centre, b.centre, scene.check.relation)
        assert not relation_holds(b.centre, a.centre, scene.check.relation)
    assert relation_holds((0.2, 0.5), (0.8, 0.55), "left of") and not relation_holds((0.2, 0.1), (0.3, 0.9), "left of")


def test_ground_truth_agrees_with_the_pixels():
    for scene in SCENES[:36]:
        image, labels = render_with_labels(scene, 128)
        pixels = np.asarray(image, dtype=float)
        for number, obj in enumerate(scene.objects, start=1):
            covered = labels == number
            # Its label covers a good part of its box, around its centre, in its colour.
            assert covered.sum() > 0.25 * (obj.size * 128) ** 2, (scene.caption, obj)
            ys, xs = np.nonzero(covered)
            assert abs(xs.mean() / 128 - obj.centre[0]) < 0.3 * obj.size, (scene.caption, obj)
            assert abs(ys.mean() / 128 - obj.centre[1]) < 0.3 * obj.size, (scene.caption, obj)
            inner = covered & np.roll(covered, 2, 0) & np.roll(covered, -2, 0) & np.roll(covered, 2, 1)
            colour = np.median(pixels[inner & np.roll(covered, -2, 1)], axis=0)
            assert np.abs(colour - COLOURS[obj.colour]).max() < 40, (scene.caption, obj, colour)
        # Objects never touch: each is its own connected region, with background between them.
        if len(scene.objects) > 1:
            grown = np.stack([labels == n for n in range(1, len(scene.objects) + 1)])
            grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1) | np.roll(grown, 1, 2) | np.roll(grown, -1, 2)
            assert grown.sum(0).max() == 1


def test_the_same_scene_at_64_128_and_256_px():
    for scene in SCENES[:6]:
        small = np.asarray(render(scene, 64), float)
        for size in (128, 256):
            reduced = np.asarray(render(scene, size).resize((64, 64), Image.BOX), float)
            assert np.abs(reduced - small).mean() < 6, (scene.caption, size)


def test_backgrounds_have_fine_detail_and_stay_muted():
    for scene in SCENES[:10]:
        image, labels = render_with_labels(scene, 256)
        pixels = np.asarray(image, float) / 255
        background = labels == 0
        # Pixel-to-pixel variation (detail the full-size stage must add), beyond what a smooth gradient has.
        for axis in (0, 1):
            step = np.abs(np.diff(pixels, axis=axis)).mean(-1)
            inside = (background[1:] & background[:-1]) if axis == 0 else (background[:, 1:] & background[:, :-1])
            assert step[inside].mean() > 0.01, (scene.texture, axis)
        saturation = pixels.max(-1) - pixels.min(-1)
        assert np.median(saturation[background]) < 0.25, scene.texture


def test_photo_backgrounds(tmp_path):
    rng = np.random.default_rng(0)
    photo = (rng.uniform(0, 255, (300, 400, 3))).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    scene = SCENES[0]
    with_photo = np.asarray(render(scene, 64, photos=[tmp_path / "photo.png"]))
    assert np.array_equal(with_photo, np.asarray(render(scene, 64, photos=[str(tmp_path / "photo.png")])))
    assert not np.array_equal(with_photo, np.asarray(render(scene, 64)))


def test_evaluation_scenes_are_fixed_and_held_out():
    scenes = evaluation_scenes()
    assert len(scenes) == EVALUATION_PER_CATEGORY * len(CATEGORIES) == 96
    assert {c: sum(s.category == c for s in scenes) for c in CATEGORIES} == dict.fromkeys(
        CATEGORIES, EVALUATION_PER_CATEGORY
    )
    assert scenes == evaluation_scenes()
    assert scenes[0] == sample_scene(EVALUATION_SEED, 0)
    training = {scene.caption for seed in range(3) for scene in (sample_scene(seed, i) for i in range(48))}
    assert len(training & {s.caption for s in scenes}) < 48  # captions recur (a small vocabulary), scenes do not
    assert not {s.seed for s in scenes} & {sample_scene(0, i).seed for i in range(48)}


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="category 'colour' is not one of single_object"):
        sample_scene(0, 0, category="colour")
    with pytest.raises(ValueError, match="size must be an integer of at least 8"):
        render(SCENES[0], 4)
    assert sample_scene(0, 5, category="counting").category == "counting"
