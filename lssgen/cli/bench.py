"""`lssgen bench`: the stock pipeline timed against LSSGen settings, alternately."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .options import DEFAULT_PROMPT, add_device_arguments, add_methods_argument, device_and_dtype, positive_int

if TYPE_CHECKING:
    import torch


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("bench", help="time the stock pipeline against LSSGen settings, alternately")
    parser.add_argument("--model", help="a real local pipeline (default: a small random-weight Flux pipeline)")
    parser.add_argument("--preset", choices=["flux-dev"], help="FLUX.1-dev architecture, random weights (GPU)")
    parser.add_argument("--allow-cpu-preset", action="store_true", help="let --preset run on the CPU anyway")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument(
        "--height", type=positive_int, default=None, help="image height, px (default: the model's size)"
    )
    parser.add_argument("--width", type=positive_int, default=None, help="image width, px (default: the model's size)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps (default: the model folder's, else the family's)",
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the model folder's, else the family's)"
    )
    parser.add_argument(
        "--min-resolution",
        type=positive_int,
        default=None,
        help="smallest stage's short side, px (default: the model folder's, else the family's)",
    )
    parser.add_argument("--start-sigmas", type=float, nargs="+", default=[0.75, 0.667], help="settings to time")
    add_methods_argument(parser)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (plus one warm-up per setting)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument(
        "--cache",
        metavar="NAME[:key=value,...]",
        help="also run the stock pipeline and every setting with a diffusers cache: first-block, "
        "pyramid-attention-broadcast, taylorseer, mag, faster or sea, e.g. first-block:threshold=0.2",
    )
    parser.add_argument(
        "--upsampler",
        help="folder of a LatentUpsampler (default: the model folder's, else the one lssgen ships for the family, "
        "else latent interpolation)",
    )
    parser.add_argument(
        "--base-size",
        type=positive_int,
        default=None,
        help="the model's native side, px, for shortening (--model; default: the model folder's)",
    )
    parser.add_argument(
        "--max-sequence-length", type=positive_int, default=None, help="prompt tokens (default: the model folder's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.md")
    parser.add_argument("--plot", action="store_true", help="also write bench.png, a bar chart")
    parser.set_defaults(run=run)
    return parser


def _bench_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[Any, dict, dict, str]:
    """The pipe, its call, lssgen defaults for `lssgen.patch` and a line saying what it is."""
    import lssgen
    from lssgen.evaluation import bench
    from lssgen.loading import load_pipeline

    from .options import model_call, to_dtype

    if args.model:
        # Size, steps, guidance, prompt length: the user's, else the folder's lssgen.json, else the family's; the
        # folder's lssgen options reach `lssgen.patch` from the folder itself.
        pipe = load_pipeline(args.model, device, dtype)
        call = model_call(args, pipe, lssgen.find_adapter(pipe))
        defaults = {"base_height": args.base_size, "base_width": args.base_size} if args.base_size else {}
        return pipe, call, defaults, f"{type(pipe).__name__} from {args.model}"
    guidance = 3.5 if args.guidance is None else args.guidance  # FLUX.1's, for the models built here
    if args.preset:
        if not device.startswith("cuda") and not args.allow_cpu_preset:
            raise ValueError("--preset flux-dev builds a 12B-parameter model: run it on a GPU (or --allow-cpu-preset).")
        pipe = bench.build_flux_dev_pipeline(device, dtype)
        call = {**bench.random_flux_prompt(pipe, args.seed), "guidance_scale": guidance}
        sizes = {"size": 1024, "steps": 28, "min_resolution": 512}
        what = "FLUX.1-dev architecture (12B) with RANDOM weights and random prompt embeddings, no text encoders"
    else:
        from lssgen.tiny import build_tiny_flux_pipeline  # only here: it imports FluxPipeline and its text encoders

        pipe = build_tiny_flux_pipeline(
            num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32, text_dim=64
        ).to(device)
        to_dtype(pipe, dtype)
        call = {"prompt": args.prompt, "guidance_scale": guidance, "max_sequence_length": 64}
        # A small model at a small native size: 512 px plays FLUX.1's 1024 px, so stages are at half scale.
        sizes = {"size": 512, "steps": 20, "min_resolution": 256, "base_height": 512, "base_width": 512}
        what = (
            "a small FLUX.1-architecture pipeline with RANDOM weights (no download), playing a 1024-px model "
            "at half scale: 512 px stands for 1024, min_resolution 256 for 512"
        )
    height, width = args.height or sizes["size"], args.width or sizes["size"]
    call.update(height=height, width=width, num_inference_steps=args.steps or sizes["steps"])
    if args.max_sequence_length:
        call["max_sequence_length"] = args.max_sequence_length
    defaults = {key: sizes[key] for key in ("base_height", "base_width", "min_resolution") if key in sizes}
    if args.base_size:
        defaults.update(base_height=args.base_size, base_width=args.base_size)
    return pipe, call, defaults, what


def run(args: argparse.Namespace) -> None:
    from lssgen.caches import cache_config
    from lssgen.evaluation import bench

    from .options import chosen_upsampler

    device, dtype = device_and_dtype(args)
    pipe, call, defaults, what = _bench_pipeline(args, device, dtype)
    height, width = call["height"], call["width"]
    # None: the patch defaults' (the model folder's, else the family's) smallest stage.
    settings = [
        bench.Setting(sigma, shorten, args.min_resolution) for sigma in args.start_sigmas for shorten in (True, False)
    ] + [bench.MethodSetting(method) for method in args.methods]
    upsampler = chosen_upsampler(pipe, args.upsampler)
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
