r"""
An automatic GenEval-style judge for the scene vocabulary of `lssgen.scenes`, trained on its renders.

[`SceneScorer`] is a small U-Net that reads the image at 256 px and marks, at 128 px, the centre of every object
with a heatmap peak for its shape, reading its colour and size there (CenterNet's way of finding objects). Each
peak is an object, so objects that touch or partly hide each other are counted apart; its centre is its position.
GenEval's rules (`lssgen.scenes.satisfies`) then decide whether the image shows what its caption asks: the objects
named, the count, the colours, the relative position, which colour goes with which object.

Train (about 35 minutes per 4000 steps on one CPU core; `--resume --steps N` goes on to N: the shipped weights took
11000 steps in three runs, listed in their model card), then measure on fresh renders:

```bash
python -m lssgen.scenes.scorer train --out runs/scene-scorer --taef2 /work/shared/data/taef2 --steps 4000
python -m lssgen.scenes.scorer evaluate --scorer runs/scene-scorer --taef2 /work/shared/data/taef2
```
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lssgen.outputs import save_pretrained_here

from .world import (
    ATTRIBUTES,
    CATEGORIES,
    COLOURS,
    LAYOUTS,
    SHAPES,
    Check,
    Scene,
    SceneObject,
    parse_caption,
    render,
    sample_hard_scene,
    sample_scene,
    satisfies,
    wrong_check,
)

TRAIN_SEED, VALIDATION_SEED, REPORT_SEED, ROUND_TRIP_REPORT_SEED = 0, 1, 2, 3
CHECKPOINT = "checkpoint"
CACHE = "cache"


def _block(channels_in: int, channels_out: int, stride: int = 1, convolutions: int = 2) -> nn.Sequential:
    layers = []
    for n in range(convolutions):
        layers += [
            nn.Conv2d(
                channels_in if n == 0 else channels_out, channels_out, 3, stride=stride if n == 0 else 1, padding=1
            ),
            nn.GroupNorm(8, channels_out),
            nn.SiLU(),
        ]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class CheckResult:
    r"""
    The verdict on one image and one caption.

    Args:
        passed (`bool`): the image shows what the caption asks (GenEval's rules, `lssgen.scenes.satisfies`).
        caption (`str`), category (`str`): the caption and its category.
        attribute (`str`): what the category tests: `object`, `count`, `colour`, `position` or `attribution`.
        found (`tuple[SceneObject, ...]`): the objects the scorer saw (shape, colour, centroid, and as `size`
            the side of a square of the same area, fractions of the image side).
    """

    passed: bool
    caption: str
    category: str
    attribute: str
    found: tuple[SceneObject, ...]


class SceneScorer(ModelMixin, ConfigMixin):
    r"""
    The objects of a scene image, found by their centres, and the GenEval-style verdicts built on them.

    A U-Net reads the image at `resolution` px and gives at half that side, per shape, a heatmap that peaks at the
    centre of each object of that shape (the centre of its box, also where part of it is hidden), and at each centre
    the object's colour and size. Each peak above `threshold` that is the highest in its 3 x 3 neighbourhood and not
    within `merge_distance` sizes of a higher one is an object: counting needs no region of pixels of its own, so
    objects that touch or partly hide each other are still counted apart.

    Args:
        resolution (`int`, defaults to `256`): images are resized to this square before the network sees them
            (a quarter of the usual object size in a 512 px image is 13-19 px here).
        block_out_channels (`tuple[int, ...]`, defaults to `(16, 32, 48, 64)`): widths at 1/2, 1/4, 1/8, 1/16.
        head_channels (`int`, defaults to `32`): width of the 3 x 3 convolution before each head.
        threshold (`float`, defaults to `0.3`): smallest heatmap peak that is an object.
        merge_distance (`float`, defaults to `0.3`): peaks closer than this many sizes (of the higher one) are one
            object.

    Example:

    ```py
    >>> from lssgen.scenes.scorer import SceneScorer
    >>> from lssgen.scenes.world import render, sample_scene
    >>> scorer = SceneScorer.from_pretrained("weights/scene-scorer")
    >>> scene = sample_scene(12345, 0)
    >>> scorer.score([render(scene, 256)], [scene.caption])[0].passed
    True
    ```
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 256,
        block_out_channels: tuple[int, ...] = (16, 32, 48, 64),
        head_channels: int = 32,
        threshold: float = 0.3,
        merge_distance: float = 0.3,
    ):
        super().__init__()
        widths = list(block_out_channels)
        self.down = nn.ModuleList(
            _block(c_in, c_out, stride=2) for c_in, c_out in zip([3, *widths[:-1]], widths)
        )  # each halves the side
        # Shapes are told apart by their whole outline: two more convolutions at the coarsest level widen the
        # receptive field past the largest object.
        self.middle = _block(widths[-1], widths[-1])
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i], convolutions=1) for i in reversed(range(len(widths) - 1))
        )

        def head(outputs: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(widths[0], head_channels, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(head_channels, outputs, 1))  # fmt: skip

        self.centre_head = head(len(SHAPES))
        self.colour_head = head(len(COLOURS))
        self.size_head = head(1)
        # Objects are a few pixels of the map: starting every pixel at a 10% chance keeps the first steps' loss
        # about them, not about the background.
        nn.init.constant_(self.centre_head[-1].bias, -math.log(9))

    def _encode(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = (pixels - 0.5) / 0.25
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        return skips, self.middle(x)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""`(B, 3, R, R)` images in [0, 1] → per shape centre logits `(B, 8, R/2, R/2)`, colour logits
        `(B, 8, R/2, R/2)` and log sizes `(B, 1, R/2, R/2)` (the box side in pixels of the map), the last two read
        at objects' centres."""
        skips, x = self._encode(pixels)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.centre_head(x), self.colour_head(x), self.size_head(x)

    def prepare(self, images: Any) -> torch.Tensor:
        r"""PIL images (any sizes), or a `(B, 3, H, W)` tensor in [0, 1], as the network's input: `(B, 3, R, R)`
        in [0, 1], resized with the same (antialiased) filter either way."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images: expected a (B, 3, H, W) tensor in [0, 1], got shape {tuple(images.shape)}.")
            return self._resize(images.float().to(self.device))
        images = list(images)
        if not all(isinstance(image, Image.Image) for image in images):
            raise ValueError("images: pass PIL images or a (B, 3, H, W) tensor in [0, 1].")
        return torch.cat([self._resize(_as_float(image.convert("RGB"))[None].to(self.device)) for image in images])

    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        side = self.config.resolution
        if pixels.shape[-2:] != (side, side):
            reduce = pixels.shape[-1] > side
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=reduce, align_corners=False)
        return pixels.clamp(0, 1)

    @torch.no_grad()
    def detect(self, images: Any, batch_size: int = 16) -> list[tuple[SceneObject, ...]]:
        r"""The objects in each image, `batch_size` images at a time: shape, colour, centre and size (the side of
        its box), in fractions of the image side, sorted top to bottom."""
        pixels = self.prepare(images)
        found: list[tuple[SceneObject, ...]] = []
        for start in range(0, len(pixels), batch_size):
            centres, colours, sizes = self(pixels[start : start + batch_size])
            found += [
                _objects(*maps, self.config.threshold, self.config.merge_distance)
                for maps in zip(centres.sigmoid(), colours, sizes)
            ]
        return found

    def score(self, images: Any, scenes: Sequence[Scene | Check | str]) -> list[CheckResult]:
        r"""
        Whether each image shows what its caption asks, GenEval's way.

        Args:
            images (`list[PIL.Image]` or `torch.Tensor`): any size (resized to `resolution`); a tensor is
                `(B, 3, H, W)` in [0, 1].
            scenes (`list[Scene | Check | str]`): one per image: a scene, its check, or a caption in the scene
                vocabulary (`lssgen.scenes.parse_caption`).

        Returns:
            `list[CheckResult]`, one per image.
        """
        checks = [_as_check(item) for item in scenes]
        found = self.detect(images)
        if len(found) != len(checks):
            raise ValueError(f"score: {len(found)} images but {len(checks)} scenes or captions; pass one per image.")
        return [
            CheckResult(satisfies(check, objects), caption, check.category, ATTRIBUTES[check.category], objects)
            for (check, caption), objects in zip(checks, found)
        ]

    @torch.no_grad()
    def features(self, images: Any) -> torch.Tensor:
        r"""A `(B, 2 * C)` feature vector per image (mean and standard deviation of the deepest features over the
        image), for distribution distances such as KID between renders and generated images."""
        _, deepest = self._encode(self.prepare(images))
        return torch.cat([deepest.mean((2, 3)), deepest.std((2, 3))], dim=1)

    def feature_extractor(self) -> nn.Module:
        r"""
        This scorer as the `feature` module of torchmetrics' `KernelInceptionDistance` (or
        `FrechetInceptionDistance`): it takes `(B, 3, H, W)` uint8 images (or floats in [0, 1]) and returns
        [`features`].

        Example:

        ```py
        >>> from torchmetrics.image.kid import KernelInceptionDistance
        >>> kid = KernelInceptionDistance(feature=scorer.feature_extractor(), subset_size=50)
        >>> kid.update(real_uint8, real=True); kid.update(fake_uint8, real=False); kid.compute()
        ```
        """
        return _FeatureExtractor(self)


def _objects(centres: torch.Tensor, colours: torch.Tensor, sizes: torch.Tensor, threshold: float,
             merge_distance: float) -> tuple[SceneObject, ...]:  # fmt: skip
    """One image's objects from its maps: `centres` `(8, S, S)` probabilities, `colours` `(8, S, S)` logits,
    `sizes` `(1, S, S)` log box sides in map pixels."""
    side = centres.shape[-1]
    best, shape = centres.max(0)  # one object per place: its likeliest shape
    peaks = (best == F.max_pool2d(best[None], 3, stride=1, padding=1)[0]) & (best > threshold)
    ys, xs = peaks.nonzero(as_tuple=True)
    order = best[ys, xs].argsort(descending=True).tolist()
    kept: list[tuple[float, float, float]] = []  # x, y, size in map pixels
    objects = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        size = float(sizes[0, y, x].exp())
        if any(math.hypot(x - kx, y - ky) < merge_distance * ksize for kx, ky, ksize in kept):
            continue  # a second peak of an object already found
        kept.append((x, y, size))
        centre = ((x + 0.5) / side, (y + 0.5) / side)
        colour = list(COLOURS)[int(colours[:, y, x].argmax())]
        objects.append(SceneObject(SHAPES[int(shape[y, x])], colour, centre, size / side))
    return tuple(sorted(objects, key=lambda o: (o.centre[1], o.centre[0])))


class _FeatureExtractor(nn.Module):
    def __init__(self, scorer: SceneScorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() / 255 if images.dtype == torch.uint8 else images
        return self.scorer.features(pixels)


def _as_check(item: Scene | Check | str) -> tuple[Check, str]:
    from .world import caption_for

    if isinstance(item, Scene):
        return item.check, item.caption
    if isinstance(item, Check):
        return item, caption_for(item)
    if isinstance(item, str):
        return parse_caption(item), item
    raise ValueError(f"score: expected a Scene, a Check or a caption string, got {type(item).__name__}.")


# --- data and training -----------------------------------------------------------------------------------------


def _round_trip(vae: Any, pixels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Images in [0, 1] through an autoencoder and back, as every generated image is."""
    from lssgen.latents import LatentNormalization
    from lssgen.training.data import decode, encode

    norm = LatentNormalization.from_vae_config(vae.config)
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            latents = encode(vae, pixels[start : start + batch] * 2 - 1, norm)
            out.append(((decode(vae, latents, norm) + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


MAX_OBJECTS = 20  # the most a training scene holds (`hard_training_scene`)


def hard_training_scene(seed: int, index: int) -> Scene:
    r"""
    A harder scene to train on: `sample_hard_scene(seed, index, ...)` with its layout (apart, touching, overlapping
    in turn), scale (log-uniform from 0.2 to 1.1 of the usual size) and count (up to 4 objects at about the usual
    size, 12 at half of it, 20 below) drawn from `index`; fewer objects when they do not fit.
    """
    rng = np.random.default_rng([seed, index, 24])
    layout = LAYOUTS[index % len(LAYOUTS)]
    scale = float(np.exp(rng.uniform(math.log(0.2), math.log(1.1))))
    most = 4 if scale > 0.7 else 12 if scale > 0.4 else MAX_OBJECTS
    count = int(rng.integers(2, most + 1))
    while True:
        try:
            return sample_hard_scene(seed, index, count, scale=scale, layout=layout)
        except ValueError:
            if count <= 2:
                raise
            count = max(2, count * 2 // 3)


def _object_rows(scene: Scene) -> torch.Tensor:
    """`(MAX_OBJECTS, 5)`: shape index, colour index, centre x, centre y, size per object, in drawing order; rows
    past the scene's objects have shape -1."""
    rows = torch.full((MAX_OBJECTS, 5), -1.0)
    for row, obj in zip(rows, scene.objects, strict=False):
        row[:] = torch.tensor([SHAPES.index(obj.shape), list(COLOURS).index(obj.colour), *obj.centre, obj.size])
    return rows


def render_pool(seed: int, count: int, side: int, vae: Any = None, round_trip_share: float = 0.0,
                progress: bool = True, hard: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    r"""
    `count` scenes of stream `seed` and `hard` harder ones ([`hard_training_scene`]) rendered at `side`: `images`
    uint8 `(N, 3, side, side)` and their `objects` (`(N, MAX_OBJECTS, 5)`, see `_object_rows`); with a `vae`, the
    first `round_trip_share` of each kind also as it comes back from the autoencoder's round trip (`round_trip`,
    `trips` the indices of those images). Ordinary scenes make the round trip at 128 px (a 16 x 16 latent, as the
    held-out round trips), harder ones at `side` (their small objects would not survive 128).
    """
    scenes = [sample_scene(seed, index) for index in range(count)]
    scenes += [hard_training_scene(seed, index) for index in range(hard)]
    images = []
    for scene in tqdm(scenes, desc=f"rendering seed {seed}", leave=False, disable=not progress):
        images.append(torch.from_numpy(np.array(render(scene, side))).permute(2, 0, 1))
    pool = {"images": torch.stack(images), "objects": torch.stack([_object_rows(scene) for scene in scenes])}
    if vae is None or round_trip_share <= 0:
        return pool
    trips, done = [], []
    for first, number, trip_side in ((0, count, min(side, 128)), (count, hard, side)):
        chosen = list(range(first, first + int(round(number * round_trip_share))))
        for start in tqdm(range(0, len(chosen), 8), desc="taef2 round trips", leave=False, disable=not progress):
            batch = chosen[start : start + 8]
            pixels = torch.stack([_as_float(render(scenes[i], trip_side)) for i in batch])
            back = _round_trip(vae, pixels)
            if trip_side != side:
                back = F.interpolate(back, size=(side, side), mode="bilinear", align_corners=False)
            done.append((back.clamp(0, 1) * 255 + 0.5).to(torch.uint8))
        trips += chosen
    if trips:
        pool["round_trip"], pool["trips"] = torch.cat(done), torch.tensor(trips)
    return pool


def _as_float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a small generator does to an image: soft, noisy, slightly off in colour, sometimes made at a lower
    resolution. `pixels` `(B, 3, H, W)` in [0, 1]."""
    batch, _, side, _ = pixels.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(batch, 1, 1, 1, generator=generator) < p).float()

    out = pixels
    # Made at a lower resolution and scaled up.
    small = int(side * float(uniform(0.4, 0.75)[0]))
    low = F.interpolate(F.interpolate(out, size=(small, small), mode="bilinear", antialias=True), size=(side, side),
                        mode="bilinear", align_corners=False)  # fmt: skip
    out = torch.lerp(out, low, chosen(0.3))
    # Gaussian blur of random strength.
    sigma = float(uniform(0.4, 1.5)[0])
    radius = 3
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).to(out)
    blurred = F.conv2d(F.pad(out, (radius,) * 4, mode="reflect"), taps.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    blurred = F.conv2d(blurred, taps.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    out = torch.lerp(out, blurred, chosen(0.4))
    # Colour: brightness, contrast, saturation and a slight cast.
    grey = out.mean(1, keepdim=True)
    out = grey + (out - grey) * uniform(0.75, 1.2, 1, 1, 1)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = mean + (out - mean) * uniform(0.8, 1.15, 1, 1, 1)
    out = out * uniform(0.88, 1.12, 1, 1, 1) * uniform(0.94, 1.06, 3, 1, 1)
    out = out + uniform(-0.04, 0.04, 3, 1, 1)
    # Pixel noise.
    out = out + torch.randn(out.shape, generator=generator) * uniform(0.0, 0.05, 1, 1, 1) * chosen(0.5)
    return out.clamp(0, 1)


def _batch(pool: dict[str, torch.Tensor], size: int, crop: int, generator: torch.Generator):
    """`size` augmented training crops of `crop` px (at even offsets, so map pixels line up), their round trip
    half the time they have one, and their targets (`_targets`)."""
    count, side = len(pool["images"]), pool["images"].shape[-1]
    picks = torch.randint(0, count, (size,), generator=generator)
    images = pool["images"][picks].float() / 255
    if "round_trip" in pool:
        slot = torch.full((count,), -1, dtype=torch.long)
        slot[pool["trips"]] = torch.arange(len(pool["trips"]))
        swap = (slot[picks] >= 0) & (torch.rand(size, generator=generator) < 0.5)
        if swap.any():
            images[swap] = pool["round_trip"][slot[picks[swap]]].float() / 255
    offsets = torch.randint(0, (side - crop) // 2 + 1, (size, 2), generator=generator) * 2
    images = torch.stack([image[:, y : y + crop, x : x + crop] for image, (x, y) in zip(images, offsets.tolist())])
    return _augment(images, generator), *_targets(pool["objects"][picks], side // 2, offsets // 2, crop // 2)


def _targets(objects: torch.Tensor, side: int, offsets: torch.Tensor, crop: int):
    r"""
    Training targets on a `crop` x `crop` window at `offsets` (x, y) of each image's `side` x `side` map, from its
    `objects` rows (`_object_rows`):

    - `centres` `(B, 8, crop, crop)`: per shape, a Gaussian of standard deviation a sixth of the object's size
      around the map pixel that holds its centre, 1 there (CenterNet's targets);
    - `colours` `(B, crop, crop)` (-1: none) and `sizes` `(B, crop, crop)` (log of the box side in map pixels;
      NaN: none), on the 3 x 3 pixels around each centre, so a peak one pixel off still reads them.
    """
    batch = len(objects)
    grid = torch.arange(crop, dtype=torch.float32)
    xs = offsets[:, 0, None].float() + grid + 0.5  # (B, crop), map coordinates of the window's pixels
    ys = offsets[:, 1, None].float() + grid + 0.5
    centres = torch.zeros(batch, len(SHAPES), crop, crop)
    colours = torch.full((batch, crop, crop), -1, dtype=torch.long)
    sizes = torch.full((batch, crop, crop), math.nan)
    rows = torch.arange(batch)
    for k in range(objects.shape[1]):  # in drawing order
        shape, colour, cx, cy, size = objects[:, k].unbind(-1)
        present = shape >= 0
        px, py = (cx * side).floor() + 0.5, (cy * side).floor() + 0.5
        sigma = (size * side / 6).clamp(min=0.7)
        dx, dy = (xs - px[:, None]) ** 2, (ys - py[:, None]) ** 2
        bump = torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma[:, None, None] ** 2))
        bump = bump * present[:, None, None]
        index = shape.clamp(min=0).long()
        centres[rows, index] = torch.maximum(centres[rows, index], bump)
        near = (dx[:, None, :] <= 1) & (dy[:, :, None] <= 1) & present[:, None, None]
        colours = torch.where(near, colour.long()[:, None, None], colours)
        sizes = torch.where(near, (size * side).clamp(min=1e-3).log()[:, None, None], sizes)
    return centres, colours, sizes


def _focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss: pixels where `target` is 1 are centres; the rest count less the
    nearer they are to one."""
    positive = target == 1
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    loss_positive = -(log_p * (1 - p) ** 2)[positive].sum()
    loss_negative = -(log_not_p * p**2 * (1 - target) ** 4)[~positive].sum()
    return (loss_positive + loss_negative) / positive.sum().clamp(min=1)


def _loss(scorer: SceneScorer, images, centres, colours, sizes) -> torch.Tensor:
    centre_logits, colour_logits, size_logs = scorer(images)
    loss = _focal_loss(centre_logits, centres)
    if (colours >= 0).any():
        loss = loss + F.cross_entropy(colour_logits, colours, ignore_index=-1)
        known = ~sizes.isnan()
        loss = loss + F.smooth_l1_loss(size_logs[:, 0][known], sizes[known])
    return loss


def _lr_at(step: int, steps: int, lr: float) -> float:
    # Short warm-up, then cosine to a twentieth; a function of the step alone, so --resume continues the curve.
    warm = min(1.0, (step + 1) / 50)
    return lr * warm * (0.05 + 0.475 * (1 + math.cos(math.pi * min(step / steps, 1.0))))


@dataclass(frozen=True)
class TrainSettings:
    r"""
    Knobs of [`train_scorer`].

    Args:
        steps (`int`, defaults to `3000`), batch_size (`int`, defaults to `12`), lr (`float`, defaults to `3e-3`):
            AdamW with a cosine decay to lr / 20.
        pool (`int`, defaults to `1200`): ordinary training scenes (stream `TRAIN_SEED`), rendered once at the
            scorer's resolution and augmented.
        hard_pool (`int`, defaults to `1500`): harder ones ([`hard_training_scene`]): many, small, touching and
            partly hidden objects.
        round_trip_share (`float`, defaults to `0.1`): share of each also passed through the autoencoder.
        crop (`int`, defaults to `128`): the network trains on random square crops of this side (it is
            convolutional: it reads whole images when judging).
        seed (`int`, defaults to `0`): seeds the weights, batches and augmentations.
        save_every (`int`, defaults to `200`): checkpoint interval in steps.
    """

    steps: int = 3000
    batch_size: int = 12
    lr: float = 3e-3
    pool: int = 1200
    hard_pool: int = 1500
    round_trip_share: float = 0.1
    crop: int = 128
    seed: int = 0
    save_every: int = 200


def train_scorer(out_dir: str | Path, settings: TrainSettings = TrainSettings(), *, vae: Any = None,
                 vae_name: str | None = None, resume: bool = False, init: str | Path | None = None,
                 report_scenes: int = 600,
                 tune_scenes: tuple[int, int] = (240, 120),
                 command: str | None = None, progress: bool = True,
                 log: Callable[[str], Any] = print) -> SceneScorer:  # fmt: skip
    r"""
    Train a [`SceneScorer`] on renders and save it, with a model card, to `out_dir`.

    The rendered pool (and its round trips) is kept in `out_dir/cache`, the model and optimizer in
    `out_dir/checkpoint`, so `resume=True` continues an interrupted run where it stopped.

    Args:
        out_dir (`str` or `Path`): the scorer folder (`config.json`, safetensors, `README.md`).
        settings (`TrainSettings`): steps, batch, learning rate, pool.
        vae (*optional*): an autoencoder (e.g. taef2 from `lssgen.training.data.load_vae`) whose round trip the scorer
            must read through, as it must read generated images.
        resume (`bool`, defaults to `False`): continue from `out_dir/checkpoint`.
        init (`str` or `Path`, *optional*): start a new run from this scorer's weights (a fine-tune: a fresh
            optimizer and learning-rate curve), e.g. to go on training the shipped one on a changed renderer.
        report_scenes (`int`, defaults to `600`): fresh renders the model card's accuracy is measured on
            ([`evaluate`]; with a `vae`, 2/5 as many more through its round trip).
        tune_scenes (`tuple[int, int]`, defaults to `(240, 120)`): harder and ordinary validation renders on which
            [`tune_decoding`] chooses how peaks become objects, before the report.

    Example:

    ```py
    >>> from lssgen.training.data import load_vae
    >>> scorer = train_scorer("scene-scorer", vae=load_vae("/work/shared/data/taef2"))
    ```
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT
    if settings.steps < 1 or settings.batch_size < 1 or settings.pool < 1:
        raise ValueError("--steps, --batch-size and --pool must be positive.")
    if not 0 <= settings.round_trip_share <= 1:
        raise ValueError(f"--round-trip-share must be in [0, 1], got {settings.round_trip_share}.")
    if resume and init is not None:
        raise ValueError("--init starts a new run from a scorer, --resume continues this one: pass one of them.")
    if resume and not (checkpoint / "optimizer.pt").is_file():
        raise ValueError(f"--resume: no checkpoint in {checkpoint}. Drop --resume to start a new run.")
    if not resume and out_dir.is_dir() and any(p.name != CACHE for p in out_dir.iterdir()):
        raise ValueError(f"--out {out_dir}: folder exists and is not empty. Pass --resume or choose a new folder.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file. Choose a folder path.")

    torch.manual_seed(settings.seed)
    if resume:
        scorer = SceneScorer.from_pretrained(checkpoint)
    elif init is not None:
        scorer = _load_scorer(init, "--init").train()
    else:
        scorer = SceneScorer()
    side = scorer.config.resolution
    if not 8 <= settings.crop <= side or settings.crop % 2:
        raise ValueError(
            f"--crop must be an even number of pixels from 8 to the resolution {side}, got {settings.crop}."
        )
    share = settings.round_trip_share if vae is not None else 0.0
    name = f"pool-seed{TRAIN_SEED}-{settings.pool}-hard{settings.hard_pool}-{side}px-rt{share:g}.safetensors"
    cache_file = out_dir / CACHE / name
    if cache_file.is_file():
        pool = load_file(str(cache_file))
    else:
        pool = render_pool(TRAIN_SEED, settings.pool, side, vae, share, progress, hard=settings.hard_pool)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in pool.items()}, str(cache_file))
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=settings.lr, weight_decay=1e-4)
    start = 0
    # Every run's command, so that the card of a resumed run says how all of its steps were made.
    history = checkpoint / "commands.txt"
    commands = history.read_text().splitlines() if resume and history.is_file() else []
    commands.append(f"{command or 'train_scorer (Python)'}  # to step {settings.steps}")
    checkpoint.mkdir(parents=True, exist_ok=True)
    history.write_text("\n".join(commands) + "\n")
    if resume:
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resuming from step {start}")
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + start)
    scorer.train()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="train scorer",
               disable=not progress)  # fmt: skip
    average = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, settings.lr)
        loss = _loss(scorer, *_batch(pool, settings.batch_size, settings.crop, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
        bar.set_postfix(loss=f"{average:.4f}")
        done = step + 1
        if done % settings.save_every == 0 or done == settings.steps:
            save_pretrained_here(scorer, checkpoint)
            torch.save({"optimizer": optimizer.state_dict(), "step": done}, checkpoint / "optimizer.pt")
    bar.close()
    scorer.eval()
    seconds = time.perf_counter() - started
    log(f"trained to step {settings.steps} in {seconds:.0f} s (this run); choosing how peaks become objects")
    tuned = tune_decoding(scorer, *tune_scenes, progress=progress)
    log(format_tuning(tuned))
    log("measuring on fresh renders")
    report = evaluate(scorer, report_scenes, vae=vae, round_trip_scenes=report_scenes * 2 // 5, progress=progress)
    log(format_report(report))
    save_pretrained_here(scorer, out_dir)
    _write_model_card(out_dir / "README.md", settings, report, vae_name, seconds, commands)
    write_tuning(out_dir / "README.md", tuned, command)
    return scorer


THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
MERGE_DISTANCES = (0.2, 0.3, 0.4, 0.5)


@torch.no_grad()
def tune_decoding(scorer: SceneScorer, hard: int = 240, ordinary: int = 120, progress: bool = True) -> dict:
    r"""
    Choose the scorer's `threshold` and `merge_distance` (how peaks become objects) on the validation stream
    `VALIDATION_SEED`, which training and every report leave alone: `hard` scenes of [`hard_training_scene`] rendered
    at 512 px and `ordinary` ones at 256 px. The network runs once per image; each pair of `THRESHOLDS` x
    `MERGE_DISTANCES` decodes its maps, and the pair with the most images whose objects (shape and colour, with
    their numbers) are exactly the drawn ones is set in the scorer's config.

    Returns:
        `{"threshold": float, "merge_distance": float, "right": {(threshold, merge_distance): share}, "images": int}`.
    """
    renders = [(hard_training_scene(VALIDATION_SEED, i), 512) for i in range(hard)]
    renders += [(sample_scene(VALIDATION_SEED, i), 256) for i in range(ordinary)]
    maps = []
    for start in tqdm(range(0, len(renders), 16), desc="tuning", leave=False, disable=not progress):
        batch = renders[start : start + 16]
        pixels = scorer.prepare([render(scene, side) for scene, side in batch])
        centres, colours, sizes = scorer(pixels)
        maps += list(zip(centres.sigmoid(), colours, sizes))
    truths = [sorted((o.shape, o.colour) for o in scene.objects) for scene, _ in renders]
    right = {}
    for threshold in THRESHOLDS:
        for merge in MERGE_DISTANCES:
            found = [sorted((o.shape, o.colour) for o in _objects(*m, threshold, merge)) for m in maps]
            right[threshold, merge] = sum(f == t for f, t in zip(found, truths)) / len(renders)
    threshold, merge = max(right, key=right.get)
    scorer.register_to_config(threshold=threshold, merge_distance=merge)
    return {"threshold": threshold, "merge_distance": merge, "right": right, "images": len(renders)}


def format_tuning(tuned: dict) -> str:
    r"""The table of [`tune_decoding`]: the share of validation images exactly right per threshold and merge
    distance, the chosen pair in bold."""
    lines = ["| threshold | " + " | ".join(f"merge {m:g}" for m in MERGE_DISTANCES) + " |"]
    lines.append("|---:|" + "---:|" * len(MERGE_DISTANCES))
    for threshold in THRESHOLDS:
        cells = []
        for merge in MERGE_DISTANCES:
            cell = f"{tuned['right'][threshold, merge]:.1%}"
            chosen = (threshold, merge) == (tuned["threshold"], tuned["merge_distance"])
            cells.append(f"**{cell}**" if chosen else cell)
        lines.append(f"| {threshold:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TUNING_HEADING = "## How peaks become objects"


def write_tuning(card: Path, tuned: dict, command: str | None) -> None:
    """The model card's section on [`tune_decoding`] (replacing an earlier one)."""
    text = card.read_text() if card.is_file() else "# SceneScorer\n"
    text = text.split("\n" + TUNING_HEADING)[0].rstrip("\n")
    how = f"`{command}`" if command else "`lssgen.scenes.scorer.tune_decoding` (Python)"
    card.write_text(
        f"{text}\n\n{TUNING_HEADING}\n\nthreshold {tuned['threshold']:g}, merge distance {tuned['merge_distance']:g}: "
        f"chosen on {tuned['images']} validation renders (stream {VALIDATION_SEED}: harder scenes at 512 px, "
        f"ordinary ones at 256 px) by {how}. Share of images whose objects (shape, colour, number) are exactly the "
        f"drawn ones:\n\n{format_tuning(tuned)}\n"
    )


def evaluate(scorer: SceneScorer, scenes: int = 600, seed: int = REPORT_SEED, vae: Any = None,
             round_trip_seed: int = ROUND_TRIP_REPORT_SEED, round_trip_scenes: int = 240, side: int = 256,
             round_trip_side: int = 128, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    r"""
    The scorer's accuracy on fresh renders (streams no training run uses), per category: the share of images
    judged to match their own caption (`true`) and the share judged not to match a deliberately wrong caption
    (`wrong`: another shape, count, colour, the opposite side, swapped colours; `lssgen.scenes.wrong_check`).

    Renders are made at `side` px and resized by the scorer, as generated images would be. With a `vae`, the
    same is measured on `round_trip_scenes` other renders made at `round_trip_side` px and passed through its
    round trip (128 px: a 16 x 16 latent, coarser than a 256 px generation's, so a harder test).

    Returns:
        `{"renders": {category: {"true": float, "wrong": float, "n": int}}, "round trip": {...}}`.
    """
    report = {"renders": _accuracy(scorer, seed, scenes, side, None, progress)}
    if vae is not None:
        report["taef2 round trip"] = _accuracy(
            scorer, round_trip_seed, round_trip_scenes, round_trip_side, vae, progress
        )
    return report


def _accuracy(scorer, seed, count, side, vae, progress) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    tallies = {category: {"true": 0, "wrong": 0, "n": 0} for category in CATEGORIES}
    for start in tqdm(range(0, count, 24), desc=f"evaluating seed {seed}", leave=False, disable=not progress):
        scenes = [sample_scene(seed, i) for i in range(start, min(start + 24, count))]
        pixels = torch.stack([_as_float(render(s, side)) for s in scenes])
        if vae is not None:
            pixels = _round_trip(vae, pixels)
        right = scorer.score(pixels, scenes)
        wrong = scorer.score(pixels, [wrong_check(s.check, rng) for s in scenes])
        for scene, r, w in zip(scenes, right, wrong):
            tally = tallies[scene.category]
            tally["n"] += 1
            tally["true"] += r.passed
            tally["wrong"] += not w.passed
    return {c: {"true": t["true"] / t["n"], "wrong": t["wrong"] / t["n"], "n": t["n"]} for c, t in tallies.items()}


def format_report(report: dict[str, dict[str, dict[str, float]]]) -> str:
    r"""The accuracy table of [`evaluate`] as Markdown."""
    sets = list(report)
    header = "| category (attribute) | " + " | ".join(f"{s}: true / wrong caption" for s in sets) + " |"
    lines = [header, "|---|" + "---:|" * len(sets)]
    for category in CATEGORIES:
        cells = [
            f"{report[s][category]['true']:.1%} / {report[s][category]['wrong']:.1%} (n={report[s][category]['n']})"
            for s in sets
        ]
        lines.append(f"| {category} ({ATTRIBUTES[category]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_model_card(path: Path, settings: TrainSettings, report, vae_name: str | None, seconds: float,
                      commands: list[str]) -> None:  # fmt: skip
    trips = f", {settings.round_trip_share:.0%} also through the {vae_name} round trip" if vae_name else ""
    facts = {
        "command": "; then ".join(f"`{line}`" for line in commands),
        "data": f"{settings.pool} renders of `lssgen.scenes` stream {TRAIN_SEED} and {settings.hard_pool} harder ones "
        f"(`hard_training_scene`: up to 20 objects, 0.2-1.1 of the usual size, apart, touching or partly hidden) at "
        f"the scorer's resolution{trips}; augmented with blur, noise, colour shifts and low-resolution copies",
        "training": f"{settings.steps} steps on random {settings.crop} px crops, batch {settings.batch_size}, AdamW lr "
        f"{settings.lr:g} cosine to {settings.lr / 20:g}, seed {settings.seed}",
        "time": f"{seconds:.0f} s for the last run (torch {torch.__version__}, {torch.get_num_threads()} threads)",
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    path.write_text(
        "# SceneScorer\n\nA GenEval-style judge for the scenes of `lssgen.scenes`: a small U-Net finds each object "
        "by its centre (a heatmap per shape), with its colour and size; GenEval's rules on top. Load it with "
        "`lssgen.scenes.scorer.SceneScorer.from_pretrained(this_folder)`.\n\n"
        f"| | |\n|---|---|\n{rows}\n\n## Accuracy on fresh renders\n\n"
        f"Streams {REPORT_SEED} (renders at 256 px) and {ROUND_TRIP_REPORT_SEED} (renders at 128 px through the round "
        "trip), which training never sees. `true`: the image is judged to match its own caption; `wrong`: judged not "
        "to match a deliberately wrong one (another shape, count or colour, the opposite side, swapped colours).\n\n"
        f"{format_report(report)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lssgen.scenes.scorer", description=__doc__.strip().split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SceneScorer on renders")
    train.add_argument("--out", required=True, help="folder for the scorer, its model card, cache and checkpoint")
    defaults = TrainSettings()
    for name in ("steps", "batch_size", "pool", "hard_pool", "crop", "seed", "save_every"):
        train.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "round_trip_share"):
        train.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    train.add_argument("--taef2", help="autoencoder folder (taef2) for round-trip augmentation and its report")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.add_argument("--init", help="start from this SceneScorer folder's weights (a fine-tune), not from random")
    train.add_argument("--report-scenes", type=int, default=600, help="fresh renders for the model card's table")
    train.add_argument(
        "--tune-scenes",
        type=int,
        nargs=2,
        default=(240, 120),
        metavar=("HARD", "ORDINARY"),
        help="validation renders for choosing the threshold and merge distance (see the tune command)",
    )
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tune = commands.add_parser("tune", help="choose threshold and merge distance on validation renders, in place")
    tune.add_argument("--scorer", required=True, help="a SceneScorer folder: its config.json and README.md change")
    tune.add_argument("--hard", type=int, default=240, help="harder validation scenes, at 512 px")
    tune.add_argument("--ordinary", type=int, default=120, help="ordinary validation scenes, at 256 px")
    tune.add_argument("--threads", type=int)
    evaluation = commands.add_parser("evaluate", help="accuracy per category on fresh renders")
    evaluation.add_argument("--scorer", required=True, help="a SceneScorer folder")
    evaluation.add_argument("--scenes", type=int, default=600)
    evaluation.add_argument("--seed", type=int, default=REPORT_SEED)
    evaluation.add_argument("--taef2", help="also measure through this autoencoder's round trip")
    evaluation.add_argument("--round-trip-scenes", type=int, default=240)
    evaluation.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        vae = _load_taef2(args.taef2) if getattr(args, "taef2", None) else None
        if args.command == "train":
            settings = TrainSettings(**{name: getattr(args, name) for name in TrainSettings.__dataclass_fields__})
            train_scorer(
                args.out,
                settings,
                vae=vae,
                vae_name="taef2" if vae else None,
                resume=args.resume,
                init=args.init,
                report_scenes=args.report_scenes,
                tune_scenes=tuple(args.tune_scenes),
                command=_command(argv),
            )
        elif args.command == "tune":
            scorer = _load_scorer(args.scorer)
            tuned = tune_decoding(scorer, args.hard, args.ordinary)
            print(format_tuning(tuned))
            save_pretrained_here(scorer, args.scorer)
            write_tuning(Path(args.scorer) / "README.md", tuned, _command(argv))
        else:
            scorer = _load_scorer(args.scorer)
            report = evaluate(scorer, args.scenes, args.seed, vae, round_trip_scenes=args.round_trip_scenes)
            print(format_report(report))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _command(argv: list[str] | None) -> str:
    return " ".join(["python -m lssgen.scenes.scorer", *(sys.argv[1:] if argv is None else argv)])


def _load_taef2(folder: str) -> Any:
    from lssgen.training.data import load_vae

    return load_vae(folder)


def _load_scorer(folder: str | Path, option: str = "--scorer") -> SceneScorer:
    try:
        return SceneScorer.from_pretrained(folder).eval()
    except OSError as error:
        raise ValueError(f"{option} {folder}: {error}") from None


if __name__ == "__main__":
    raise SystemExit(main())
