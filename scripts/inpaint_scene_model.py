"""Inpainting on the shipped scene model, stock against lssgen, in one run (issue #22).

Cases: the held-out evaluation scenes of two objects (`lssgen.scenes.world.evaluation_scenes`, category
"two_object", the first `--cases` in order), rendered at 256 px (the model's native size). Each case repaints the
second object's box (8 px of margin around it) through `Flux2KleinInpaintPipeline` at strength 1.0, prompted with
the caption of the scene where that object has another shape (the first shape of `world.SHAPES` that neither object
has) in the same colour. Settings, run one after another in an order that alternates from case to case: stock
(`start_sigma=1.0`), and lssgen (the folder's plan: 64 -> 128 -> 256 px, the shipped upsampler) with each way of
taking the mask to a smaller stage (`lssgen.inpainting.MASK_RESAMPLING`: area, shipped; nearest; max).

Per setting: the scene scorer's accuracy on the new caption (both objects read), the share of images where it
reads the kept object, the PSNR of the region outside the mask (less a 8 px band along its edge) to the input, the
seam (mean gradient magnitude on the 4 px band around the mask's edge, over the same in the input render: 1 is no
extra edge), and the mean seconds per image with its ratio to stock. Writes `inpaint.json` and `inpaint.md` (the
table) and a grid of the first cases to `--out`.

    python -m scripts.inpaint_scene_model --cases 16 --steps 20 --out outputs/inpaint
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import Flux2KleinInpaintPipeline
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import lssgen
import lssgen.autoencoders.flux2  # noqa: F401  (diffusers loads the folder's components from imported modules only)
import lssgen.inpainting
import lssgen.scenes.denoiser  # noqa: F401
from lssgen.scenes import world
from lssgen.scenes.scorer import SceneScorer

SIZE = 256
MARGIN = 8  # pixels of mask around the repainted object's box
SETTINGS = {
    "stock": {"start_sigma": 1.0},
    "lssgen, mask by area (shipped)": {"mask": "area"},
    "lssgen, mask by nearest": {"mask": "nearest"},
    "lssgen, mask by max": {"mask": "max"},
}


def repaint_case(scene: world.Scene) -> tuple[world.Scene, Image.Image]:
    """The scene with its second object given another shape, and the mask (white: repaint) of that object's box."""
    kept, replaced = scene.objects
    shape = next(s for s in world.SHAPES if s not in (kept.shape, replaced.shape))
    new = world.SceneObject(shape, replaced.colour, replaced.centre, replaced.size)
    check = world.Check("two_object", (world.Wanted(kept.shape, kept.colour), world.Wanted(shape, replaced.colour)))
    target = world.Scene(world.caption_for(check), "two_object", (kept, new), check, scene.texture, scene.seed)
    mask = Image.new("L", (SIZE, SIZE), 0)
    half = replaced.size * SIZE / 2 + MARGIN
    x, y = replaced.centre[0] * SIZE, replaced.centre[1] * SIZE
    ImageDraw.Draw(mask).rectangle([x - half, y - half, x + half, y + half], fill=255)
    return target, mask


def bands(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The pixels well outside the mask (more than `MARGIN` px from it) and the 4 px band around its edge."""
    grown = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * MARGIN + 1))) > 0
    outer = np.asarray(mask.filter(ImageFilter.MaxFilter(5))) > 0
    inner = np.asarray(mask.filter(ImageFilter.MinFilter(5))) > 0
    return ~grown, outer & ~inner


def gradient(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255
    rows, cols = np.gradient(pixels)
    return np.hypot(rows, cols)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = float(np.mean((a - b) ** 2))
    return float("inf") if error == 0 else 10 * np.log10(1.0 / error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="outputs/inpaint")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = Flux2KleinInpaintPipeline.from_pretrained(lssgen.weights_path("scene-t2i"))
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe)  # the folder's settings: stages down to 64 px, the shipped flux2-x2 upsampler
    scorer = SceneScorer.from_pretrained(lssgen.weights_path("scene-scorer"))
    scenes = [scene for scene in world.evaluation_scenes() if scene.category == "two_object"][: args.cases]
    plan = lssgen.plan_for(pipe, SIZE, SIZE, args.steps).describe()

    outputs = {name: [] for name in SETTINGS}
    seconds = {name: [] for name in SETTINGS}
    cases = []
    for case, scene in enumerate(tqdm(scenes, desc="cases")):
        target, mask = repaint_case(scene)
        render = world.render(scene, SIZE)
        cases.append((target, mask, render))
        order = list(SETTINGS) if case % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            options = dict(SETTINGS[name])
            lssgen.inpainting.MASK_RESAMPLING = options.pop("mask", "area")
            generator = torch.Generator().manual_seed(world.EVALUATION_SEED + case)
            start = time.perf_counter()
            image = pipe(
                prompt=target.caption,
                image=render,
                mask_image=mask,
                strength=1.0,
                num_inference_steps=args.steps,
                max_sequence_length=32,
                generator=generator,
                **options,
            ).images[0]
            seconds[name].append(time.perf_counter() - start)
            outputs[name].append(image)
    lssgen.inpainting.MASK_RESAMPLING = "area"

    stock_seconds = float(np.mean(seconds["stock"]))
    report = {"plan": plan, "cases": len(scenes), "steps": args.steps, "settings": {}}
    lines = [
        f"Scene model, {len(scenes)} two-object scenes, the second object repainted as another shape, strength 1.0, "
        f"{args.steps} steps.",
        "",
        "| setting | scorer accuracy | kept object read | PSNR outside the mask | seam | s / image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, images in outputs.items():
        results = scorer.score(images, [target for target, _, _ in cases])
        kept_read, fidelity, seams = [], [], []
        for (target, mask, render), image, result in zip(cases, images, results):
            kept = target.objects[0]
            kept_read.append(any((o.shape, o.colour) == (kept.shape, kept.colour) for o in result.found))
            outside, edge = bands(mask)
            got, given = (np.asarray(im, dtype=np.float32) / 255 for im in (image, render))
            fidelity.append(psnr(got[outside], given[outside]))
            seams.append(float(gradient(image)[edge].mean() / gradient(render)[edge].mean()))
        mean_seconds = float(np.mean(seconds[name]))
        row = {
            "accuracy": float(np.mean([r.passed for r in results])),
            "kept_object_read": float(np.mean(kept_read)),
            "psnr_outside_db": float(np.mean(fidelity)),
            "seam": float(np.mean(seams)),
            "seconds_per_image": mean_seconds,
            "time_ratio": mean_seconds / stock_seconds,
        }
        report["settings"][name] = row
        lines.append(
            f"| {name} | {sum(r.passed for r in results)}/{len(results)} | {sum(kept_read)}/{len(kept_read)} | "
            f"{row['psnr_outside_db']:.2f} dB | {row['seam']:.2f} | {mean_seconds:.2f} ({row['time_ratio']:.2f}x) |"
        )
    lines += ["", "```", plan, "```"]
    (out / "inpaint.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "inpaint.md").write_text("\n".join(lines) + "\n")
    shown = min(4, len(cases))
    rows = [
        np.concatenate([np.asarray(cases[i][2]), *(np.asarray(outputs[name][i]) for name in SETTINGS)], axis=1)
        for i in range(shown)
    ]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "inpaint.jpg", quality=90)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
