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
    add_threads_argument(parser)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads torch uses (torch.set_num_threads, before loading); pin it so timings compare "
        "(default: torch's, one per core)",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options a model folder's `lssgen.json` gives defaults for, besides size, steps and guidance."""
    parser.add_argument(
        "--max-sequence-length", type=positive_int, default=None, help="prompt tokens (default: the model folder's)"
    )
    parser.add_argument(
        "--base-size",
        type=positive_int,
        default=None,
        help="the model's native side, px, the reference for shortening (default: the model folder's)",
    )


def add_method_options(parser: argparse.ArgumentParser, *, prompt: bool = True, published: bool = False) -> None:
    """The options of one generation (size, steps, guidance) and of the method, and `--device`/`--dtype`."""

    def names(name: str) -> list[str]:
        return [name, PUBLISHED_SPELLINGS[name]] if published else [name]

    if prompt:
        parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    # No defaults here: a model folder's lssgen.json gives them, else the adapter's published values.
    parser.add_argument("--height", type=positive_int, default=None, help="image height, px (default: native)")
    parser.add_argument("--width", type=positive_int, default=None, help="image width, px (default: native)")
    parser.add_argument(
        *names("--steps"),
        dest="steps",
        type=positive_int,
        default=None,
        help="denoising steps of a plain generation (default: the model folder's, else the family's)",
    )
    parser.add_argument(
        *names("--guidance"),
        dest="guidance",
        type=float,
        default=None,
        help="guidance scale (default: the model folder's, else the family's)",
    )
    parser.add_argument(
        *names("--start-sigma"),
        dest="start_sigma",
        type=float,
        default=None,
        help="noise level later stages restart from (default: 0.75, or the model folder's)",
    )
    parser.add_argument(
        *names("--min-resolution"),
        dest="min_resolution",
        type=positive_int,
        default=None,
        help="smallest stage's short side, px (default: the model folder's, else the family's)",
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
        "--noise",
        choices=["fresh", "shared"],
        default=None,
        help="how stage switches re-noise: fresh noise each time (default) or one field shared by all stages",
    )
    parser.add_argument(
        *names("--upsampler"),
        dest="upsampler",
        help="folder of a LatentUpsampler (config.json + safetensors); default: the model folder's, else the one "
        "lssgen ships for the family, else latent interpolation",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """`--method NAME[:key=value,...]`: the multi-resolution method (`lssgen methods` lists them)."""
    parser.add_argument(
        "--method",
        default=None,
        metavar="NAME[:key=value,...]",
        help="the multi-resolution method and its parameters, e.g. refine:sigma=0.12,steps=1 (`lssgen methods` "
        "lists them; default: lssgen, or the model folder's)",
    )


def add_methods_argument(parser: argparse.ArgumentParser) -> None:
    """`--methods NAME[:key=value,...] ...` (also spelled `--method`, as `generate` and `geneval` take it): other
    methods run beside LSSGen's settings (`lssgen methods`)."""
    parser.add_argument(
        "--methods",
        "--method",
        dest="methods",
        nargs="+",
        default=[],
        metavar="NAME[:key=value,...]",
        help="other methods to run beside LSSGen's settings, e.g. refine:sigma=0.12,steps=1 (`lssgen methods`)",
    )


def check_method(args: argparse.Namespace) -> None:
    """`--method`'s name and parameters, and the lssgen options given with it that it does not read; each of
    `--methods` (bench: methods timed beside LSSGen's settings, each on its own parameters)."""
    methods = getattr(args, "methods", None) or []
    if getattr(args, "method", None) is None and not methods:
        return
    from lssgen.methods import resolve_method
    from lssgen.plan import Options

    for method in methods:
        resolve_method(method)
    if getattr(args, "method", None) is None:
        return

    given = {name: value for name, value in method_options(args).items() if name != "method"}
    resolve_method(args.method).check_options(set(given), Options(**given), "the command line")


def check_inputs(args: argparse.Namespace) -> None:
    """What every command is given, checked before anything slow is loaded or anything is written."""
    check_method(args)
    if not hasattr(args, "device"):
        return  # a command that loads and writes nothing (adapters, methods): nothing more to check, no torch
    from lssgen.loading import check_device, check_pipeline, check_upsampler
    from lssgen.outputs import check_writable

    check_device(args.device)
    if getattr(args, "model", None):
        check_pipeline(args.model)
    if getattr(args, "vae", None):
        from lssgen.training.data import check_vae

        check_vae(args.vae, args.subfolder)
    for name in ("upsampler", "init_from"):
        if getattr(args, name, None):
            check_upsampler(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("out", "out_dir"):
        if getattr(args, name, None):
            check_writable(
                getattr(args, name), "--" + name.replace("_", "-"), image=getattr(args, "out_is_image", False)
            )


def set_threads(args: argparse.Namespace) -> None:
    """`--threads`, before anything loads (torch sizes its thread pools on first use)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    from lssgen.loading import DTYPES, check_device, default_dtype

    device = check_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    return device, dtype


def call_arguments(
    args: argparse.Namespace, adapter: Any, *, height: int, width: int, steps: int, guidance: float | None = None
) -> dict[str, Any]:
    """The pipeline call of `args`: guidance (`--guidance`, else `guidance`, else the adapter's published value)
    goes to the argument the adapter's pipeline reads it from."""
    if args.guidance is not None:
        guidance = args.guidance
    return {
        "prompt": args.prompt,
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        adapter.guidance_argument: adapter.default_guidance if guidance is None else guidance,
    }


def folder_defaults(model: str) -> Any:
    """The `lssgen.json` defaults of a local `--model` folder; none for a hub id."""
    from pathlib import Path

    from lssgen.loading import ModelDefaults, model_defaults

    return model_defaults(model) if Path(model).expanduser().is_dir() else ModelDefaults()


def native_size(pipe: Any, adapter: Any, defaults: Any) -> tuple[int, int]:
    """The (height, width) a model generates at by default: its folder's `lssgen.json` (`defaults`), else the
    pipeline's default size."""
    return (defaults.height, defaults.width) if defaults.height else adapter.default_size(pipe)


def model_call(args: argparse.Namespace, pipe: Any, adapter: Any, defaults: Any = None) -> dict[str, Any]:
    r"""
    The pipeline call of `args`. Each of size, steps, guidance and prompt length is the user's, else the model
    folder's `lssgen.json` (`defaults`, a `ModelDefaults`: by default the pipe's folder's), else the adapter's
    published value (size: the pipeline's default size). The folder's `guidance_scale` goes where `--guidance`
    goes (the adapter's `guidance_argument`), so that `--guidance` replaces it.
    """
    import lssgen

    if defaults is None:
        defaults = lssgen.model_defaults(pipe)
    native = native_size(pipe, adapter, defaults)
    steps = args.steps or defaults.num_inference_steps or adapter.default_steps
    call = call_arguments(
        args,
        adapter,
        height=args.height or native[0],
        width=args.width or native[1],
        steps=steps,
        guidance=defaults.guidance_scale,
    )
    length = getattr(args, "max_sequence_length", None) or defaults.max_sequence_length
    if length:
        call["max_sequence_length"] = length
    return call


def method_options(args: argparse.Namespace, **overrides) -> dict[str, Any]:
    """The lssgen options the user gave (`None` is "not given": the model folder's, then the family's apply)."""
    options = {
        "start_sigma": args.start_sigma,
        "min_resolution": args.min_resolution,
        "shorten_intermediate_steps": args.shorten_intermediate_steps,
        "scaling_space": args.scaling_space,
        "noise": getattr(args, "noise", None),
        "method": getattr(args, "method", None),
    }
    base = getattr(args, "base_size", None)
    if base:
        options.update(base_height=base, base_width=base)
    options.update(overrides)
    return {name: value for name, value in options.items() if value is not None}


def patch(pipe: Any, upsampler: str | None, **options: Any) -> Any:
    """`lssgen.patch(pipe, **options)` with the `upsampler` folder loaded; without one, `patch` chooses (the model
    folder's, or a shipped upsampler that fits the pipe), so no `upsampler=None` is passed: that would ask for
    latent interpolation."""
    import lssgen
    from lssgen.loading import load_upsampler

    if upsampler is None:
        return lssgen.patch(pipe, **options)
    return lssgen.patch(pipe, load_upsampler(upsampler, pipe.dtype, pipe.device), **options)


def chosen_upsampler(pipe: Any, upsampler: str | None) -> Any:
    """The `upsampler` folder loaded, or the upsampler `lssgen.patch(pipe)` chooses without one (the model folder's,
    a shipped one that fits, or `None` for latent interpolation), for tools that patch the pipe themselves."""
    import lssgen

    patch(pipe, upsampler)
    chosen = pipe.__dict__["_lssgen"].upsampler
    lssgen.unpatch(pipe)
    return chosen


def patched_defaults(pipe: Any) -> Any:
    """The `Options` a patched pipe's calls start from (the family's, the folder's, then the user's)."""
    return pipe.__dict__["_lssgen"].defaults


def to_dtype(pipe: Any, dtype: torch.dtype) -> Any:
    """A pipeline built in code, its modules converted to `dtype` (a loaded one gets its dtype from the loader).

    diffusers' `ModelMixin.to` logs "There are modules in X that should be kept in float32: [...]" for every dtype
    cast, even of a model with no such module; `torch.nn.Module.to` converts the same way without the line, and a
    module already in `dtype` is left alone."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and component.dtype != dtype:
            torch.nn.Module.to(component, dtype=dtype)
    return pipe


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


def compare(
    pipe: Any, calls: list[dict[str, Any]], seed: int, device: str, repeats: int
) -> tuple[list[tuple[Any, Any]], list[float], list[float]]:
    r"""
    Time each of `calls` on the patched `pipe` with the stock pipeline (`start_sigma=1.0` runs it unchanged) and
    with lssgen, alternately, for `repeats` rounds after a short warm-up.

    Returns each call's (stock, lssgen) images of the first round, and each round's seconds for all the calls,
    stock and lssgen. The two sides take turns call by call, and which goes first swaps every round, so both see
    the same machine state and neither always runs right after the other. Call `index` has seed `seed + index`.
    """
    timed(pipe, {**calls[0], "num_inference_steps": 2}, seed, device, start_sigma=1.0)  # warm-up
    images: list[tuple[Any, Any]] = []
    stock_times, lssgen_times = [], []
    for round_index in range(repeats):
        totals = {"stock": 0.0, "lssgen": 0.0}
        for index, call in enumerate(calls):
            order = ("stock", "lssgen") if round_index % 2 == 0 else ("lssgen", "stock")
            pair = {}
            for side in order:
                options = {"start_sigma": 1.0} if side == "stock" else {}
                pair[side], seconds = timed(pipe, call, seed + index, device, **options)
                totals[side] += seconds
            if round_index == 0:
                images.append((pair["stock"], pair["lssgen"]))
        stock_times.append(totals["stock"])
        lssgen_times.append(totals["lssgen"])
    return images, stock_times, lssgen_times
