"""The `lssgen` command: generate, demo, adapters, eval-upsampler, train-upsampler, bench and geneval."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lssgen.loading import (
    DTYPES,
    check_device,
    check_pipeline,
    check_upsampler,
    check_vae,
    default_dtype,
    load_pipeline,
    load_upsampler,
)
from lssgen.outputs import atomic_write, check_writable, write_folder
from lssgen.scenes.world import EVALUATION_PER_CATEGORY

# The option names of the published LSSGen batch script (its README's command line), accepted by `geneval` next
# to ours with the same meaning. Its `--pipeline_type` and `--shorten_intermediate_steps True` take values, so
# they are options of their own (see `_add_geneval_parser`).
PUBLISHED_SPELLINGS = {
    "--steps": "--num_inference_steps",
    "--guidance": "--guidance_scale",
    "--start-sigma": "--start_sigma",
    "--min-resolution": "--min_size",
    "--upsampler": "--upscale_model",
    "--out": "--output_dir",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block of a command with 30 options buries it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _integer(minimum: int, what: str):
    """An argparse `type`: an integer of at least `minimum` (0 would silently mean "the default" below)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _integer(1, "a positive integer")
_interval = _integer(0, "0 or a positive integer")


def _boolean(text: str) -> bool:
    values = {"true": True, "1": True, "false": False, "0": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected True or False (or true/false/1/0), got {text!r}")
    return values[text.lower()]


def _add_method_options(
    parser: argparse.ArgumentParser,
    *,
    steps: int | None,
    size: int | None,
    prompt: bool = True,
    published: bool = False,
) -> None:
    def names(name: str) -> list[str]:
        return [name, PUBLISHED_SPELLINGS[name]] if published else [name]

    if prompt:
        parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    parser.add_argument("--height", type=_positive_int, default=size, help="image height in pixels")
    parser.add_argument("--width", type=_positive_int, default=size, help="image width in pixels")
    parser.add_argument(
        *names("--steps"), dest="steps", type=_positive_int, default=steps, help="denoising steps of a plain generation"
    )
    parser.add_argument(
        *names("--guidance"), dest="guidance", type=float, default=None, help="guidance scale (family's default)"
    )
    parser.add_argument(
        *names("--start-sigma"),
        dest="start_sigma",
        type=float,
        default=0.75,
        help="noise level later stages restart from",
    )
    parser.add_argument(
        *names("--min-resolution"),
        dest="min_resolution",
        type=_positive_int,
        default=None,
        help="smallest stage's short side, px",
    )
    parser.add_argument(
        "--shorten-intermediate-steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fewer steps for smaller stages (family's default)",
    )
    if published:
        parser.add_argument(
            "--shorten_intermediate_steps",
            dest="shorten_intermediate_steps",
            type=_boolean,
            metavar="{True,False}",
            help="the published script's spelling of --[no-]shorten-intermediate-steps",
        )
    parser.add_argument("--scaling-space", choices=["learned", "resnet", "latent", "pixel"], default=None)
    parser.add_argument(
        *names("--upsampler"), dest="upsampler", help="folder of a LatentUpsampler (config.json + safetensors)"
    )
    parser.add_argument("--seed", type=int, default=0)
    _add_device_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lssgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate one image with a local or hub pipeline")
    generate.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    _add_method_options(generate, steps=None, size=1024)
    generate.add_argument("--out", default="out.png", help="where to save the image")
    generate.add_argument("--baseline", action="store_true", help="run the stock pipeline (no scaling)")
    generate.set_defaults(func=run_generate, out_is_image=True)

    adapters = commands.add_parser("adapters", help="list the installed adapters and the package providing each")
    adapters.set_defaults(func=run_adapters)

    demo = commands.add_parser(
        "demo", help="stock vs LSSGen side by side on the scene model trained here (or random weights)"
    )
    demo.add_argument("--model", help="use a real local pipeline instead of the shipped scene model")
    demo.add_argument(
        "--random-weights", action="store_true", help="a FLUX.1-architecture pipeline with random weights instead"
    )
    _add_method_options(demo, steps=None, size=None)
    demo.set_defaults(prompt=None)  # the model's own: held-out scene captions, or a lighthouse for the others
    demo.add_argument("--out-dir", default="outputs/demo", help="folder for demo.png, baseline.png and lssgen.png")
    demo.set_defaults(func=run_demo)

    evaluate = commands.add_parser(
        "eval-upsampler", help="compare a latent upsampler with bicubic and pixel-round-trip x2 on held-out images"
    )
    evaluate.add_argument("--vae", required=True, help="VAE folder or hub id (a pipeline folder with --subfolder vae)")
    evaluate.add_argument("--subfolder", default=None, help="subfolder of --vae holding the VAE, e.g. vae")
    evaluate.add_argument("--upsampler", help="LatentUpsampler folder; without it only the baselines are evaluated")
    evaluate.add_argument("--images", required=True, help="folder of held-out images (searched recursively)")
    evaluate.add_argument(
        "--resolution",
        type=_positive_int,
        default=512,
        help="centre-crop side, px (default 512). Smaller images are never scaled up: each is evaluated at its own "
        "size, its short side rounded down to a multiple of 2 x the VAE's spatial factor (16 for most), with a warning",
    )
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="evaluate at most this many images")
    evaluate.add_argument("--crops-per-image", type=_positive_int, default=1, help="centre crop + seeded random crops")
    evaluate.add_argument("--out", default="outputs/eval-upsampler", help="report folder")
    evaluate.add_argument("--grid", type=_interval, default=4, help="images (rows) in grid.png; 0 for none")
    evaluate.add_argument("--repeats", type=_positive_int, default=10, help="timed calls per method for latency")
    evaluate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    _add_device_arguments(evaluate)
    evaluate.set_defaults(func=run_eval_upsampler)
    _add_train_parser(commands)
    _add_bench_parser(commands)
    _add_eval_generation_parser(commands)
    _add_geneval_parser(commands)
    return parser


def _add_geneval_parser(commands) -> None:
    geneval = commands.add_parser(
        "geneval",
        help="generate images for every prompt of a GenEval prompt file, in GenEval's layout (resumable)",
        description="Generate images for a GenEval prompt file (evaluation_metadata.jsonl) into GenEval's folder "
        "layout, with run.json (settings, versions, timings). Re-running resumes. Several processes: "
        "`accelerate launch --num_processes N -m lssgen geneval ...` splits the prompts between them.",
    )
    geneval.add_argument("prompts", help="GenEval prompt file: one JSON object with a `prompt` key per line")
    geneval.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    geneval.add_argument(
        "--out",
        PUBLISHED_SPELLINGS["--out"],
        dest="out",
        required=True,
        help="output folder (created; an existing one is resumed)",
    )
    geneval.add_argument(
        "--mode", choices=["lssgen", "baseline"], default=None, help="patched (lssgen, the default) or stock pipeline"
    )
    geneval.add_argument(
        "--pipeline", default=None, help="the adapter, by name (default: detected); must serve the model's pipeline"
    )
    geneval.add_argument(
        "--pipeline_type",
        default=None,
        help="the published script's spelling: a family (flux, sd3, sdxl, sd, cogview4) runs its stock pipeline "
        "(flux = --mode baseline --pipeline flux), lss + the family runs LSSGen (lssflux = --mode lssgen --pipeline "
        "flux)",
    )
    _add_method_options(geneval, steps=None, size=None, prompt=False, published=True)
    geneval.add_argument("--images-per-prompt", type=_positive_int, default=4, help="samples per prompt (GenEval: 4)")
    geneval.add_argument(
        "--batch-size", type=_positive_int, default=None, help="images of one prompt per pipeline call (default: all)"
    )
    geneval.set_defaults(func=run_geneval)


def _add_eval_generation_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval-generation",
        help="stock vs lssgen settings on a scene text-to-image model: accuracy, KID, fidelity and time, in one run",
        description="Generate the held-out scene prompts (lssgen.scenes) with the stock pipeline, lssgen in every "
        "scaling space at start sigma 0.75 and 0.667 with 2 and 3 stages, and the stock pipeline at the step counts "
        "that fit in each lssgen setting's time; score them with the scene scorer. Writes report.json, report.md "
        "and grid.png.",
    )
    evaluate.add_argument("--model", help="pipeline folder taking string prompts (default: the shipped scene-t2i)")
    evaluate.add_argument("--scorer", help="SceneScorer folder (default: the shipped scene-scorer)")
    evaluate.add_argument("--upsampler", help="LatentUpsampler folder (without one, the learned space is skipped)")
    evaluate.add_argument("--size", type=_positive_int, default=256, help="image side, px (the model's native size)")
    evaluate.add_argument("--steps", type=_positive_int, default=20, help="denoising steps of the stock pipeline (N)")
    evaluate.add_argument("--guidance", type=float, default=None, help="guidance scale (the pipeline's default)")
    evaluate.add_argument(
        "--max-sequence-length", type=_positive_int, default=None, help="prompt tokens (scene-t2i was trained on 32)"
    )
    evaluate.add_argument(
        "--per-category",
        type=_integer(1, f"an integer from 1 to {EVALUATION_PER_CATEGORY}"),
        default=EVALUATION_PER_CATEGORY,
        help="held-out prompts per category",
    )
    evaluate.add_argument("--stages", type=int, nargs="+", choices=[2, 3], default=[2, 3], help="stage counts")
    evaluate.add_argument(
        "--equal-speed", action=argparse.BooleanOptionalAction, default=True, help="stock at equal-time step counts"
    )
    evaluate.add_argument(
        "--cache",
        metavar="NAME[:key=value,...]",
        help="also run the stock N-step setting and every lssgen setting with a diffusers cache on the denoiser "
        "(rows `... + NAME cache`): first-block, pyramid-attention-broadcast, taylorseer, mag or faster, e.g. "
        "first-block:threshold=0.2",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then one more per prompt)")
    evaluate.add_argument("--out", default="outputs/eval-generation", help="report folder")
    evaluate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    _add_device_arguments(evaluate)
    evaluate.set_defaults(func=run_eval_generation)


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="time the stock pipeline against LSSGen settings, alternately")
    bench.add_argument("--model", help="a real local pipeline (default: a small random-weight Flux pipeline)")
    bench.add_argument("--preset", choices=["flux-dev"], help="FLUX.1-dev architecture, random weights (GPU)")
    bench.add_argument("--allow-cpu-preset", action="store_true", help="let --preset run on the CPU anyway")
    bench.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    bench.add_argument(
        "--height", type=_positive_int, default=None, help="image height, px (default: the model's size)"
    )
    bench.add_argument("--width", type=_positive_int, default=None, help="image width, px (default: the model's size)")
    bench.add_argument("--steps", type=_positive_int, default=None, help="denoising steps")
    bench.add_argument("--min-resolution", type=_positive_int, default=None, help="smallest stage's short side, px")
    bench.add_argument("--start-sigmas", type=float, nargs="+", default=[0.75, 0.667], help="settings to time")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="timed rounds (plus one warm-up per setting)")
    bench.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    bench.add_argument(
        "--cache",
        metavar="NAME[:key=value,...]",
        help="also run the stock pipeline and every setting with a diffusers cache: first-block, "
        "pyramid-attention-broadcast, taylorseer, mag, faster or sea, e.g. first-block:threshold=0.2",
    )
    bench.add_argument("--upsampler", help="folder of a LatentUpsampler (default: latent interpolation)")
    bench.add_argument(
        "--base-size", type=_positive_int, default=None, help="the model's native side, px, for shortening (--model)"
    )
    bench.add_argument("--max-sequence-length", type=_positive_int, default=None, help="prompt tokens (--model)")
    bench.add_argument("--seed", type=int, default=0)
    _add_device_arguments(bench)
    bench.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.md")
    bench.add_argument("--plot", action="store_true", help="also write bench.png, a bar chart")
    bench.set_defaults(func=run_bench)


def _add_train_parser(commands) -> None:
    train = commands.add_parser("train-upsampler", help="train a LatentUpsampler for a VAE on a folder of images")
    train.add_argument("--vae", required=True, help="diffusers VAE folder or hub id (a pipeline with --subfolder vae)")
    train.add_argument("--subfolder", default=None, help="e.g. vae, for a whole pipeline folder")
    train.add_argument("--images", required=True, help="folder of jpg/png/webp images (searched recursively)")
    train.add_argument("--out", required=True, help="folder for the upsampler, its model card and checkpoint")
    train.add_argument("--resolution", type=_positive_int, default=256, help="crop size of the high-res target, px")
    train.add_argument("--steps", type=_positive_int, default=2000)
    train.add_argument("--batch-size", type=_positive_int, default=8)
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay to a tenth)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="VAE dtype (upsampler: float32)")
    train.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    train.add_argument("--config", help="JSON file of LatentUpsampler config keys (default: from the VAE)")
    train.add_argument(
        "--pixel-loss", choices=["none", "l1", "mse"], default="none", help="also compare decoded images"
    )
    train.add_argument("--pixel-loss-weight", type=float, default=0.1)
    train.add_argument("--latent-loss-weight", type=float, default=1.0, help="0: train on the pixel loss alone")
    train.add_argument("--init-from", help="LatentUpsampler folder to start from (fine-tuning)")
    train.add_argument("--val-every", type=_interval, default=250, help="validate every N steps (0: only at the end)")
    train.add_argument(
        "--save-every", type=_interval, default=500, help="checkpoint every N steps (0: only at the end)"
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument(
        "--cache-latents", action="store_true", help="encode whole images once into --out/cache, crop their latents"
    )
    train.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], help="also train on images reduced to these sizes, e.g. 1 0.5"
    )
    train.add_argument("--hflip", action="store_true", help="also train on mirrored images")
    train.set_defaults(func=run_train_upsampler)


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _device_and_dtype(args) -> tuple[str, torch.dtype]:
    device = check_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    return device, dtype


def _call_arguments(args, adapter, *, height: int, width: int, steps: int) -> dict[str, Any]:
    return {
        "prompt": args.prompt,
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "guidance_scale": adapter.default_guidance if args.guidance is None else args.guidance,
    }


def _method_options(args, **overrides) -> dict[str, Any]:
    options = {
        "start_sigma": args.start_sigma,
        "min_resolution": args.min_resolution,
        "shorten_intermediate_steps": args.shorten_intermediate_steps,
        "scaling_space": args.scaling_space,
    }
    options.update(overrides)
    return {name: value for name, value in options.items() if value is not None}


def _timed(pipe, call: dict[str, Any], seed: int, device: str, **options) -> tuple[Any, float]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(**call, generator=generator, **options).images[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return image, time.perf_counter() - start


def _patch(pipe, args) -> Any:
    import lssgen

    upsampler = load_upsampler(args.upsampler, pipe.dtype, pipe.device) if args.upsampler else None
    return lssgen.patch(pipe, upsampler)


def run_generate(args) -> None:
    import lssgen

    device, dtype = _device_and_dtype(args)
    pipe = load_pipeline(args.model, device, dtype)
    adapter = lssgen.find_adapter(pipe)
    steps = args.steps or adapter.default_steps
    call = _call_arguments(args, adapter, height=args.height, width=args.width, steps=steps)
    options = {}
    if not args.baseline:
        _patch(pipe, args)
        options = _method_options(args)
        print(lssgen.plan_for(pipe, args.height, args.width, steps, **options).describe())
    image, seconds = _timed(pipe, call, args.seed, device, **options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: image.save(path, format=Image.registered_extensions()[out.suffix.lower()]))
    print(f"{'baseline' if args.baseline else 'lssgen'}: {seconds:.2f} s -> {args.out}")


DEFAULT_PROMPT = "a lighthouse on a cliff at dusk, oil painting"
DEMO_SCENES = 4  # held-out scene prompts the default demo shows


@dataclass
class _Demo:
    pipe: Any
    prompts: list[str]
    size: int
    steps: int
    call: dict[str, Any]  # more call arguments
    options: dict[str, Any]  # lssgen options fitting the model's size
    upsampler: str | None
    what: str


def _taef2_found() -> bool:
    """Whether the scene model's VAE weights (taef2, not redistributed by lssgen) can be found; says why not."""
    from lssgen.autoencoders.flux2 import find_taef2

    try:
        find_taef2()
    except FileNotFoundError as missing:
        print(f"lssgen demo: the scene model needs taef2, so the random-weight demo runs instead. {missing}")
        return False
    return True


def _demo_setup(args, device: str, dtype: torch.dtype) -> _Demo:
    import lssgen
    from lssgen.tiny import build_tiny_flux_pipeline
    from lssgen.weights import shipped, weights_path

    if args.model:
        pipe = load_pipeline(args.model, device, dtype)
        adapter = lssgen.find_adapter(pipe)
        what = f"{type(pipe).__name__} from {args.model} on {device}"
        return _Demo(pipe, [args.prompt or DEFAULT_PROMPT], 1024, adapter.default_steps, {}, {}, args.upsampler, what)
    if not args.random_weights and "scene-t2i" in shipped() and _taef2_found():
        from lssgen.scenes.world import evaluation_scenes

        pipe = load_pipeline(str(weights_path("scene-t2i")), device, dtype)
        prompts = [args.prompt] if args.prompt else [scene.caption for scene in evaluation_scenes()[:DEMO_SCENES]]
        # 256 px is the model's native size; three stages (64, 128, 256 px), our FLUX.2 upsampler between them.
        options = {"min_resolution": 64, "base_height": 256, "base_width": 256}
        upsampler = args.upsampler or str(weights_path("flux2-x2"))
        what = (
            "the scene model trained here (weights/scene-t2i: a small Flux2KleinPipeline, held-out prompts) with our "
            "FLUX.2 upsampler (weights/flux2-x2)"
        )
        return _Demo(pipe, prompts, 256, 20, {"max_sequence_length": 32}, options, upsampler, what)
    pipe = build_tiny_flux_pipeline(
        num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32, text_dim=64
    ).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    # A small model, so a small native size: 512 px plays the part of FLUX.1's 1024 px.
    options = {"min_resolution": 256, "base_height": 512, "base_width": 512}
    what = (
        "a FLUX.1-architecture pipeline with RANDOM weights, built locally (no download).\n"
        "The images are noise; the demo shows the stage plan and the speed-up of the same call."
    )
    prompts = [args.prompt or DEFAULT_PROMPT]
    return _Demo(pipe, prompts, 512, 20, {"max_sequence_length": 64}, options, args.upsampler, what)


def _side_by_side(rows: list[tuple[str, Image.Image, Image.Image]], titles: tuple[str, str]) -> Image.Image:
    """One PNG: a column per mode, a row per prompt, each labelled."""
    from PIL import ImageDraw

    side, band = rows[0][1].width, 14
    sheet = Image.new("RGB", (2 * side, band + len(rows) * (side + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(titles):
        draw.text((column * side + 3, 1), title, fill="black")
    for row, (prompt, stock, scaled) in enumerate(rows):
        top = band + row * (side + band)
        draw.text((3, top + 1), prompt, fill="black")
        sheet.paste(stock, (0, top + band))
        sheet.paste(scaled, (side, top + band))
    return sheet


def run_demo(args) -> None:
    import lssgen

    device, dtype = _device_and_dtype(args)
    demo = _demo_setup(args, device, dtype)
    print(f"lssgen demo: {demo.what}")
    pipe = demo.pipe
    adapter = lssgen.find_adapter(pipe)
    pipe.set_progress_bar_config(disable=True)
    height, width, steps = args.height or demo.size, args.width or demo.size, args.steps or demo.steps
    lssgen.patch(pipe, load_upsampler(demo.upsampler, pipe.dtype, pipe.device) if demo.upsampler else None)
    options = {**demo.options, **_method_options(args)}
    print(lssgen.plan_for(pipe, height, width, steps, **options).describe())

    def call(prompt: str) -> dict[str, Any]:
        args.prompt = prompt
        return {**_call_arguments(args, adapter, height=height, width=width, steps=steps), **demo.call}

    _timed(pipe, {**call(demo.prompts[0]), "num_inference_steps": 2}, args.seed, device, start_sigma=1.0)  # warm-up
    rows, baseline_times, lssgen_times = [], [], []
    for index, prompt in enumerate(demo.prompts):
        seed = args.seed + index  # one seed per prompt, the same for both
        for _ in range(2 if len(demo.prompts) == 1 else 1):  # alternate, so both see the same machine state
            baseline, seconds = _timed(pipe, call(prompt), seed, device, start_sigma=1.0)
            baseline_times.append(seconds)
            scaled, seconds = _timed(pipe, call(prompt), seed, device, **options)
            lssgen_times.append(seconds)
        rows.append((prompt, baseline, scaled))
    if len(demo.prompts) == 1:
        base, fast = statistics.median(baseline_times), statistics.median(lssgen_times)
        count = "median of 2 alternating runs"
    else:
        base, fast = sum(baseline_times), sum(lssgen_times)
        count = f"{len(demo.prompts)} prompts in all"
    sigma = options["start_sigma"]
    sheet = _side_by_side(rows, (f"stock, {steps} steps: {base:.1f} s", f"lssgen, start_sigma={sigma}: {fast:.1f} s"))
    out_dir = write_folder(
        args.out_dir, {"demo.png": sheet.save, "baseline.png": rows[0][1].save, "lssgen.png": rows[0][2].save}
    )
    print(f"baseline (stock pipeline, {steps} steps at {width}x{height}): {base:.2f} s")
    print(f"lssgen   (same call, start_sigma={sigma}):  {fast:.2f} s")
    print(f"speed-up: {base / fast:.2f}x ({count}, {device}, {str(dtype).split('.')[-1]})")
    print(f"images: {out_dir / 'demo.png'} (side by side), {out_dir / 'baseline.png'}, {out_dir / 'lssgen.png'}")


def _bench_pipeline(args, device: str, dtype: torch.dtype) -> tuple[Any, dict, dict, str]:
    """The pipe, its call (less height/width/steps), lssgen defaults and a line saying what it is."""
    import lssgen
    from lssgen.evaluation import bench
    from lssgen.tiny import build_tiny_flux_pipeline

    if args.preset:
        if not device.startswith("cuda") and not args.allow_cpu_preset:
            raise ValueError("--preset flux-dev builds a 12B-parameter model: run it on a GPU (or --allow-cpu-preset).")
        pipe = bench.build_flux_dev_pipeline(device, dtype)
        call = {**bench.random_flux_prompt(pipe, args.seed), "guidance_scale": 3.5}
        sizes = {"size": 1024, "steps": 28, "min_resolution": 512}
        what = "FLUX.1-dev architecture (12B) with RANDOM weights and random prompt embeddings, no text encoders"
    elif args.model:
        pipe = load_pipeline(args.model, device, dtype)
        adapter = lssgen.find_adapter(pipe)
        call = {"prompt": args.prompt, "guidance_scale": adapter.default_guidance}
        sizes = {"size": adapter.base_size, "steps": adapter.default_steps, "min_resolution": adapter.min_resolution}
        what = f"{type(pipe).__name__} from {args.model}"
    else:
        pipe = build_tiny_flux_pipeline(
            num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32, text_dim=64
        ).to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        call = {"prompt": args.prompt, "guidance_scale": 3.5, "max_sequence_length": 64}
        # A small model at a small native size: 512 px plays FLUX.1's 1024 px, so stages are at half scale.
        sizes = {"size": 512, "steps": 20, "min_resolution": 256, "base_height": 512, "base_width": 512}
        what = (
            "a small FLUX.1-architecture pipeline with RANDOM weights (no download), playing a 1024-px model "
            "at half scale: 512 px stands for 1024, min_resolution 256 for 512"
        )
    return pipe, call, sizes, what


def run_bench(args) -> None:
    from lssgen.caches import cache_config
    from lssgen.evaluation import bench

    device, dtype = _device_and_dtype(args)
    pipe, call, sizes, what = _bench_pipeline(args, device, dtype)
    height, width = args.height or sizes["size"], args.width or sizes["size"]
    call.update(height=height, width=width, num_inference_steps=args.steps or sizes["steps"])
    min_resolution = args.min_resolution or sizes["min_resolution"]
    defaults = {key: sizes[key] for key in ("base_height", "base_width") if key in sizes}
    if args.base_size:
        defaults = {"base_height": args.base_size, "base_width": args.base_size}
    if args.max_sequence_length:
        call["max_sequence_length"] = args.max_sequence_length
    settings = [
        bench.Setting(sigma, shorten, min_resolution) for sigma in args.start_sigmas for shorten in (True, False)
    ]
    upsampler = load_upsampler(args.upsampler, dtype, device) if args.upsampler else None
    print(f"lssgen bench: {what}; {device}, {str(dtype).removeprefix('torch.')}")
    print(f"{call['num_inference_steps']} steps at {width}x{height}, seed {args.seed}, {args.repeats} rounds")
    report = bench.run_bench(
        pipe,
        settings,
        repeats=args.repeats,
        call_kwargs=call,
        seed=args.seed,
        upsampler=upsampler,
        compile=args.compile,
        patch_defaults=defaults,
        cache=cache_config(args.cache, pipe) if args.cache else None,
    )
    report.note = f"model: {what}"
    out = bench.write_report(report, args.out, plot=args.plot)
    print(report.markdown(), end="")
    print(f"report: {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'bench.png'}" if args.plot else ""))


def run_eval_upsampler(args) -> None:
    from lssgen.evaluation.upsampler import evaluate_upsampler, write_report
    from lssgen.training.data import find_images, load_vae

    device, dtype = _device_and_dtype(args)
    images = find_images(args.images)
    vae = load_vae(args.vae, args.subfolder, dtype, device)
    upsampler = load_upsampler(args.upsampler, dtype, device) if args.upsampler else None
    vae_name = f"{args.vae}/{args.subfolder}" if args.subfolder else args.vae
    report = evaluate_upsampler(
        vae,
        images,
        upsampler=upsampler,
        resolution=args.resolution,
        limit=args.limit,
        crops_per_image=args.crops_per_image,
        grid=args.grid,
        repeats=args.repeats,
        vae_name=vae_name,
        upsampler_name=args.upsampler,
        progress=args.progress,
    )
    out = write_report(report, args.out)
    print(Path(out, "report.md").read_text(), end="")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}" + (f", {out / 'grid.png'}" if report.grid else ""))


def run_train_upsampler(args) -> None:
    import json

    from lssgen.training.data import find_images, load_vae
    from lssgen.training.upsampler import train_upsampler

    config = None
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--config {args.config}: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {args.config}: must hold a JSON object of LatentUpsampler config keys.")
    images = find_images(args.images)
    device, dtype = _device_and_dtype(args)
    vae = load_vae(args.vae, args.subfolder, dtype, device)
    result = train_upsampler(
        vae,
        images,
        args.out,
        resolution=args.resolution,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        config=config,
        pixel_loss=args.pixel_loss,
        pixel_loss_weight=args.pixel_loss_weight,
        latent_loss_weight=args.latent_loss_weight,
        init_from=args.init_from,
        val_every=args.val_every,
        save_every=args.save_every,
        resume=args.resume,
        cache_latents=args.cache_latents,
        scales=args.scales,
        hflip=args.hflip,
        vae_name=args.vae + (f" (subfolder {args.subfolder})" if args.subfolder else ""),
        images_name=args.images,
    )
    margin = 100 * (1 - result.val_mse / result.bicubic_mse) if result.bicubic_mse else 0.0
    print(
        f"validation MSE ({result.val_images} held-out images): learned {result.val_mse:.5f}, "
        f"bicubic {result.bicubic_mse:.5f} ({abs(margin):.0f}% {'lower' if margin >= 0 else 'HIGHER: train longer'})"
    )
    print(f"validation PSNR: learned {result.val_psnr:.2f} dB, pixel round trip {result.pixel_round_trip_psnr:.2f} dB")
    print(f"trained {result.steps} steps on {result.train_images} images in {result.seconds:.1f} s -> {result.out_dir}")


def _mode_and_pipeline(args) -> tuple[str, str | None]:
    """`--mode` and `--pipeline`, or what the published `--pipeline_type` says (both given: they must agree)."""
    from lssgen.evaluation.geneval import parse_pipeline_type

    if args.pipeline_type is None:
        return args.mode or "lssgen", args.pipeline
    mode, pipeline = parse_pipeline_type(args.pipeline_type)
    for option, given, implied in (("--mode", args.mode, mode), ("--pipeline", args.pipeline, pipeline)):
        if given is not None and given != implied:
            raise ValueError(
                f"--pipeline_type {args.pipeline_type} means {option} {implied}, but {option} {given} was given; "
                "pass one of the two."
            )
    return mode, pipeline


def run_geneval(args) -> None:
    from lssgen.evaluation.geneval import GenEvalSettings, run_geneval

    mode, pipeline = _mode_and_pipeline(args)
    settings = GenEvalSettings(
        model=args.model,
        out=args.out,
        mode=mode,
        pipeline=pipeline,
        upsampler=args.upsampler,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        start_sigma=args.start_sigma,
        min_resolution=args.min_resolution,
        shorten_intermediate_steps=args.shorten_intermediate_steps,
        scaling_space=args.scaling_space,
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    run_geneval(args.prompts, settings)


def _shipped(path: str | None, name: str, option: str) -> str:
    """`path`, or the shipped weights `name` when it is not given."""
    from lssgen.weights import shipped, weights_path

    if path:
        return path
    if name not in shipped():
        raise ValueError(f"{option}: lssgen ships no {name!r} weights ({', '.join(shipped())}); pass {option} FOLDER.")
    return str(weights_path(name))


def run_eval_generation(args) -> None:
    from lssgen.caches import cache_config
    from lssgen.evaluation.generation import default_settings, evaluate_generation, write_report
    from lssgen.scenes.scorer import SceneScorer
    from lssgen.scenes.world import CATEGORIES, evaluation_scenes

    if args.per_category > EVALUATION_PER_CATEGORY:
        raise ValueError(
            f"--per-category {args.per_category}: the held-out set has {EVALUATION_PER_CATEGORY} prompts per category."
        )
    if args.cache:
        cache_config(args.cache, pipe=None)  # a malformed spec fails here, before the model loads
    device, dtype = _device_and_dtype(args)
    model = _shipped(args.model, "scene-t2i", "--model")
    pipe = load_pipeline(model, device, dtype)
    scorer = SceneScorer.from_pretrained(_shipped(args.scorer, "scene-scorer", "--scorer")).to(device)
    upsampler = load_upsampler(args.upsampler, dtype, device) if args.upsampler else None
    scenes = evaluation_scenes()[: args.per_category * len(CATEGORIES)]  # categories take turns in the set
    settings = default_settings(args.size, args.steps, learned=upsampler is not None, stages=args.stages)
    report = evaluate_generation(
        pipe,
        scorer,
        scenes,
        size=args.size,
        steps=args.steps,
        upsampler=upsampler,
        settings=settings,
        equal_speed=args.equal_speed,
        seed=args.seed,
        call={
            name: value
            for name, value in (("guidance_scale", args.guidance), ("max_sequence_length", args.max_sequence_length))
            if value is not None
        },
        progress=args.progress,
        model_name=model,
        cache=cache_config(args.cache, pipe) if args.cache else None,
        cache_label=args.cache.partition(":")[0] if args.cache else "cache",
    )
    out = write_report(report, args.out)
    print(report.markdown())
    print(f"wrote {out / 'report.json'}, report.md and grid.png")


def run_adapters(args) -> None:
    import lssgen

    rows = [("adapter", "pipelines", "kind", "steps", "guidance", "shorten", "package")]
    for name, info in sorted(lssgen.installed_adapters().items()):
        adapter = info.adapter
        rows.append(
            (
                name,
                ", ".join(adapter.pipeline_classes),
                "flow" if adapter.flow else "diffusion",
                str(adapter.default_steps),
                str(adapter.default_guidance),
                "on" if adapter.shorten_intermediate_steps else "off",
                info.package,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _check_inputs(args) -> None:
    """What every command is given, checked before anything slow is loaded or anything is written."""
    check_device(getattr(args, "device", None))
    if getattr(args, "model", None):
        check_pipeline(args.model)
    if getattr(args, "vae", None):
        check_vae(args.vae, args.subfolder)
    for name in ("upsampler", "init_from"):
        if getattr(args, name, None):
            check_upsampler(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("out", "out_dir"):
        if getattr(args, name, None):
            check_writable(
                getattr(args, name), "--" + name.replace("_", "-"), image=getattr(args, "out_is_image", False)
            )


def main(argv: list[str] | None = None) -> int:
    r"""
    The `lssgen` command. Returns the exit status: 0, or 2 for bad input, reported as one line on stderr
    (`lssgen <command>: error: ...`) with nothing written. Anything else is a bug and keeps its traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    try:
        _check_inputs(args)
        args.func(args)
    except ValueError as error:
        message = " ".join(str(error).split())  # one line, however a library below worded it
        print(f"lssgen {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
