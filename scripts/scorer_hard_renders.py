"""The scene scorer's counting on renders harder than those it was trained on (issue #24, item 2).

The duplication measure (`lssgen.scenes.tally_instances`) is only as good as the scorer's counting, and images made
above a model's native size hold many, small, touching objects. Here the scorer reads renders of
`lssgen.scenes.world.sample_hard_scene` at 512 px, in cells of one kind of difficulty each: 2-4 or 8-20 objects, at
the usual size, half of it or a quarter of it, laid out apart, touching in pairs or partly hiding each other in
pairs; and for reference ordinary scenes (`sample_scene`) at 256 and at 512 px. Every cell uses the same base
scenes, `sample_scene(SEED, i)` for i < --per-cell, and the object counts of a range in turn. No training run sees
these scenes: the scorer trains on streams 0 (ordinary scenes and `lssgen.scenes.scorer.hard_training_scene`), and
1-3 are its validation and reports.

Per image: `counts right` when the scorer finds, for every shape, as many objects as were drawn (partly hidden ones
included); `tally right` when the duplication measure on what it found equals the measure on what was drawn. Per
drawn object: `found` when a detection lies within half its size (plus a pixel of the scorer's map, a 128th of the
side) of its centre, one detection per object, nearest first; `shape right` when that detection has its shape.

    python -m scripts.scorer_hard_renders --per-cell 48 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import lssgen
from lssgen.scenes.scorer import SceneScorer
from lssgen.scenes.world import (
    COLOURS,
    LAYOUTS,
    SHAPES,
    Scene,
    SceneObject,
    render,
    sample_hard_scene,
    sample_scene,
    tally_instances,
)

# A stream no scorer training, validation or report uses (those are 0-3; see lssgen.scenes.scorer).
SEED = 5
HARD_SIDE = 512
SCORER_PIXEL = 1 / 128  # the scorer marks centres at 128 px
COUNT_RANGES = ((2, 4), (8, 20))
# (object counts, scale) of the hard cells, each in every layout; 8-20 objects of the usual size do not fit apart.
HARD_KINDS = (((2, 4), 1.0), ((2, 4), 0.5), ((2, 4), 0.25), ((8, 20), 0.5), ((8, 20), 0.25))


@dataclass(frozen=True)
class Cell:
    """One kind of difficulty: `layout` None means ordinary scenes (`sample_scene`) at `side` px."""

    counts: tuple[int, int] | None
    scale: float | None
    layout: str | None
    side: int = HARD_SIDE

    @property
    def name(self) -> str:
        if self.layout is None:
            return f"ordinary scenes, {self.side} px"
        low, high = self.counts
        size = {1.0: "usual size", 0.5: "half size", 0.25: "quarter size"}[self.scale]
        return f"{low}-{high} objects, {size}, {self.layout}"

    def scene(self, index: int) -> Scene:
        if self.layout is None:
            return sample_scene(SEED, index)
        low, high = self.counts
        count = low + index % (high - low + 1)
        return sample_hard_scene(SEED, index, count, scale=self.scale, layout=self.layout)


def cells() -> list[Cell]:
    hard = [Cell(counts, scale, layout) for layout in LAYOUTS for counts, scale in HARD_KINDS]
    return [Cell(None, None, None, side=256), Cell(None, None, None), *hard]


@dataclass
class Tally:
    images: int = 0
    counts_right: int = 0
    tally_right: int = 0
    drawn: int = 0
    found: int = 0
    shape_right: int = 0
    detections: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Results:
    by_cell: dict[str, Tally] = field(default_factory=dict)
    by_shape: dict[str, Tally] = field(default_factory=lambda: {shape: Tally() for shape in SHAPES})
    by_colour: dict[str, Tally] = field(default_factory=lambda: {colour: Tally() for colour in COLOURS})


def match(drawn: tuple[SceneObject, ...], found: tuple[SceneObject, ...]) -> dict[int, int]:
    """Drawn object index -> detection index: each pair within reach, nearest first, each used once."""
    pairs = []
    for i, obj in enumerate(drawn):
        reach = obj.size / 2 + SCORER_PIXEL
        for j, seen in enumerate(found):
            distance = math.dist(obj.centre, seen.centre)
            if distance <= reach:
                pairs.append((distance, i, j))
    matched: dict[int, int] = {}
    used: set[int] = set()
    for _, i, j in sorted(pairs):
        if i not in matched and j not in used:
            matched[i] = j
            used.add(j)
    return matched


def judge(scene: Scene, found: tuple[SceneObject, ...], results: Results, cell: Cell) -> None:
    image = Tally(images=1, drawn=len(scene.objects), detections=len(found))
    shapes_found, shapes_drawn = (collections.Counter(o.shape for o in objects) for objects in (found, scene.objects))
    image.counts_right = int(shapes_found == shapes_drawn)
    image.tally_right = int(tally_instances(scene.check, found) == tally_instances(scene.check, scene.objects))
    matched = match(scene.objects, found)
    for i, obj in enumerate(scene.objects):
        hit = i in matched
        right = hit and found[matched[i]].shape == obj.shape
        image.found += hit
        image.shape_right += right
        if cell.layout is not None:  # per kind: the hard renders only
            for table, key in ((results.by_shape, obj.shape), (results.by_colour, obj.colour)):
                table[key].add(Tally(drawn=1, found=hit, shape_right=right))
    results.by_cell.setdefault(cell.name, Tally()).add(image)


def percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def tables(results: Results, all_cells: list[Cell]) -> str:
    lines = [
        "| renders (512 px unless said) | images | counts right | tally right | objects found | shape right "
        "| objects drawn / detected |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, t: Tally) -> str:
        return (
            f"| {name} | {t.images} | {percent(t.counts_right, t.images)} | {percent(t.tally_right, t.images)} | "
            f"{percent(t.found, t.drawn)} | {percent(t.shape_right, t.drawn)} | {t.drawn} / {t.detections} |"
        )

    for cell in all_cells:
        lines.append(row(cell.name, results.by_cell[cell.name]))
    hard = [cell for cell in all_cells if cell.layout is not None]
    margins = {
        **{f"all {layout}": [c for c in hard if c.layout == layout] for layout in LAYOUTS},
        **{
            f"all {size}": [c for c in hard if c.scale == scale]
            for scale, size in ((1.0, "usual size"), (0.5, "half size"), (0.25, "quarter size"))
        },
        **{f"all {low}-{high} objects": [c for c in hard if c.counts == (low, high)] for low, high in COUNT_RANGES},
        "all hard renders": hard,
    }
    lines.append("| **margins** | | | | | | |")
    for name, members in margins.items():
        total = Tally()
        for cell in members:
            total.add(results.by_cell[cell.name])
        lines.append(row(name, total))
    lines += ["", "| shape (hard renders) | drawn | found | shape right |", "|---|---:|---:|---:|"]
    for shape, t in results.by_shape.items():
        lines.append(f"| {shape} | {t.drawn} | {percent(t.found, t.drawn)} | {percent(t.shape_right, t.drawn)} |")
    lines += ["", "| colour (hard renders) | drawn | found | shape right |", "|---|---:|---:|---:|"]
    for colour, t in results.by_colour.items():
        lines.append(f"| {colour} | {t.drawn} | {percent(t.found, t.drawn)} | {percent(t.shape_right, t.drawn)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-cell", type=int, default=48, help="images per kind of difficulty")
    parser.add_argument("--scorer", default=None, help="SceneScorer folder (default: the shipped scene-scorer)")
    parser.add_argument("--batch", type=int, default=16, help="images the scorer reads at once")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the counts per cell, shape and colour to this file")
    args = parser.parse_args(argv)
    if args.per_cell < 1 or args.batch < 1:
        parser.error("--per-cell and --batch must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scorer = SceneScorer.from_pretrained(args.scorer or lssgen.weights_path("scene-scorer")).eval()
    all_cells = cells()
    results = Results()
    with tqdm(total=len(all_cells) * args.per_cell, desc="render and score") as bar:
        for cell in all_cells:
            for start in range(0, args.per_cell, args.batch):
                scenes = [cell.scene(i) for i in range(start, min(start + args.batch, args.per_cell))]
                found = scorer.detect([render(scene, cell.side) for scene in scenes])
                for scene, objects in zip(scenes, found, strict=True):
                    judge(scene, objects, results, cell)
                bar.update(len(scenes))
    print(tables(results, all_cells))
    seconds = time.perf_counter() - started
    print(f"\n{args.per_cell} images per cell, base scenes sample_scene({SEED}, i); {seconds:.0f} s")
    if args.json:
        tables_by_name = {"cells": results.by_cell, "shapes": results.by_shape, "colours": results.by_colour}
        data = {name: {key: vars(tally) for key, tally in table.items()} for name, table in tables_by_name.items()}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
