r"""
Procedural compositional scenes with captions and ground truth, in the spirit of GenEval's six categories.

A scene is a few flat-coloured shapes (8 shapes x 8 colours) on a muted, finely textured background. Each comes
with a GenEval-style caption and the [`Check`] an image must pass to match it, so a text-to-image model can be
trained on the renders and judged on its own images by `lssgen.scenes.scorer`.

| category | caption | the check |
|---|---|---|
| `single_object` | a photo of a star | a star is there |
| `two_object` | a photo of a star and a circle | both are there |
| `counting` | a photo of three circles | exactly three circles |
| `colors` | a photo of a red star | a red star is there |
| `position` | a photo of a square left of a triangle | the square's centre is left of the triangle's |
| `color_attr` | a photo of a red circle and a blue square | a red circle and a blue square are there |

Scenes are deterministic in `(seed, index)` and unlimited. Seed ranges:

- seeds below `10**9` are for training and validation (the scene scorer trains on seed 0 and is validated on
  seed 1; its model card measures on seeds 2 and 3);
- `EVALUATION_SEED = 10**9` is reserved for [`evaluation_scenes`], the fixed held-out prompt set: train on no seed
  at or above it.

[`sample_hard_scene`] makes harder scenes than these, to check the scorer's counting: many objects, small ones,
touching or partly hidden ones, most of them copies of the caption's objects (what a model generating above its
native size draws).

Renders are the same scene at any size (geometry in fractions of the side, the background a continuous pattern
computed at twice the size and scaled down), antialiased by drawing the shapes at 4x and reducing.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "crescent", "heart")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
# Far apart in hue and lightness, so each stays itself through blur, noise and an autoencoder round trip.
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 64),
    "blue": (40, 84, 216),
    "yellow": (242, 212, 36),
    "orange": (247, 129, 16),
    "purple": (132, 52, 176),
    "white": (246, 246, 246),
    "black": (22, 22, 22),
}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ("one", "two", "three", "four")
TEXTURES = ("clouds", "grain", "weave", "gravel", "wood")
EVALUATION_SEED = 10**9
EVALUATION_PER_CATEGORY = 16  # 1 image is 6.25 points of a category's accuracy

SUPERSAMPLE = 4
# The background is computed at twice the render's side, at most this (or the render's side, if larger), then
# reduced: the same continuous pattern at every size, with detail down to the pixel.
BACKGROUND_SIDE = 512
MARGIN = 0.03  # free border around the scene, fraction of the side
GAP = 0.04  # free space between two objects' boxes: separate objects stay separate components
# A relation holds when the centres differ by more than this along its axis, and more along it than across.
RELATION_MIN_OFFSET = 0.1


@dataclass(frozen=True)
class SceneObject:
    r"""
    One shape of a scene.

    Args:
        shape (`str`): one of `SHAPES`.
        colour (`str`): one of `COLOURS`.
        centre (`tuple[float, float]`): (x, y) of its box's centre, fractions of the image side, y downwards.
        size (`float`): side of its square box, fraction of the image side.
    """

    shape: str
    colour: str
    centre: tuple[float, float]
    size: float


@dataclass(frozen=True)
class Wanted:
    r"""One thing a caption asks for: `count` objects of `shape`, of `colour` when it is not `None`."""

    shape: str
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Check:
    r"""
    What an image must show to match a caption.

    Args:
        category (`str`): one of `CATEGORIES`.
        wanted (`tuple[Wanted, ...]`): the objects named, in caption order. Each must be there (at least
            `count` times; exactly `count` times for `counting`).
        relation (`str`, *optional*): for `position`, one of `RELATIONS`: the first object is `relation` the second.
    """

    category: str
    wanted: tuple[Wanted, ...]
    relation: str | None = None


@dataclass(frozen=True)
class Scene:
    r"""
    A scene: its caption, what the caption checks, and the objects that satisfy it.

    Args:
        caption (`str`): GenEval-style prompt.
        category (`str`): one of `CATEGORIES`.
        objects (`tuple[SceneObject, ...]`): what is drawn.
        check (`Check`): what the scorer checks; `parse_caption(caption) == check`.
        texture (`str`): background texture, one of `TEXTURES` (or a photo crop when rendered with photos).
        seed (`int`): seeds the background and shading (derived from the `(seed, index)` it was sampled with).
    """

    caption: str
    category: str
    objects: tuple[SceneObject, ...]
    check: Check
    texture: str
    seed: int


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, colour: str | None = None) -> str:
    words = f"{colour} {shape}" if colour else shape
    return f"{_article(words)} {words}"


def caption_for(check: Check) -> str:
    r"""
    The caption of a check, GenEval's wording.

    Example:

    ```py
    >>> caption_for(Check("counting", (Wanted("circle", count=3),)))
    'a photo of three circles'
    ```
    """
    wanted = check.wanted
    if check.category == "counting":
        (item,) = wanted
        return f"a photo of {NUMBERS[item.count - 1]} {item.shape if item.count == 1 else PLURALS[item.shape]}"
    if check.category == "position":
        return f"a photo of {_noun(wanted[0].shape)} {check.relation} {_noun(wanted[1].shape)}"
    return "a photo of " + " and ".join(_noun(item.shape, item.colour) for item in wanted)


_SHAPE = "|".join(SHAPES)
_COLOUR = "|".join(COLOURS)
_PLURAL = "|".join(PLURALS.values())
_FIRST, _SECOND = rf"an? (?P<a>{_SHAPE})", rf"an? (?P<b>{_SHAPE})"
_COLOURED_FIRST = rf"an? (?P<ca>{_COLOUR}) (?P<a>{_SHAPE})"
_COLOURED_SECOND = rf"an? (?P<cb>{_COLOUR}) (?P<b>{_SHAPE})"
# Tried in this order: the first template that matches the whole caption decides its category.
_CAPTIONS = {
    "counting": re.compile(rf"a photo of (?P<n>{'|'.join(NUMBERS)}) (?P<a>{_SHAPE}|{_PLURAL})"),
    "position": re.compile(rf"a photo of {_FIRST} (?P<rel>{'|'.join(RELATIONS)}) {_SECOND}"),
    "color_attr": re.compile(rf"a photo of {_COLOURED_FIRST} and {_COLOURED_SECOND}"),
    "two_object": re.compile(rf"a photo of {_FIRST} and {_SECOND}"),
    "colors": re.compile(rf"a photo of {_COLOURED_FIRST}"),
    "single_object": re.compile(rf"a photo of {_FIRST}"),
}


def parse_caption(caption: str) -> Check:
    r"""
    The [`Check`] of a caption in the scene vocabulary (the inverse of [`caption_for`]).

    Raises a `ValueError` for a caption outside the six templates or the vocabulary.

    Example:

    ```py
    >>> parse_caption("a photo of a square left of a triangle")
    Check(category='position', wanted=(Wanted(shape='square', ...), Wanted(shape='triangle', ...)), relation='left of')
    ```
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    for category, pattern in _CAPTIONS.items():
        match = pattern.fullmatch(text)
        if match is None:
            continue
        found = match.groupdict()
        if category == "counting":
            count = NUMBERS.index(found["n"]) + 1
            shape = next(s for s in SHAPES if found["a"] in (s, PLURALS[s]))
            if (found["a"] == shape) != (count == 1):
                break  # "three circle", "one circles"
            return Check(category, (Wanted(shape, count=count),))
        wanted = [Wanted(found["a"], found.get("ca"))]
        if found.get("b"):
            wanted.append(Wanted(found["b"], found.get("cb")))
        check = Check(category, tuple(wanted), found.get("rel"))
        if caption_for(check) == text:  # "a" where "an" belongs, and the like, do not pass
            return check
    raise ValueError(
        f"Caption {caption!r} is not in the scene vocabulary. Use one of the templates, e.g. 'a photo of a red star', "
        "'a photo of three circles', 'a photo of a square left of a triangle'; shapes: "
        f"{', '.join(SHAPES)}; colours: {', '.join(COLOURS)}."
    )


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    r"""Whether an object centred at `first` is `relation` one centred at `second` (centres in fractions of the
    side, y downwards): offset along the relation's axis above `RELATION_MIN_OFFSET`, and larger than across it."""
    dx, dy = second[0] - first[0], second[1] - first[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > RELATION_MIN_OFFSET and along > abs(across)


# The attribute of the vocabulary each category's check tests.
ATTRIBUTES = {
    "single_object": "object",
    "two_object": "object",
    "counting": "count",
    "colors": "colour",
    "position": "position",
    "color_attr": "attribution",
}


def satisfies(check: Check, objects: Sequence[SceneObject]) -> bool:
    r"""
    Whether `objects` (drawn, or found in an image by `lssgen.scenes.scorer`) pass `check`, GenEval's rules: every named
    object is there at least `count` times (exactly, for `counting`), with its colour where one is named, and
    for `position` some pair of them stands in the relation (see [`relation_holds`]). Other objects are allowed.

    Example:

    ```py
    >>> scene = sample_scene(0, 0)
    >>> satisfies(scene.check, scene.objects), satisfies(wrong_check(scene.check), scene.objects)
    (True, False)
    ```
    """

    def matching(item: Wanted) -> list[SceneObject]:
        return [o for o in objects if o.shape == item.shape and item.colour in (None, o.colour)]

    if check.category == "counting":
        return all(len(matching(item)) == item.count for item in check.wanted)
    if check.category == "position":
        first, second = (matching(item) for item in check.wanted)
        return any(relation_holds(a.centre, b.centre, check.relation) for a in first for b in second if a is not b)
    return all(len(matching(item)) >= item.count for item in check.wanted)


@dataclass(frozen=True)
class InstanceTally:
    r"""
    How the objects of an image compare with the ones its caption names, instance by instance (see
    [`tally_instances`]).

    Args:
        extra (`int`): objects beyond the caption's: more of a named object than its number, or an object the
            caption does not name.
        missing (`int`): named instances not there.
    """

    extra: int
    missing: int

    @property
    def exact(self) -> bool:
        """The objects are exactly the caption's: each named one in its number, nothing else."""
        return self.extra == 0 and self.missing == 0


def tally_instances(check: Check, objects: Sequence[SceneObject]) -> InstanceTally:
    r"""
    The duplication measure: how many of `objects` (drawn, or found by `lssgen.scenes.scorer`) are more than
    `check` names, and how many it names are not there. Stricter than [`satisfies`], which lets extra instances
    pass in every category but counting.

    Each named object stands for `count` instances (1 when the caption gives no number) of its shape, of its
    colour where the caption names one. Every object fills at most one instance: the instances with a colour
    first (only an object of that shape and colour fills one), then those without (any object of the shape).
    Objects left over are `extra`, instances left unfilled `missing`. Positions and relations play no part.

    Example:

    ```py
    >>> scene = sample_scene(0, 0)                      # 'a photo of a square'
    >>> tally_instances(scene.check, scene.objects)
    InstanceTally(extra=0, missing=0)
    >>> tally_instances(scene.check, scene.objects * 3)  # two more squares
    InstanceTally(extra=2, missing=0)
    ```
    """
    unused = list(objects)
    wanted = sorted(check.wanted, key=lambda item: item.colour is None)  # stable: caption order within each
    missing = 0
    for item in wanted:
        for _ in range(item.count):
            match = next((o for o in unused if o.shape == item.shape and item.colour in (None, o.colour)), None)
            if match is None:
                missing += 1
            else:
                unused.remove(match)
    return InstanceTally(extra=len(unused), missing=missing)


def _rng(*key: object) -> np.random.Generator:
    # SHA-256 of the key: stable across processes and platforms, and unrelated streams for nearby keys.
    digest = hashlib.sha256(":".join(map(str, ("lssgen-scenes", *key))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _boxes_apart(a: SceneObject, b: SceneObject, gap: float = GAP) -> bool:
    reach = (a.size + b.size) / 2 + gap
    return abs(a.centre[0] - b.centre[0]) >= reach or abs(a.centre[1] - b.centre[1]) >= reach


def _place(rng: np.random.Generator, specs: Sequence[tuple[str, str]], sizes: tuple[float, float]) -> list:
    """Objects of the given (shape, colour) at random places, boxes apart; smaller ones if they do not fit."""
    low, high = sizes
    for _ in range(100):
        placed: list[SceneObject] = []
        for shape, colour in specs:
            size = float(rng.uniform(low, high))
            for _ in range(50):
                centre = tuple(float(v) for v in rng.uniform(MARGIN + size / 2, 1 - MARGIN - size / 2, 2))
                candidate = SceneObject(shape, colour, centre, size)
                if all(_boxes_apart(candidate, other) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == len(specs):
            return placed
        high = max(low, high * 0.95)
    raise RuntimeError("could not place the objects")  # unreachable with the sizes used below


def _place_pair(rng: np.random.Generator, specs, relation: str) -> list[SceneObject]:
    """Two objects with `first relation second` unambiguous: apart along the axis, near level across it."""
    while True:
        first, second = _place(rng, specs, (0.2, 0.32))
        dx, dy = second.centre[0] - first.centre[0], second.centre[1] - first.centre[1]
        along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
        if abs(along) >= 0.3 and abs(across) <= 0.5 * abs(along):
            if relation in ("right of", "below"):
                along = -along
            if along < 0:  # mirror the pair along the axis, which keeps it inside the frame and apart
                first, second = (
                    SceneObject(first.shape, first.colour, second.centre, first.size),
                    SceneObject(second.shape, second.colour, first.centre, second.size),
                )
            if relation_holds(first.centre, second.centre, relation) and _inside(first) and _inside(second):
                return [first, second]


def _inside(obj: SceneObject) -> bool:
    return all(MARGIN + obj.size / 2 <= v <= 1 - MARGIN - obj.size / 2 for v in obj.centre)


def sample_scene(seed: int, index: int, category: str | None = None) -> Scene:
    r"""
    Scene number `index` of the stream `seed`: deterministic, and any `index >= 0` is a new scene.

    Args:
        seed (`int`): the stream; below `EVALUATION_SEED` for training (see the module's seed ranges).
        index (`int`): position in the stream. Categories take turns (`CATEGORIES[index % 6]`), so any six
            consecutive scenes hold one of each.
        category (`str`, *optional*): force a category instead.

    Example:

    ```py
    >>> scene = sample_scene(0, 4)
    >>> scene.caption, scene.category
    ('a photo of a star below a crescent', 'position')
    >>> image = render(scene, 256)
    ```
    """
    if category is None:
        category = CATEGORIES[index % len(CATEGORIES)]
    elif category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not one of {', '.join(CATEGORIES)}.")
    rng = _rng(seed, index)
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    relation = None
    if category in ("single_object", "colors"):
        objects = _place(rng, [(shapes[0], colours[0])], (0.24, 0.35))
        wanted = (Wanted(shapes[0], colours[0] if category == "colors" else None),)
    elif category in ("two_object", "color_attr"):
        objects = _place(rng, [(shapes[0], colours[0]), (shapes[1], colours[1])], (0.2, 0.32))
        named = category == "color_attr"
        wanted = tuple(Wanted(o.shape, o.colour if named else None) for o in objects)
    elif category == "counting":
        count = int(rng.integers(1, 5))
        # Counting does not name colours: they vary, so the count cannot be read from colour alone.
        specs = [(shapes[0], str(rng.choice(list(COLOURS)))) for _ in range(count)]
        objects = _place(rng, specs, (0.2, 0.3) if count <= 2 else (0.2, 0.25))
        wanted = (Wanted(shapes[0], count=count),)
    else:
        relation = str(rng.choice(RELATIONS))
        objects = _place_pair(rng, [(shapes[0], colours[0]), (shapes[1], colours[1])], relation)
        wanted = (Wanted(shapes[0]), Wanted(shapes[1]))
    check = Check(category, wanted, relation)
    texture = str(rng.choice(TEXTURES))
    return Scene(caption_for(check), category, tuple(objects), check, texture, int(rng.integers(2**62)))


def evaluation_scenes() -> list[Scene]:
    r"""
    The fixed held-out prompt set: `EVALUATION_PER_CATEGORY` (16) scenes of each category (96 in all; the first 48
    hold 8 of each), from the reserved stream `EVALUATION_SEED`, which no training seed reaches.

    Example:

    ```py
    >>> prompts = [scene.caption for scene in evaluation_scenes()]
    ```
    """
    return [sample_scene(EVALUATION_SEED, i) for i in range(EVALUATION_PER_CATEGORY * len(CATEGORIES))]


def wrong_check(check: Check, rng: np.random.Generator | int = 0) -> Check:
    r"""
    A check that a correct image of `check` fails: another shape (single and two objects), another count
    (counting), another colour (colours), the opposite relation (position), the colours swapped (attribution).

    Example:

    ```py
    >>> wrong_check(parse_caption("a photo of a red circle and a blue square"))  # a blue circle and a red square
    ```
    """
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    wanted = list(check.wanted)
    if check.category in ("single_object", "two_object"):
        absent = [s for s in SHAPES if s not in {w.shape for w in wanted}]
        slot = int(rng.integers(len(wanted)))
        wanted[slot] = Wanted(str(rng.choice(absent)))
        return Check(check.category, tuple(wanted))
    if check.category == "counting":
        (item,) = wanted
        count = item.count + (1 if item.count == 1 or (item.count < 4 and rng.random() < 0.5) else -1)
        return Check("counting", (Wanted(item.shape, count=count),))
    if check.category == "colors":
        (item,) = wanted
        other = str(rng.choice([c for c in COLOURS if c != item.colour]))
        return Check("colors", (Wanted(item.shape, other),))
    if check.category == "position":
        return Check("position", check.wanted, OPPOSITE[check.relation])
    a, b = wanted
    return Check("color_attr", (Wanted(a.shape, b.colour), Wanted(b.shape, a.colour)))


# --- harder scenes, for checking the scorer ---------------------------------------------------------------------

LAYOUTS = ("apart", "touching", "overlapping")
USUAL_SIZES = (0.2, 0.3)  # an object's box side in the scenes above (0.2-0.35), fraction of the image side
# Hard scenes are laid out on a raster of this side: touching objects end less than a quarter of its pixel (a
# 2048th of the side) from overlapping, and hidden shares are measured on it.
PLACEMENT_SIDE = 512
HARD_GAP = 0.02  # free space between the boxes of objects laid out apart: half of GAP, so that 20 small ones fit
# How much of the object below an overlapping object covers: at most 40%, so that both can still be counted.
HIDDEN_SHARE = (0.15, 0.4)
WALK_STEPS = 40  # steps of the walk inward in `_next_to`, from apart to the centre
DUPLICATE_SHARE = 0.75  # objects of a hard scene that copy one of the caption's objects; the rest are any shape


def sample_hard_scene(seed: int, index: int, count: int, *, scale: float = 1.0, layout: str = "apart") -> Scene:
    r"""
    A scene harder than those the scorer was trained on, to check its counting: `count` objects at `scale` times the
    usual size, laid out apart, touching, or partly hidden by each other, as a generator that duplicates the
    caption's objects draws them (render it at 512 px for the size the scorer is least used to).

    The caption and check are those of `sample_scene(seed, index)`; three objects in four copy the shape and colour
    of one of that scene's objects, the others are any shape and colour. The truth a scorer's detections are
    compared with is in the scene: `scene.objects`, and `tally_instances(scene.check, scene.objects)` for the
    duplication measure. Deterministic in all its arguments.

    Args:
        seed (`int`), index (`int`): the scene whose caption it takes, and the stream its layout is drawn from.
        count (`int`): objects drawn, at least 1.
        scale (`float`, defaults to `1.0`): object box sides are `scale` times a uniform draw from `USUAL_SIZES`
            (0.2-0.3 of the image side); 0.25 is a quarter of the usual size.
        layout (`str`, defaults to `"apart"`): one of `LAYOUTS`. `"apart"`: no two boxes closer than `HARD_GAP`.
            `"touching"` and `"overlapping"`: in pairs (objects 0 and 1, 2 and 3, ...; with an odd count the last
            one alone), the pairs' boxes `HARD_GAP` apart. In a pair the second object touches the first without
            overlapping it (`"touching"`), or is drawn over part of it, at most 40% of its area (`"overlapping"`;
            in another colour when it would have the same).

    Raises a `ValueError` for arguments out of range, and when the objects do not fit (it never shrinks them).

    Example:

    ```py
    >>> scene = sample_hard_scene(4, 0, count=12, scale=0.5, layout="touching")
    >>> truth = tally_instances(scene.check, scene.objects)
    >>> image, labels = render_with_labels(scene, 512)
    ```
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}.")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}.")
    # Below: objects under 8 px on the placement raster, where touching and hiding lose their meaning. Above: the
    # largest objects would not fit in the frame.
    smallest, largest = 8 / (USUAL_SIZES[0] * PLACEMENT_SIDE), (1 - 2 * MARGIN) / USUAL_SIZES[1]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not smallest <= scale <= largest:
        raise ValueError(f"scale must be a number from {smallest:.3f} to {largest:.2f}, got {scale!r}.")
    base = sample_scene(seed, index)
    rng = _rng("hard", seed, index, count, float(scale), layout)
    for _ in range(20):  # a fresh draw of the whole layout when one gets stuck
        objects = _lay_out(rng, base.objects, count, scale, layout)
        if objects is not None:
            return Scene(base.caption, base.category, tuple(objects), base.check, base.texture, base.seed)
    raise ValueError(
        f"{count} objects at scale {scale} do not fit {layout} in one image (20 layouts tried); draw fewer objects "
        "or smaller ones."
    )


def _raster(obj: SceneObject) -> np.ndarray:
    """The object's pixels on the placement raster."""
    return np.asarray(_draw_mask(obj, PLACEMENT_SIDE)) > 127


def _lay_out(rng, named: Sequence[SceneObject], count: int, scale: float, layout: str) -> list[SceneObject] | None:
    """One attempt at a hard scene's objects, in drawing order; `None` when an object finds no place."""
    placed: list[SceneObject] = []
    for number in range(count):
        if rng.random() < DUPLICATE_SHARE:
            model = named[int(rng.integers(len(named)))]
            shape, colour = model.shape, model.colour
        else:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        size = float(rng.uniform(*USUAL_SIZES)) * scale
        # In pairs, spread over the frame as a duplicating generator spreads them: a heap of all of them would
        # test something else (which nobody could count either).
        partner = placed[-1] if layout != "apart" and number % 2 == 1 else None
        if partner is not None and layout == "overlapping" and colour == partner.colour:
            # The edge where an object hides another of its own colour would not show: nobody could count the two.
            colour = str(rng.choice([c for c in COLOURS if c != colour]))
        for _ in range(200):
            if partner is None:
                centre = tuple(float(v) for v in rng.uniform(MARGIN + size / 2, 1 - MARGIN - size / 2, 2))
                candidate = SceneObject(shape, colour, centre, size)
            else:
                candidate = _next_to(SceneObject(shape, colour, partner.centre, size), partner, rng, layout)
                if candidate is None or not _inside(candidate):
                    continue
            if all(_boxes_apart(candidate, other, HARD_GAP) for other in placed if other is not partner):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _next_to(obj: SceneObject, partner: SceneObject, rng, layout: str) -> SceneObject | None:
    """`obj` moved away from `partner`'s centre in a random direction until it just touches it (`touching`) or covers
    a share of it drawn from `HIDDEN_SHARE` (`overlapping`), on the placement raster; `None` when it cannot cover
    that much of it from this direction.

    The share covered does not grow steadily as the two come closer (a crescent, a cross or a star laid over the
    middle of a larger object covers less of it than laid over its edge), so the search walks in from where the two
    are apart to the first step that covers more than the share, then bisects that step: the share is met at the
    outermost distance that meets it, not at an inner one nearer a common centre."""
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    below = _raster(partner)
    area = below.sum()
    target = float(rng.uniform(*HIDDEN_SHARE)) if layout == "overlapping" else 0.0

    def at(distance: float) -> SceneObject:
        centre = np.array(partner.centre) + distance * direction
        return SceneObject(obj.shape, obj.colour, (float(centre[0]), float(centre[1])), obj.size)

    def covers(distance: float) -> float:
        return (_raster(at(distance)) & below).sum() / area

    # At `far` their boxes are apart, so their pixels are too.
    far = (obj.size + partner.size) / 2 * math.sqrt(2) + 2 / PLACEMENT_SIDE
    step = far / WALK_STEPS
    near = far - step
    while covers(near) <= target:
        far, near = near, near - step
        if near < 0:
            return None
    while (far - near) * PLACEMENT_SIDE > 0.25:
        middle = (near + far) / 2
        if covers(middle) > target:
            near = middle
        else:
            far = middle
    return at(far)


# --- drawing ---------------------------------------------------------------------------------------------------


@cache
def _outline(shape: str) -> tuple[tuple[float, float], ...]:
    """The shape's polygon in a [-1, 1] box (y downwards); circle and crescent are drawn as ellipses instead."""
    if shape == "square":
        return ((-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82))
    if shape == "triangle":
        return ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8))
    if shape == "diamond":
        return ((0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0))
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle) + 0.08))
        return tuple(points)
    if shape == "cross":
        a, b = 0.34, 0.95
        return ((-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a))  # fmt: skip
    if shape == "heart":
        points = []
        for k in range(96):
            t = 2 * math.pi * k / 96
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x / 17, -(y + 2.5) / 15.5))
        return tuple(points)
    raise KeyError(shape)


def _draw_mask(obj: SceneObject, side: int) -> Image.Image:
    """The object's coverage, 0 or 255, on a `side` x `side` canvas."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    half = obj.size * side / 2
    cx, cy = obj.centre[0] * side, obj.centre[1] * side

    def box(x: float, y: float, r: float) -> tuple[float, float, float, float]:
        return (cx + (x - r) * half, cy + (y - r) * half, cx + (x + r) * half, cy + (y + r) * half)

    if obj.shape == "circle":
        draw.ellipse(box(0, 0, 0.92), fill=255)
    elif obj.shape == "crescent":
        draw.ellipse(box(0, 0, 1.0), fill=255)
        draw.ellipse(box(0.5, -0.1, 0.78), fill=0)
    else:
        draw.polygon([(cx + x * half, cy + y * half) for x, y in _outline(obj.shape)], fill=255)
    return mask


def _resize(array: np.ndarray, side: int) -> np.ndarray:
    """`(C, H, W)` float array to `side` x `side`: bicubic when enlarging, antialiased when reducing."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    mode = "bicubic" if side >= tensor.shape[-1] else "bilinear"
    out = F.interpolate(tensor, size=(side, side), mode=mode, align_corners=False, antialias=side < tensor.shape[-1])
    return out[0].numpy()


def _noise(rng: np.random.Generator, cells: int, side: int) -> np.ndarray:
    """Smooth noise with `cells` features across the side, zero mean and unit variance."""
    field = _resize(rng.standard_normal((1, cells, cells)), side)[0]
    return (field - field.mean()) / (field.std() + 1e-6)


def _fractal(rng: np.random.Generator, side: int, finest: int, exponent: float = 0.8) -> np.ndarray:
    # The coarse octaves are summed at a low resolution and scaled up once: the same field, a fraction of the cost.
    low = min(side, 128)
    field = _resize(
        sum(_noise(rng, cells, low) / cells**exponent for cells in (4, 8, 16, 32) if cells <= finest)[None], side
    )[0]
    field = field + sum(_noise(rng, cells, side) / cells**exponent for cells in (64, 128, 256) if cells <= finest)
    return (field - field.mean()) / field.std()


def _gravel(rng: np.random.Generator, side: int) -> np.ndarray:
    """Stones: Voronoi cells of a jittered grid, each with its own shade, dark seams and a grainy surface."""
    grid = int(rng.integers(14, 26))
    points = rng.uniform(0, 1, (grid, grid, 2))
    shades = rng.standard_normal((grid, grid))
    u = (np.arange(side) + 0.5) / side * grid
    uy, ux = np.meshgrid(u, u, indexing="ij")
    iy, ix = np.floor(uy).astype(int), np.floor(ux).astype(int)
    nearest = np.full((side, side), np.inf)
    second = np.full((side, side), np.inf)
    shade = np.zeros((side, side))
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            cy, cx = (iy + oy) % grid, (ix + ox) % grid
            py, px = iy + oy + points[cy, cx, 0], ix + ox + points[cy, cx, 1]
            d = np.hypot(uy - py, ux - px)
            closer = d < nearest
            second = np.where(closer, nearest, np.minimum(second, d))
            shade = np.where(closer, shades[cy, cx], shade)
            nearest = np.where(closer, d, nearest)
    seams = np.clip((second - nearest) * 6, 0, 1)
    return shade * 0.8 + (seams - 1) * 1.5 + 0.5 * _noise(rng, 256, side)


def _texture(kind: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """A luminance pattern with detail at many scales, zero mean and unit variance."""
    if kind == "clouds":
        field = _fractal(rng, side, 256, 0.7)
    elif kind == "grain":
        field = _fractal(rng, side, 64, 1.0) + 0.8 * _noise(rng, 256, side) + 0.6 * _noise(rng, 512, side)
    elif kind == "weave":
        threads = float(rng.uniform(24, 40))
        u = (np.arange(side) + 0.5) / side * threads
        uy, ux = np.meshgrid(u, u, indexing="ij")
        warp, weft = np.sin(np.pi * ux) ** 2, np.sin(np.pi * uy) ** 2
        over = (np.floor(ux) + np.floor(uy)) % 2 == 0
        field = np.where(over, warp * (0.6 + 0.4 * weft), weft * (0.6 + 0.4 * warp)) + 0.3 * _fractal(rng, side, 256)
    elif kind == "gravel":
        field = _gravel(rng, side)
    elif kind == "wood":
        rings = float(rng.uniform(10, 22))
        v = (np.arange(side) + 0.5) / side
        warp = 0.04 * _fractal(rng, side, 16)
        fibres = _resize(rng.standard_normal((1, 256, 16)), side)[0]  # long along the grain
        field = np.sin(2 * np.pi * rings * (v[:, None] + warp)) + 0.6 * fibres + 0.4 * _noise(rng, 512, side)
    else:
        raise ValueError(f"texture {kind!r} is not one of {', '.join(TEXTURES)}.")
    return (field - field.mean()) / (field.std() + 1e-6)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform()
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.05, 0.3), rng.uniform(0.38, 0.66)))


def _background(scene: Scene, side: int, photos: Sequence[Path] | None) -> np.ndarray:
    """`(3, side, side)` in [0, 1]: muted, mid-grey on average, so every object colour (white and black too) stands
    out; fine detail at every scale the image holds."""
    rng = _rng("background", scene.seed)
    work = max(side, min(2 * side, BACKGROUND_SIDE))
    if photos:
        photo = Path(photos[int(rng.integers(len(photos)))])
        with Image.open(photo) as opened:
            image = np.asarray(opened.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
        short = min(image.shape[1:])
        crop = int(short * rng.uniform(0.35, 0.8))
        top, left = int(rng.integers(image.shape[1] - crop + 1)), int(rng.integers(image.shape[2] - crop + 1))
        image = _resize(image[:, top : top + crop, left : left + crop], work)
        grey = image.mean(0, keepdims=True)
        # Desaturated and squeezed towards mid-grey: a photo's own red or white must not read as an object.
        image = grey + 0.3 * (image - grey)
        image = 0.52 + 0.45 * (image - image.mean())
    else:
        pattern = _texture(scene.texture, rng, work)
        tint = _muted_colour(rng)[:, None, None]
        other = _muted_colour(rng)[:, None, None]
        blend = np.clip(0.5 + 0.35 * _fractal(rng, work, 8), 0, 1)[None]
        image = (tint * blend + other * (1 - blend)) * (1 + float(rng.uniform(0.12, 0.22)) * pattern[None])
    return _resize(np.clip(image, 0, 1), side) if work != side else np.clip(image, 0, 1)


def render_with_labels(scene: Scene, size: int = 256, photos: Sequence[str | Path] | None = None):
    r"""
    The render of `scene` and its label map: `(image, labels)`, where `labels` is an `(size, size)` int array
    holding `i + 1` where object `i` covers at least half the pixel (the topmost such object, the last drawn, where
    objects overlap) and 0 elsewhere.

    See [`render`] for the arguments.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}.")
    supersample = SUPERSAMPLE if size <= 512 else 2
    image = _background(scene, size, [Path(p) for p in photos] if photos else None)
    labels = np.zeros((size, size), dtype=np.int64)
    grid = (np.arange(size) + 0.5) / size
    for number, obj in enumerate(scene.objects):
        alpha = np.asarray(_draw_mask(obj, size * supersample).reduce(supersample), dtype=np.float32) / 255
        rng = _rng("object", scene.seed, number)
        rgb = np.clip(np.array(COLOURS[obj.colour]) / 255 + rng.uniform(-0.035, 0.035, 3), 0, 1)
        # A soft light from one side: shapes in photos are not perfectly flat.
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (grid[None, :] - obj.centre[0]) * np.cos(angle) + (grid[:, None] - obj.centre[1]) * np.sin(angle)
        light = 1 + rng.uniform(0, 0.25) * np.clip(ramp / obj.size, -0.5, 0.5)
        colour = np.clip(rgb[:, None, None] * light[None], 0, 1)
        image = image * (1 - alpha[None]) + colour * alpha[None]
        labels[alpha >= 0.5] = number + 1  # drawn over whatever was there
    pixels = (np.clip(image, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), labels


def render(scene: Scene, size: int = 256, photos: Sequence[str | Path] | None = None) -> Image.Image:
    r"""
    Draw `scene` as a `size` x `size` RGB image.

    Args:
        scene (`Scene`): from [`sample_scene`] or [`evaluation_scenes`].
        size (`int`, defaults to `256`): side in pixels. Any size shows the same scene.
        photos (`list[str | Path]`, *optional*): photographs to take the background from (a muted crop of one,
            chosen by the scene's seed), e.g. `sorted(Path("data/photos/train").glob("*.png"))` after
            `python -m lssgen.training.photos --out data/photos`. By default a procedural texture.

    Example:

    ```py
    >>> from lssgen.scenes.world import render, sample_scene
    >>> render(sample_scene(seed=0, index=3), 256).save("scene.png")
    ```
    """
    return render_with_labels(scene, size, photos)[0]
