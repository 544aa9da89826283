"""A small side-by-side grid from a run of `lssgen eval-generation --save-images`: the chosen settings' images of
the chosen prompts, each prompt a row, each setting a column, with the scorer's count of the prompt's objects
under each image when the run's report has one (`extra` instances beyond the prompt's, from report.json).

    python -m scripts.run_grid outputs/beyond-native --prompts 0 1 2 3 \
        --settings "stock 20 steps" "lssgen learned s=0.75 2 stages" --tile 256 --out docs/beyond-native-eval.jpg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from lssgen.evaluation.generation import saved_image_path
from lssgen.evaluation.upsampler import LABEL_HEIGHT, labelled_grid


def run_grid(run_dir: Path, prompts: list[int], settings: list[str], tile: int) -> Image.Image:
    report = json.loads((run_dir / "report.json").read_text())
    rows_by_name = {score["name"]: (row, score) for row, score in enumerate(report["scores"])}
    unknown = [name for name in settings if name not in rows_by_name]
    if unknown:
        raise SystemExit(f"not settings of {run_dir}: {unknown}; it has {list(rows_by_name)}")
    captions = report["settings"]["captions"]
    grid_rows = []
    for prompt in prompts:
        row = []
        for name in settings:
            number, score = rows_by_name[name]
            image = Image.open(run_dir / saved_image_path(number, prompt)).convert("RGB")
            image = image.resize((tile, tile), Image.LANCZOS)
            ImageDraw.Draw(image).text((3, tile - 12), f"extra {score['extra_instances'][prompt]}", fill="white")
            row.append(image)
        grid_rows.append(row)
    grid = labelled_grid(grid_rows, settings)
    # The prompts, on the right of their rows.
    width = 260
    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (0, 0))
    draw = ImageDraw.Draw(out)
    for index, prompt in enumerate(prompts):
        draw.text((grid.width + 6, LABEL_HEIGHT + index * tile + tile // 2), captions[prompt], fill="black")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, nargs="+", required=True, help="prompt indices, from 0")
    parser.add_argument("--settings", nargs="+", required=True, help="setting names, as report.json has them")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    grid = run_grid(args.run_dir, args.prompts, args.settings, args.tile)
    grid.save(args.out, quality=90)
    print(f"wrote {args.out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
