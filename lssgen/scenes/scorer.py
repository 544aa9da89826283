r"""
An automatic GenEval-style judge for the scene vocabulary of `lssgen.scenes`, trained on its renders.

[`SceneScorer`] is two small networks. A U-Net reads the image at 128 px and gives, per pixel at 64 px, a shape
class (one of the 8 shapes, or background) and a colour class. Connected regions of object pixels become
objects; a classifier reads each one's shape from a crop around it, its pixels vote for its colour, and its
centroid is its position. GenEval's rules (`lssgen.scenes.satisfies`) then decide whether the image shows what
its caption asks: the objects named, the count, the colours, the relative position, which colour goes with which
object.

Train (about 20 minutes on 2 CPU cores: the U-Net, then the shape classifier), then measure on fresh renders:

```bash
python -m lssgen.scenes.scorer train --out weights/scene-scorer --taef2 /work/shared/data/taef2
python -m lssgen.scenes.scorer evaluate --scorer weights/scene-scorer --taef2 /work/shared/data/taef2
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
    SHAPES,
    Check,
    Scene,
    SceneObject,
    parse_caption,
    render_with_labels,
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
    Per-pixel shape and colour classes of a scene image, and the GenEval-style verdicts built on them.

    Args:
        resolution (`int`, defaults to `128`): images are resized to this square before the network sees them.
        block_out_channels (`tuple[int, ...]`, defaults to `(16, 32, 48, 64)`): widths at 1/2, 1/4, 1/8, 1/16.
        min_area (`float`, defaults to `0.005`): smallest object, a fraction of the image's area; smaller
            regions are ignored as specks.
        crop_size (`int`, defaults to `32`), classifier_channels (`tuple[int, ...]`, defaults to
            `(32, 48, 64, 96)`): the shape classifier's input (a square crop around each object, its pixels and
            its mask) and widths.

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
        resolution: int = 128,
        block_out_channels: tuple[int, ...] = (16, 32, 48, 64),
        min_area: float = 0.005,
        crop_size: int = 32,
        classifier_channels: tuple[int, ...] = (32, 48, 64, 96),
    ):
        super().__init__()
        widths = list(block_out_channels)
        self.down = nn.ModuleList(
            _block(c_in, c_out, stride=2) for c_in, c_out in zip([3, *widths[:-1]], widths)
        )  # each halves the side
        # Shapes are told apart by their whole outline: two more convolutions at the coarsest level widen the
        # receptive field past the largest object.
        self.middle = _block(widths[-1], widths[-1])
        # One convolution per level on the way up: the outline is known by then, only its edges are placed.
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i], convolutions=1) for i in reversed(range(len(widths) - 1))
        )
        self.shape_head = nn.Conv2d(widths[0], len(SHAPES) + 1, 1)
        self.colour_head = nn.Conv2d(widths[0], len(COLOURS), 1)
        # The shape is read again from a crop around each object, at a size that does not depend on the object's:
        # the per-pixel classes are good at where objects are and their colour, less so at telling a small
        # triangle from a crescent (measured: 4 of 12 test scenes wrong with the per-pixel vote alone).
        stages = list(classifier_channels)
        layers: list[nn.Module] = [nn.Conv2d(4, stages[0], 3, padding=1), nn.GroupNorm(8, stages[0]), nn.SiLU()]
        for c_in, c_out in zip(stages[:-1], stages[1:]):
            layers.append(_block(c_in, c_out, stride=2, convolutions=1))
        self.classifier = nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(stages[-1], len(SHAPES))
        )

    def _encode(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = (pixels - 0.5) / 0.25
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        return skips, self.middle(x)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`(B, 3, R, R)` images in [0, 1] → shape logits `(B, 9, R/2, R/2)` (class 0: background) and colour
        logits `(B, 8, R/2, R/2)`."""
        skips, x = self._encode(pixels)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.shape_head(x), self.colour_head(x)

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
        tensors = [torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255) for image in images]
        return torch.cat([self._resize(t.permute(2, 0, 1)[None].to(self.device)) for t in tensors])

    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        side = self.config.resolution
        if pixels.shape[-2:] != (side, side):
            reduce = pixels.shape[-1] > side
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=reduce, align_corners=False)
        return pixels.clamp(0, 1)

    def regions(self, pixels: torch.Tensor) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        r"""The object regions of prepared images: per image a list of `(R/2, R/2)` bool masks (specks below
        `min_area` dropped), and the colour logits."""
        shape_logits, colour_logits = self(pixels)
        regions = _connected_regions(shape_logits.argmax(1) != 0)
        min_pixels = self.config.min_area * regions.shape[-1] ** 2
        masks = []
        for labels in regions:
            numbers = [n for n in labels.unique().tolist() if n != 0]
            masks.append([m for m in (labels == n for n in numbers) if m.sum() >= min_pixels])
        return masks, colour_logits

    def classify(self, pixels: torch.Tensor, masks: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        r"""Shape logits `(N, 8)` of `N` objects: `masks` `(N, R/2, R/2)`, each in image `owners[n]` of `pixels`."""
        return self.classifier(_crops(pixels, masks, owners, self.config.crop_size))

    @torch.no_grad()
    def detect(self, images: Any) -> list[tuple[SceneObject, ...]]:
        r"""The objects in each image: connected regions of object pixels, with the shape the classifier reads
        from a crop around each, the colour its pixels vote for, its centroid and (as `size`) the side of a square
        of the same area, in fractions of the image side."""
        pixels = self.prepare(images)
        masks, colour_logits = self.regions(pixels)
        colour_probs = colour_logits.softmax(1)
        flat = [mask for per_image in masks for mask in per_image]
        owners = torch.tensor([b for b, per_image in enumerate(masks) for _ in per_image], dtype=torch.long)
        shapes = self.classify(pixels, torch.stack(flat), owners).argmax(1).tolist() if flat else []
        side = colour_logits.shape[-1]
        grid = (torch.arange(side, device=self.device) + 0.5) / side
        ys, xs = torch.meshgrid(grid, grid, indexing="ij")
        found, shapes = [], iter(shapes)
        for b, per_image in enumerate(masks):
            objects = []
            for mask in per_image:
                colour = int(colour_probs[b, :, mask].sum(1).argmax())
                centre = (float(xs[mask].mean()), float(ys[mask].mean()))
                size = math.sqrt(int(mask.sum())) / side
                objects.append(SceneObject(SHAPES[next(shapes)], list(COLOURS)[colour], centre, size))
            found.append(tuple(sorted(objects, key=lambda o: (o.centre[1], o.centre[0]))))
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


def _crops(pixels: torch.Tensor, masks: torch.Tensor, owners: torch.Tensor, size: int) -> torch.Tensor:
    """`(N, 4, size, size)`: a square around each mask's box (with a margin), of its image's pixels and of the mask."""
    side = masks.shape[-1]
    present_y, present_x = masks.any(2), masks.any(1)
    index = torch.arange(side, device=masks.device)
    big = side + 1

    def span(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.where(present, index, big).min(1).values
        high = torch.where(present, index, -1).max(1).values + 1
        return low.float() / side, high.float() / side

    (y0, y1), (x0, x1) = span(present_y), span(present_x)
    half = torch.maximum(x1 - x0, y1 - y0) * 0.6 + 1 / side  # in [0, 1] units: half the side plus a margin
    theta = torch.zeros(len(masks), 2, 3, device=masks.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 2 * half
    theta[:, 0, 2], theta[:, 1, 2] = x0 + x1 - 1, y0 + y1 - 1
    grid = F.affine_grid(theta, (len(masks), 1, size, size), align_corners=False)
    image = F.grid_sample(pixels[owners], grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = F.grid_sample(masks[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.cat([(image - 0.5) / 0.25, mask * 2 - 1], dim=1)


def _connected_regions(mask: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` bool → int labels, equal within each 8-connected region of True pixels, 0 elsewhere.

    Every pixel starts with its own number and takes its neighbours' largest until nothing changes: plain torch,
    batched, and as many passes as the widest region is long (a few dozen at 64 px).
    """
    height, width = mask.shape[-2:]
    numbers = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).reshape(1, height, width)
    labels = numbers * mask
    while True:
        spread = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(spread, labels):
            return labels.long()
        labels = spread


# --- data and training -----------------------------------------------------------------------------------------


def _targets(scene: Scene, labels: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel shape class (0: background) and colour class (-1: none) at `side`, from a label map at 2x."""
    labels = labels[1::2, 1::2] if labels.shape[0] == 2 * side else labels
    shapes = np.zeros(labels.shape, dtype=np.int64)
    colours = np.full(labels.shape, -1, dtype=np.int64)
    for number, obj in enumerate(scene.objects, start=1):
        shapes[labels == number] = SHAPES.index(obj.shape) + 1
        colours[labels == number] = list(COLOURS).index(obj.colour)
    return shapes, colours


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


def render_pool(seed: int, count: int, side: int, vae: Any = None, round_trip_share: float = 0.0,
                progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    r"""
    `count` scenes of stream `seed` rendered at `side`: `images` uint8 `(N, 3, side, side)`, per-pixel targets at
    half the side (`shapes`, `colours`), and with a `vae` the first `round_trip_share` of the images also
    passed through it (`round_trip`, for the same scenes).
    """
    images, shapes, colours = [], [], []
    for index in tqdm(range(count), desc=f"rendering seed {seed}", leave=False, disable=not progress):
        scene = sample_scene(seed, index)
        image, labels = render_with_labels(scene, side)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        shape, colour = _targets(scene, labels, side // 2)
        shapes.append(torch.from_numpy(shape.astype(np.uint8)))
        colours.append(torch.from_numpy((colour + 1).astype(np.uint8)))  # uint8: -1 stored as 0
    pool = {"images": torch.stack(images), "shapes": torch.stack(shapes), "colours": torch.stack(colours)}
    trips = int(round(count * round_trip_share)) if vae is not None else 0
    if trips:
        pixels = pool["images"][:trips].float() / 255
        done = []
        for start in tqdm(range(0, trips, 16), desc="taef2 round trips", leave=False, disable=not progress):
            done.append(_round_trip(vae, pixels[start : start + 16]))
        pool["round_trip"] = (torch.cat(done) * 255 + 0.5).to(torch.uint8)
    return pool


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


def _batch(pool: dict[str, torch.Tensor], size: int, generator: torch.Generator):
    picks = torch.randint(0, len(pool["images"]), (size,), generator=generator)
    images = pool["images"][picks].float() / 255
    if "round_trip" in pool:
        trips = len(pool["round_trip"])
        # Half the time an image that has a round trip is shown as it came back from it.
        swap = (picks < trips) & (torch.rand(size, generator=generator) < 0.5)
        if swap.any():
            images[swap] = pool["round_trip"][picks[swap]].float() / 255
    return _augment(images, generator), pool["shapes"][picks].long(), pool["colours"][picks].long() - 1


# Object pixels are a few percent of an image; weighting them up keeps the loss on what the checks read.
_SHAPE_WEIGHTS = torch.tensor([1.0] + [4.0] * len(SHAPES))


def _loss(scorer: SceneScorer, images, shapes, colours) -> torch.Tensor:
    shape_logits, colour_logits = scorer(images)
    shape_loss = F.cross_entropy(shape_logits, shapes, weight=_SHAPE_WEIGHTS.to(shape_logits))
    return shape_loss + F.cross_entropy(colour_logits, colours, ignore_index=-1)


def _classifier_loss(scorer: SceneScorer, pool, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy of the shape classifier on the regions the (frozen) U-Net finds in a batch: the crops it
    will see when judging, each labelled with the shape drawn under most of it (made-up regions are skipped)."""
    images, shapes, _ = _batch(pool, batch_size, generator)
    with torch.no_grad():
        masks, _ = scorer.regions(images)
    flat, owners, labels = [], [], []
    for b, per_image in enumerate(masks):
        for mask in per_image:
            drawn = shapes[b][mask]
            drawn = drawn[drawn > 0]
            if len(drawn) * 2 < int(mask.sum()):
                continue
            flat.append(mask)
            owners.append(b)
            labels.append(int(drawn.mode().values) - 1)
    if not flat:
        return scorer.classifier[-1].bias.sum() * 0  # nothing found: a zero loss keeps the step count
    return F.cross_entropy(scorer.classify(images, torch.stack(flat), torch.tensor(owners)), torch.tensor(labels))


def _lr_at(step: int, steps: int, lr: float) -> float:
    # Short warm-up, then cosine to a twentieth; a function of the step alone, so --resume continues the curve.
    warm = min(1.0, (step + 1) / 50)
    return lr * warm * (0.05 + 0.475 * (1 + math.cos(math.pi * min(step / steps, 1.0))))


@dataclass(frozen=True)
class TrainSettings:
    r"""
    Knobs of [`train_scorer`].

    Args:
        steps (`int`, defaults to `900`), batch_size (`int`, defaults to `16`), lr (`float`, defaults to `3e-3`):
            AdamW with a cosine decay to lr / 20.
        pool (`int`, defaults to `2000`): training scenes (stream `TRAIN_SEED`), rendered once and augmented.
        round_trip_share (`float`, defaults to `0.2`): share of them also passed through the autoencoder.
        seed (`int`, defaults to `0`): seeds the weights, batches and augmentations.
        save_every (`int`, defaults to `200`): checkpoint interval in steps.
        classifier_steps (`int`, defaults to `400`): then, with the U-Net frozen, steps of the shape classifier
            on crops around the regions the U-Net finds (each labelled with the shape drawn under it).
    """

    steps: int = 900
    batch_size: int = 16
    lr: float = 3e-3
    pool: int = 2000
    round_trip_share: float = 0.2
    seed: int = 0
    save_every: int = 200
    classifier_steps: int = 400


def train_scorer(out_dir: str | Path, settings: TrainSettings = TrainSettings(), *, vae: Any = None,
                 vae_name: str | None = None, resume: bool = False, report_scenes: int = 600,
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
        report_scenes (`int`, defaults to `600`): fresh renders the model card's accuracy is measured on
            ([`evaluate`]; with a `vae`, 2/5 as many more through its round trip).

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
    if resume and not (checkpoint / "optimizer.pt").is_file():
        raise ValueError(f"--resume: no checkpoint in {checkpoint}. Drop --resume to start a new run.")
    if not resume and out_dir.is_dir() and any(p.name != CACHE for p in out_dir.iterdir()):
        raise ValueError(f"--out {out_dir}: folder exists and is not empty. Pass --resume or choose a new folder.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file. Choose a folder path.")

    torch.manual_seed(settings.seed)
    scorer = SceneScorer.from_pretrained(checkpoint) if resume else SceneScorer()
    side = scorer.config.resolution
    share = settings.round_trip_share if vae is not None else 0.0
    cache_file = out_dir / CACHE / f"pool-seed{TRAIN_SEED}-{settings.pool}-{side}px-rt{share:g}.safetensors"
    if cache_file.is_file():
        pool = load_file(str(cache_file))
    else:
        pool = render_pool(TRAIN_SEED, settings.pool, side, vae, share, progress)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in pool.items()}, str(cache_file))
    # Two stages, one step counter: the U-Net (segmentation, colour) for `steps`, then with it frozen the shape
    # classifier on crops around the regions it finds, for `classifier_steps`.
    total = settings.steps + settings.classifier_steps
    start, state = 0, None
    if resume:
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        start = state["step"]
        log(f"resuming from step {start}")
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + start)
    scorer.train()
    bar = tqdm(range(start, total), initial=start, total=total, desc="train scorer", disable=not progress)
    average, optimizer, optimizer_stage = None, None, None
    for step in bar:
        stage = 1 if step < settings.steps else 2
        if stage != optimizer_stage:
            parameters = [p for n, p in scorer.named_parameters() if n.startswith("classifier.") == (stage == 2)]
            optimizer, optimizer_stage = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=1e-4), stage
            if state is not None and state.get("stage", 1) == stage:
                optimizer.load_state_dict(state["optimizer"])
            average = None
        first, steps = (0, settings.steps) if stage == 1 else (settings.steps, settings.classifier_steps)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step - first, steps, settings.lr)
        if stage == 1:
            loss = _loss(scorer, *_batch(pool, settings.batch_size, generator))
        else:
            loss = _classifier_loss(scorer, pool, settings.batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
        bar.set_postfix(stage=stage, loss=f"{average:.4f}")
        done = step + 1
        if done % settings.save_every == 0 or done in (settings.steps, total):
            save_pretrained_here(scorer, checkpoint)
            state = {"optimizer": optimizer.state_dict(), "step": done, "stage": stage}
            torch.save(state, checkpoint / "optimizer.pt")
    bar.close()
    scorer.eval()
    seconds = time.perf_counter() - started
    log(f"trained to step {total} in {seconds:.0f} s (this run); measuring on fresh renders")
    report = evaluate(scorer, report_scenes, vae=vae, round_trip_scenes=report_scenes * 2 // 5, progress=progress)
    log(format_report(report))
    save_pretrained_here(scorer, out_dir)
    _write_model_card(out_dir / "README.md", settings, report, vae_name, seconds, command)
    return scorer


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
        pixels = torch.stack(
            [torch.from_numpy(np.asarray(render_with_labels(s, side)[0], dtype=np.float32) / 255) for s in scenes]
        ).permute(0, 3, 1, 2)
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
                      command: str | None) -> None:  # fmt: skip
    trips = f", {settings.round_trip_share:.0%} also through the {vae_name} round trip" if vae_name else ""
    facts = {
        "command": f"`{command}`" if command else "`lssgen.scenes.scorer.train_scorer` (Python)",
        "data": f"{settings.pool} renders of `lssgen.scenes` stream {TRAIN_SEED} at 128 px{trips}; augmented with "
        "blur, noise, colour shifts and low-resolution copies",
        "training": f"U-Net {settings.steps} steps, then shape classifier {settings.classifier_steps} steps; batch "
        f"{settings.batch_size} images, AdamW lr {settings.lr:g} cosine to {settings.lr / 20:g}, seed {settings.seed}",
        "time": f"{seconds:.0f} s for the last run (torch {torch.__version__}, {torch.get_num_threads()} threads)",
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    path.write_text(
        "# SceneScorer\n\nA GenEval-style judge for the scenes of `lssgen.scenes`: per-pixel shape and colour classes "
        "from a small U-Net, connected regions as objects, GenEval's rules on top. Load it with "
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
    for name in ("steps", "batch_size", "pool", "seed", "save_every", "classifier_steps"):
        train.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "round_trip_share"):
        train.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    train.add_argument("--taef2", help="autoencoder folder (taef2) for round-trip augmentation and its report")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.add_argument("--report-scenes", type=int, default=600, help="fresh renders for the model card's table")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
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
        vae = _load_taef2(args.taef2) if args.taef2 else None
        if args.command == "train":
            settings = TrainSettings(**{name: getattr(args, name) for name in TrainSettings.__dataclass_fields__})
            train_scorer(
                args.out,
                settings,
                vae=vae,
                vae_name="taef2" if vae else None,
                resume=args.resume,
                report_scenes=args.report_scenes,
                command=" ".join(["python -m lssgen.scenes.scorer", *(sys.argv[1:] if argv is None else argv)]),
            )
        else:
            scorer = _load_scorer(args.scorer)
            report = evaluate(scorer, args.scenes, args.seed, vae, round_trip_scenes=args.round_trip_scenes)
            print(format_report(report))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _load_taef2(folder: str) -> Any:
    from lssgen.training.data import load_vae

    return load_vae(folder)


def _load_scorer(folder: str | Path) -> SceneScorer:
    try:
        return SceneScorer.from_pretrained(folder).eval()
    except OSError as error:
        raise ValueError(f"--scorer {folder}: {error}") from None


if __name__ == "__main__":
    raise SystemExit(main())
