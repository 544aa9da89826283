"""What the commands share: the argument parser class, argument types, common options and the run helpers.

Everything at module level is standard library: `lssgen --help` and argument errors are answered before torch or
diffusers is imported. What needs them (checking a device, loading, timing) imports them inside the function.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The names of `lssgen.loading.DTYPES` (importing it loads torch); tests/test_cli_startup.py checks they agree.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DEFAULT_PROMPT = "a lighthouse on a cliff at dusk, oil painting"

# The option names of the published LSSGen batch script (its README's command line), accepted by `geneval` next
# to ours with the same meaning. Its `--pipeline_type` and `--shorten_intermediate_steps True` take values, so
# they are options of their own (see `lssgen.cli.geneval`).
PUBLISHED_SPELLINGS = {
    "--steps": "--num_inference_steps",
    "--guidance": "--guidance_scale",
    "--start-sigma": "--start_sigma",
    "--min-resolution": "--min_size",
    "--upsampler": "--upscale_model",
    "--out": "--output_dir",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block of a command with 30 options buries it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def integer(minimum: int, what: str):
    """An argparse `type`: an integer of at least `minimum` (0 would silently mean "the default" in most commands)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


positive_int = integer(1, "a positive integer")
interval = integer(0, "0 or a positive integer")


def boolean(text: str) -> bool:
    values = {"true": True, "1": True, "false": False, "0": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected True or False (or true/false/1/0), got {text!r}")
    return values[text.lower()]


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def add_method_options(
    parser: argparse.ArgumentParser,
    *,
    steps: int | None,
    size: int | None,
    prompt: bool = True,
    published: bool = False,
) -> None:
    """The options of one generation (size, steps, guidance) and of the method, and `--device`/`--dtype`."""

    def names(name: str) -> list[str]:
        return [name, PUBLISHED_SPELLINGS[name]] if published else [name]

    if prompt:
        parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--height", type=positive_int, default=size, help="image height in pixels")
    parser.add_argument("--width", type=positive_int, default=size, help="image width in pixels")
    parser.add_argument(
        *names("--steps"), dest="steps", type=positive_int, default=steps, help="denoising steps of a plain generation"
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
        type=positive_int,
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
            type=boolean,
            metavar="{True,False}",
            help="the published script's spelling of --[no-]shorten-intermediate-steps",
        )
    parser.add_argument("--scaling-space", choices=["learned", "resnet", "latent", "pixel"], default=None)
    parser.add_argument(
        *names("--upsampler"), dest="upsampler", help="folder of a LatentUpsampler (config.json + safetensors)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)


def check_inputs(args: argparse.Namespace) -> None:
    """What every command is given, checked before anything slow is loaded or anything is written."""
    from lssgen.loading import check_device, check_pipeline, check_upsampler, check_vae
    from lssgen.outputs import check_writable

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


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    from lssgen.loading import DTYPES, check_device, default_dtype

    device = check_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    return device, dtype


def call_arguments(args: argparse.Namespace, adapter: Any, *, height: int, width: int, steps: int) -> dict[str, Any]:
    """The pipeline call of `args`: guidance goes to the argument the adapter's pipeline reads it from."""
    return {
        "prompt": args.prompt,
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        adapter.guidance_argument: adapter.default_guidance if args.guidance is None else args.guidance,
    }


def method_options(args: argparse.Namespace, **overrides) -> dict[str, Any]:
    options = {
        "start_sigma": args.start_sigma,
        "min_resolution": args.min_resolution,
        "shorten_intermediate_steps": args.shorten_intermediate_steps,
        "scaling_space": args.scaling_space,
    }
    options.update(overrides)
    return {name: value for name, value in options.items() if value is not None}


def patch(pipe: Any, upsampler: str | None) -> Any:
    """`lssgen.patch(pipe)` with the `upsampler` folder loaded; without one, `patch` chooses (it may have a shipped
    upsampler that fits the pipe), so no `upsampler=None` is passed: that would ask for latent interpolation."""
    import lssgen
    from lssgen.loading import load_upsampler

    if upsampler is None:
        return lssgen.patch(pipe)
    return lssgen.patch(pipe, load_upsampler(upsampler, pipe.dtype, pipe.device))


def timed(pipe: Any, call: dict[str, Any], seed: int, device: str, **options) -> tuple[Any, float]:
    """The first image of `pipe(**call, **options)` with a seeded generator, and the call's wall time in seconds."""
    import time

    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(**call, generator=generator, **options).images[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return image, time.perf_counter() - start


def path_or_shipped(path: str | None, name: str, option: str) -> str:
    """`path`, or the shipped weights `name` when it is not given."""
    from lssgen.weights import shipped, weights_path

    if path:
        return path
    if name not in shipped():
        raise ValueError(f"{option}: lssgen ships no {name!r} weights ({', '.join(shipped())}); pass {option} FOLDER.")
    return str(weights_path(name))
