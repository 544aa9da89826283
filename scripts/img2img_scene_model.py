"""Image-to-image and Hires fix on the shipped scene model, stock against lssgen, in one run (issue #21).

Inputs are the scene world's own renders of held-out evaluation scenes (`lssgen.scenes.world.evaluation_scenes`, the
first `--cases` in order, rendered at 256 px, the model's native size). Two comparisons, each case's settings run
one after another in an order that alternates from case to case:

- img2img at 256 px, strength `--strength`, through `Flux2KleinInpaintPipeline` with an all-white mask: stock
  (`start_sigma=1.0`); lssgen as shipped (the input image resized to the first stage and encoded there); lssgen with
  the first stage's image latent made instead by encoding at 256 px and shrinking that latent (area average in the
  VAE's own latent space), the alternative issue #21 asks to measure.
- Hires fix 256 -> 512 px (`lssgen.hires`): stock (the render resized to 512 px in pixels, img2img there at every
  step) and lssgen (first stage at 256 px, the shipped upsampler, then 512 px).

Per setting: the scene scorer's accuracy on the outputs (GenEval's rules), PSNR to the stock output of the same
case, and the mean seconds per image. Writes `img2img.json` and `img2img.md` (the tables) to `--out`.

    python -m scripts.img2img_scene_model --cases 12 --steps 20 --out outputs/img2img
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import Flux2KleinPipeline
from PIL import Image
from tqdm import tqdm

import lssgen
import lssgen.autoencoders.flux2  # noqa: F401  (diffusers loads the folder's components from imported modules only)
import lssgen.scenes.denoiser  # noqa: F401
from lssgen.evaluation.metrics import psnr
from lssgen.hires import hires_fix_call
from lssgen.scenes import world
from lssgen.scenes.scorer import SceneScorer

NATIVE, LARGE = 256, 512
# Where Flux2KleinInpaintPipeline's stage images are encoded (its preparation is stood in for: lssgen.inpainting).
INPAINTING_MODULE = importlib.import_module("lssgen.inpainting")


def shrunk_latent_image(pipe, adapter, image, stage, batch, dtype):
    """The alternative first-stage image latent: `image` encoded at its own size (the target size of these calls),
    shrunk to the stage by area average in the VAE's own latent space (where lssgen scales FLUX.2 latents up), and
    given the pipeline's normalisation again."""
    pixels = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    raw = adapter.latents_to_vae(pipe, adapter.encode_pixels(pipe, pixels))
    small = F.interpolate(raw, size=(stage.latent_height, stage.latent_width), mode="area")
    return adapter.vae_to_latents(pipe, small).repeat(batch, 1, 1, 1).to(dtype)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="outputs/img2img")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model = Flux2KleinPipeline.from_pretrained(lssgen.weights_path("scene-t2i"))
    model.set_progress_bar_config(disable=True)
    lssgen.patch(model)  # the folder's settings: stages down to 64 px, the shipped flux2-x2 upsampler
    scorer = SceneScorer.from_pretrained(lssgen.weights_path("scene-scorer"))
    defaults = lssgen.model_defaults(model)
    scenes = world.evaluation_scenes()[: args.cases]
    call = {"num_inference_steps": args.steps, "max_sequence_length": defaults.max_sequence_length}

    stock_first_latents = INPAINTING_MODULE.first_stage_image_latents

    def run(pipe, arguments, case, options):
        generator = torch.Generator().manual_seed(world.EVALUATION_SEED + case)
        start = time.perf_counter()
        image = pipe(prompt=scenes[case].caption, **arguments, **call, generator=generator, **options).images[0]
        return image, time.perf_counter() - start

    settings = {
        "img2img": {
            "stock": {"start_sigma": 1.0},
            "lssgen (encode the resized image)": {},
            "lssgen (shrink the encoded latent)": {"shrink": True},
        },
        "hires": {"stock (pixel resize, img2img at 512 px)": {"start_sigma": 1.0}, "lssgen (first stage 256 px)": {}},
    }
    outputs = {part: {name: [] for name in names} for part, names in settings.items()}
    seconds = {part: {name: [] for name in names} for part, names in settings.items()}
    describe = {}
    for case in tqdm(range(args.cases), desc="cases"):
        render = world.render(scenes[case], NATIVE)
        for part, names in settings.items():
            size = NATIVE if part == "img2img" else LARGE
            pipe, arguments = hires_fix_call(model, render, size, size, args.strength)
            if part == "img2img":
                del arguments["min_resolution"]  # the folder's plan (64 -> 128 -> 256 px), not a Hires fix's
            plan_options = {name: arguments[name] for name in ("min_resolution",) if name in arguments}
            plan = lssgen.plan_for(pipe, size, size, args.steps, strength=args.strength, **plan_options)
            describe.setdefault(part, plan.describe())
            order = list(names) if case % 2 == 0 else list(reversed(names))
            for name in order:
                options = dict(names[name])
                if options.pop("shrink", False):
                    INPAINTING_MODULE.first_stage_image_latents = shrunk_latent_image
                try:
                    image, spent = run(pipe, arguments, case, options)
                finally:
                    INPAINTING_MODULE.first_stage_image_latents = stock_first_latents
                outputs[part][name].append(image)
                seconds[part][name].append(spent)
            lssgen.unpatch(pipe)

    report, lines = {}, [f"Scene model, {args.cases} held-out scenes, strength {args.strength}, {args.steps} steps."]
    for part, names in settings.items():
        stock_name = next(iter(names))
        stock = torch.cat([to_tensor(image) for image in outputs[part][stock_name]])
        lines += [
            "",
            f"### {part}",
            "",
            "| setting | scorer accuracy | PSNR to stock (dB) | s / image |",
            "|---|---:|---:|---:|",
        ]
        report[part] = {"plan": describe[part]}
        for name in names:
            images = outputs[part][name]
            passed = [result.passed for result in scorer.score(images, scenes[: args.cases])]
            tensors = torch.cat([to_tensor(image) for image in images])
            distance = float("inf") if name == stock_name else float(psnr(tensors, stock).mean())
            mean_seconds = sum(seconds[part][name]) / len(seconds[part][name])
            report[part][name] = {
                "accuracy": sum(passed) / len(passed),
                "psnr_to_stock": distance,
                "seconds": mean_seconds,
            }
            shown = "-" if name == stock_name else f"{distance:.2f}"
            lines.append(f"| {name} | {sum(passed)}/{len(passed)} | {shown} | {mean_seconds:.2f} |")
        input_passed = sum(r.passed for r in scorer.score([world.render(s, NATIVE) for s in scenes], scenes))
        lines.append(f"| (the input renders) | {input_passed}/{len(scenes)} | | |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "img2img.json").write_text(json.dumps(report, indent=2))
    (out / "img2img.md").write_text("\n".join(lines) + "\n")
    for part in settings:
        row = [outputs[part][name][0].resize((LARGE, LARGE)) for name in settings[part]]
        grid = Image.new("RGB", (LARGE * len(row), LARGE))
        for i, image in enumerate(row):
            grid.paste(image, (LARGE * i, 0))
        grid.save(out / f"{part}-case0.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
