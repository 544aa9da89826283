"""The duplication measure (`tally_instances`): extra and missing instances against a caption, counted exactly.

Hand-made detections, so every expected number is known; the renders the scorer reads are in test_hard_scenes.py.
"""

from lssgen.scenes.world import Check, InstanceTally, SceneObject, Wanted, parse_caption, satisfies, tally_instances


def found(shape: str, colour: str = "red", x: float = 0.5) -> SceneObject:
    return SceneObject(shape, colour, (x, 0.5), 0.1)


def test_exact_match_one_extra_one_missing_and_an_unnamed_object():
    check = parse_caption("a photo of a star and a circle")
    star, circle = found("star"), found("circle", "blue")
    assert tally_instances(check, [star, circle]) == InstanceTally(extra=0, missing=0)
    assert tally_instances(check, [circle, star]).exact
    assert tally_instances(check, [star, circle, found("star", "green")]) == InstanceTally(extra=1, missing=0)
    assert tally_instances(check, [star]) == InstanceTally(extra=0, missing=1)
    assert tally_instances(check, [star, circle, found("heart")]) == InstanceTally(extra=1, missing=0)
    assert tally_instances(check, []) == InstanceTally(extra=0, missing=2)
    assert not tally_instances(check, [star, circle, star]).exact and not tally_instances(check, [star]).exact
    # GenEval's rules let the duplicate and the unnamed object pass: what the measure is there to see.
    assert satisfies(check, [star, circle, star, found("heart")])


def test_counts_every_extra_instance_of_a_number_and_of_one():
    two_stars = parse_caption("a photo of two stars")
    # The failure above the native size: a dozen small stars for "two stars".
    assert tally_instances(two_stars, [found("star", x=i / 12) for i in range(12)]) == InstanceTally(10, 0)
    assert tally_instances(two_stars, [found("star"), found("star", "blue")]).exact
    assert tally_instances(two_stars, [found("star")]) == InstanceTally(extra=0, missing=1)
    assert tally_instances(two_stars, [found("star")] * 2 + [found("square")]) == InstanceTally(extra=1, missing=0)
    # No number in the caption means one: three triangles for "a triangle" are two extra.
    assert tally_instances(parse_caption("a photo of a triangle"), [found("triangle")] * 3) == InstanceTally(2, 0)


def test_a_named_colour_decides_which_objects_are_the_prompts():
    red_circle = parse_caption("a photo of a red circle")
    assert tally_instances(red_circle, [found("circle", "blue")]) == InstanceTally(extra=1, missing=1)
    assert tally_instances(red_circle, [found("circle", "blue"), found("circle")]) == InstanceTally(extra=1, missing=0)
    swapped = [found("circle", "blue"), found("square", "red")]
    assert tally_instances(parse_caption("a photo of a red circle and a blue square"), swapped) == InstanceTally(2, 2)
    # A coloured instance takes the object of its colour first, whatever the order: here both are filled.
    either_star_and_a_red_one = Check("two_object", (Wanted("star"), Wanted("star", "red")))
    assert tally_instances(either_star_and_a_red_one, [found("star", "red"), found("star", "blue")]).exact


def test_positions_play_no_part():
    check = parse_caption("a photo of a square left of a triangle")
    the_wrong_way_round = [found("triangle", x=0.2), found("square", x=0.8)]
    assert tally_instances(check, the_wrong_way_round).exact and not satisfies(check, the_wrong_way_round)
