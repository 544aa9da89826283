r"""Batch generation for GenEval: every prompt of an `evaluation_metadata.jsonl`, in GenEval's folder layout.

The output is what GenEval's `evaluate_images.py` reads, plus a `run.json` with the settings and timings:

```
OUT/
├── run.json                 settings, library versions, per-prompt wall time, summary
├── 00000/
│   ├── metadata.jsonl       the prompt's JSON object, unchanged
│   └── samples/
│       ├── 0000.png
│       └── ...
└── 00001/ ...
```

Runs resume: a prompt whose samples are all there is skipped, a partly written one is generated again. Every
file is written under a temporary name and renamed into place, so a crash never leaves a truncated image.
`metadata.jsonl` is written last, after the prompt's samples, so it marks a finished prompt.

Each image has its own seed, derived from (`seed`, prompt index, sample index) with a stable hash, and its own
`torch.Generator`: an image is the same whatever the batch size or the number of processes. Under
`accelerate launch` (or `torchrun`) the prompts are split between the processes with `accelerate`'s
`PartialState`; each process writes its own prompts and timings, and the main process merges `run.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lssgen.adapters import find_adapter
from lssgen.loading import DTYPES, check_device, default_dtype, load_pipeline, load_upsampler
from lssgen.methods import resolve_method
from lssgen.outputs import atomic_write, check_writable
from lssgen.patch import patch, plan_for
from lssgen.plan import Options

MODES = ("lssgen", "baseline")
RUN_FILE = "run.json"
METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
# Settings that change the images: a resumed run must match them, or one folder would mix two experiments.
# (Batch size, device placement and process count do not change the images, so they may differ.)
_IMAGE_SETTINGS = (
    "model",
    "mode",
    "pipeline",
    "upsampler",
    "steps",
    "guidance",
    "height",
    "width",
    "start_sigma",
    "min_resolution",
    "shorten_intermediate_steps",
    "scaling_space",
    "noise",
    "method",
    "max_sequence_length",
    "seed",
    "dtype",
)


@dataclass(frozen=True)
class GenEvalSettings:
    r"""
    What `run_geneval` generates. `None` means the pipeline family's published default (see `lssgen adapters`).

    Args:
        model (`str`): diffusers pipeline folder or hub id.
        out (`str`): output folder (GenEval layout).
        mode (`str`, defaults to `"lssgen"`): `"lssgen"` (patched pipeline) or `"baseline"` (stock pipeline).
        pipeline (`str`, *optional*): adapter name instead of detecting it; it must serve the checkpoint's pipeline.
        upsampler (`str`, *optional*): folder of a `LatentUpsampler` (lssgen mode).
        steps (`int`), guidance (`float`): denoising steps and guidance scale.
        height (`int`), width (`int`): image size in pixels (default: the pipeline's native size).
        start_sigma (`float`, defaults to `0.75`), min_resolution (`int`), shorten_intermediate_steps (`bool`),
            scaling_space (`str`), noise (`str`): lssgen's options (ignored in baseline mode); `start_sigma` None:
            not passed (a method other than LSSGen's that does not read it).
        method (`str`, *optional*): the multi-resolution method as `--method` spells it (`lssgen methods`);
            default: LSSGen's.
        max_sequence_length (`int`, *optional*): prompt tokens, passed to the pipeline only when given (the shipped
            scene model was trained on 32).
        images_per_prompt (`int`, defaults to `4`): samples per prompt (GenEval uses 4).
        batch_size (`int`, *optional*): images per pipeline call, all of one prompt (default: `images_per_prompt`).
        seed (`int`, defaults to `0`): base seed; image seeds derive from it (see [`image_seed`]).
        dtype (`str`, *optional*): `float32`, `bfloat16` or `float16` (default: bfloat16 on GPU, else float32).
        device (`str`, *optional*): default: this process's device from `accelerate` (its own GPU under
            `accelerate launch`); a bare `cuda` also means this process's GPU when there are several processes.
    """

    model: str
    out: str
    mode: str = "lssgen"
    pipeline: str | None = None
    upsampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    start_sigma: float | None = 0.75
    min_resolution: int | None = None
    shorten_intermediate_steps: bool | None = None
    scaling_space: str | None = None
    noise: str | None = None
    method: str | None = None
    max_sequence_length: int | None = None
    images_per_prompt: int = 4
    batch_size: int | None = None
    seed: int = 0
    dtype: str | None = None
    device: str | None = None


def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    r"""
    Read a GenEval prompt file: one JSON object per line with at least a non-empty string `prompt`. Other keys
    (`tag`, `include`, ...) are kept as they are. Blank lines are skipped.

    Raises a `ValueError` naming the file and line of the first invalid line.

    Example:

    ```py
    >>> prompts = read_prompts("geneval/prompts/evaluation_metadata.jsonl")
    >>> prompts[0]["prompt"]
    ```
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the prompt file {str(path)!r}: {error}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno}). Each line must be one JSON object "
                'such as {"tag": "single_object", "prompt": "a photo of a cat"}.'
            ) from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object with a `prompt` key, got {type(entry).__name__}.")
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{where}: needs a non-empty string "prompt" key, got {prompt!r}.')
        prompts.append(entry)
    if not prompts:
        raise ValueError(f"the prompt file {str(path)!r} holds no prompts (one JSON object per line expected).")
    return prompts


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    r"""
    The seed of one image: a SHA-256 of (`seed`, prompt index, sample index), as a 63-bit integer.

    Stable across processes, machines and Python versions (unlike `hash()`, which is salted per process), and
    independent of batching, so any split of the work generates the same images.

    Example:

    ```py
    >>> generator = torch.Generator("cpu").manual_seed(image_seed(0, prompt_index=12, sample_index=3))
    ```
    """
    digest = hashlib.sha256(f"lssgen-geneval:{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def prompt_folder(out: str | os.PathLike, index: int) -> Path:
    """`OUT/<index, 5 digits>`, GenEval's folder of one prompt."""
    return Path(out) / f"{index:05d}"


def sample_name(sample_index: int) -> str:
    return f"{sample_index:04d}.png"


def is_complete(folder: Path, entry: dict[str, Any], images_per_prompt: int) -> bool:
    """Whether `folder` holds this prompt's metadata and exactly its `images_per_prompt` samples."""
    try:
        if json.loads((folder / METADATA_FILE).read_text(encoding="utf-8")) != entry:
            return False
        found = {path.name for path in (folder / SAMPLES_DIR).glob("*.png")}
    except (OSError, ValueError):
        return False
    return found == {sample_name(i) for i in range(images_per_prompt)}


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def _clear_prompt_folder(folder: Path) -> None:
    """Make a partly written folder empty of results: no stale marker, samples or temporary files."""
    (folder / METADATA_FILE).unlink(missing_ok=True)
    samples = folder / SAMPLES_DIR
    if samples.is_dir():
        for path in samples.iterdir():
            if path.is_file() and (path.suffix == ".png" or path.name.endswith(".tmp")):
                path.unlink()


# The lssgen options a run may set besides the method.
_LSSGEN_OPTIONS = ("start_sigma", "min_resolution", "shorten_intermediate_steps", "scaling_space", "noise")


def _check_settings(settings: GenEvalSettings) -> None:
    if settings.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {settings.mode!r}.")
    for name in (
        "steps",
        "height",
        "width",
        "min_resolution",
        "max_sequence_length",
        "images_per_prompt",
        "batch_size",
    ):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
    if settings.start_sigma is not None and not 0 < settings.start_sigma <= 1:
        raise ValueError(f"--start-sigma must be in (0, 1], got {settings.start_sigma} (0.75 is the default).")
    if settings.mode == "lssgen":  # the method, and the options it does not read, refused before anything loads
        method = resolve_method(settings.method)
        given = {name for name in _LSSGEN_OPTIONS if getattr(settings, name) is not None}
        method.check_options(given, Options(start_sigma=settings.start_sigma or Options.start_sigma), "lssgen geneval")
    if settings.dtype is not None and settings.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}.")
    check_device(settings.device)
    check_writable(settings.out, "--out")
    if settings.pipeline is not None:
        from lssgen.adapters import installed_adapters

        installed = installed_adapters()
        if settings.pipeline not in installed:
            raise ValueError(
                f"--pipeline {settings.pipeline!r} is not an installed lssgen adapter; installed: "
                f"{', '.join(sorted(installed))} (`lssgen adapters` lists them). Leave it out to detect the family "
                "from the checkpoint."
            )


def parse_pipeline_type(pipeline_type: str) -> tuple[str, str]:
    r"""
    The published LSSGen batch script's `--pipeline_type` as `(mode, adapter name)`: a family name (`flux`, `sd3`,
    `sdxl`, `sd`, `cogview4`, or any installed adapter's) runs the stock pipeline, `lss` + a family name runs
    LSSGen. Raises a `ValueError` listing the valid names.

    Example:

    ```py
    >>> parse_pipeline_type("lssflux"), parse_pipeline_type("sd3")
    (('lssgen', 'flux'), ('baseline', 'sd3'))
    ```
    """
    from lssgen.adapters import installed_adapters

    installed = installed_adapters()
    if pipeline_type in installed:
        return "baseline", pipeline_type
    if pipeline_type.startswith("lss") and pipeline_type[3:] in installed:
        return "lssgen", pipeline_type[3:]
    valid = [name for family in sorted(installed) for name in (family, f"lss{family}")]
    raise ValueError(
        f"--pipeline_type {pipeline_type!r} is none of {', '.join(valid)} (a family name runs the stock pipeline, "
        "lss + the family name runs LSSGen)."
    )


def _process_state(device: str | None) -> Any:
    from accelerate import PartialState

    # accelerate only sets up a multi-process group on the CPU when told so; without this, `torchrun` or
    # `accelerate launch --multi_gpu` on a machine with no GPU would leave every process thinking it is alone.
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    cpu = (device is not None and device.startswith("cpu")) or not has_accelerator
    return PartialState(cpu=cpu)


def _resolve_device(requested: str | None, state: Any) -> str:
    own = state.device
    if requested is None:
        return "cpu" if own.type == "cpu" else str(own)
    if state.num_processes > 1 and requested == own.type and own.type != "cpu":
        return str(own)  # a bare "cuda" under several processes: each process its own GPU, not all on GPU 0
    return requested


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lssgen", "diffusers", "torch", "transformers", "accelerate"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["torch"] = torch.__version__  # the local build tag (+cpu, +cu124) matters for timings
    return versions


def _resolved_settings(settings: GenEvalSettings, pipe: Any, adapter: Any, dtype: torch.dtype) -> GenEvalSettings:
    """The settings with every default filled in, as recorded in run.json and compared on resume."""
    default_height, default_width = adapter.default_size(pipe)
    model = settings.model
    if Path(model).exists():
        model = str(Path(model).resolve())
    resolved = replace(
        settings,
        model=model,
        out=str(Path(settings.out).resolve()),
        pipeline=adapter.name,
        steps=settings.steps or adapter.default_steps,
        guidance=adapter.default_guidance if settings.guidance is None else settings.guidance,
        height=settings.height or default_height,
        width=settings.width or default_width,
        batch_size=min(settings.batch_size or settings.images_per_prompt, settings.images_per_prompt),
        dtype=str(dtype).removeprefix("torch."),
    )
    if settings.upsampler is not None:
        resolved = replace(resolved, upsampler=str(Path(settings.upsampler).resolve()))
    if settings.mode == "baseline":
        # The stock pipeline ignores lssgen's options; recording them would suggest otherwise.
        resolved = replace(
            resolved,
            upsampler=None,
            start_sigma=None,
            min_resolution=None,
            shorten_intermediate_steps=None,
            scaling_space=None,
            noise=None,
            method=None,
        )
    return resolved


def _check_resume(out: Path, resolved: GenEvalSettings) -> None:
    try:
        previous = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a fresh folder, or one without a readable run record: nothing to compare with
    now = asdict(resolved)
    differing = [name for name in _IMAGE_SETTINGS if name in previous and previous[name] != now[name]]
    if differing:
        changes = ", ".join(f"{name}: {previous[name]!r} -> {now[name]!r}" for name in differing)
        raise ValueError(
            f"{out} holds a run with other settings ({changes}); resuming would mix two experiments in one "
            "folder. Use another --out, or delete the folder to start over."
        )


def _method_options(resolved: GenEvalSettings) -> dict[str, Any]:
    options = {
        "start_sigma": resolved.start_sigma,
        "min_resolution": resolved.min_resolution,
        "shorten_intermediate_steps": resolved.shorten_intermediate_steps,
        "scaling_space": resolved.scaling_space,
        "noise": resolved.noise,
        "method": resolved.method,
    }
    return {name: value for name, value in options.items() if value is not None}


def _generate_prompt(
    pipe: Any,
    index: int,
    entry: dict[str, Any],
    resolved: GenEvalSettings,
    options: dict[str, Any],
    out: Path,
    guidance_argument: str = "guidance_scale",
) -> float:
    """Generate and save one prompt's samples, then its metadata; returns the wall time in seconds."""
    start = time.perf_counter()
    folder = prompt_folder(out, index)
    _clear_prompt_folder(folder)
    samples = folder / SAMPLES_DIR
    samples.mkdir(parents=True, exist_ok=True)
    count, batch = resolved.images_per_prompt, resolved.batch_size
    for first in range(0, count, batch):
        indices = range(first, min(first + batch, count))
        # One CPU generator per image: the noise of an image depends on its own seed only, not on which
        # batch or device it lands in.
        generators = [torch.Generator("cpu").manual_seed(image_seed(resolved.seed, index, i)) for i in indices]
        images = pipe(
            prompt=entry["prompt"],
            num_images_per_prompt=len(generators),
            generator=generators,
            height=resolved.height,
            width=resolved.width,
            num_inference_steps=resolved.steps,
            **{guidance_argument: resolved.guidance},
            **({} if resolved.max_sequence_length is None else {"max_sequence_length": resolved.max_sequence_length}),
            **options,
        ).images
        for sample_index, image in zip(indices, images):
            atomic_write(samples / sample_name(sample_index), lambda p, image=image: image.save(p, format="PNG"))
    _write_json_line(folder / METADATA_FILE, entry)
    return time.perf_counter() - start


def _write_json_line(path: Path, entry: dict[str, Any]) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(entry) + "\n", encoding="utf-8"))


def _summary(records: list[dict[str, Any]], skipped: list[int], wall_seconds: float) -> dict[str, Any]:
    per_image = [record["seconds"] / record["images"] for record in records]
    return {
        "generated_prompts": len(records),
        "skipped_prompts": len(skipped),
        "images": sum(record["images"] for record in records),
        "total_seconds": round(sum(record["seconds"] for record in records), 4),
        "wall_seconds": round(wall_seconds, 4),
        "median_seconds_per_image": round(statistics.median(per_image), 4) if per_image else None,
    }


def run_geneval(
    prompts_file: str | os.PathLike,
    settings: GenEvalSettings,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    r"""
    Generate `settings.images_per_prompt` images for every prompt of a GenEval prompt file, in GenEval's layout
    under `settings.out`, skipping prompts already complete there.

    Works unchanged under `accelerate launch` / `torchrun`: the prompts still to do are split between the
    processes. Everything is checked (prompt file, settings, model, a resumed folder's settings) before anything
    is written; bad input raises a `ValueError` that says what to change.

    Args:
        prompts_file (`str` or `os.PathLike`): GenEval's `evaluation_metadata.jsonl` or a file like it.
        settings (`GenEvalSettings`): what to generate and where.
        log (`Callable[[str], None]`, defaults to `print`): where the main process reports progress.

    Returns:
        The `run.json` record on the main process, `None` on the others.

    Example:

    ```py
    >>> from lssgen.evaluation.geneval import GenEvalSettings, run_geneval
    >>> run = run_geneval("evaluation_metadata.jsonl", GenEvalSettings(model="black-forest-labs/FLUX.1-dev",
    ...                   out="geneval/flux-lssgen", upsampler="flux-x2", images_per_prompt=4))
    >>> run["summary"]["median_seconds_per_image"]
    ```
    """
    started = time.perf_counter()
    _check_settings(settings)
    prompts = read_prompts(prompts_file)
    state = _process_state(settings.device)
    main = state.is_main_process

    def say(message: str) -> None:
        if main:
            log(message)

    device = _resolve_device(settings.device, state)
    dtype = DTYPES[settings.dtype] if settings.dtype is not None else default_dtype(device)
    pipe = load_pipeline(settings.model, device, dtype)
    adapter = find_adapter(pipe, settings.pipeline)
    if adapter.match_rank(pipe) is None:  # only when named: its hooks and defaults would not fit this pipeline
        raise ValueError(
            f"--model {settings.model} holds a {type(pipe).__name__}, not a pipeline of the {adapter.name} family "
            f"({', '.join(adapter.pipeline_classes)}) asked for with --pipeline or --pipeline_type; leave those out "
            "to detect the family."
        )
    resolved = _resolved_settings(settings, pipe, adapter, dtype)
    options = {}
    if settings.mode == "lssgen":
        upsampler = load_upsampler(settings.upsampler, pipe.dtype, pipe.device) if settings.upsampler else None
        if upsampler is None:  # `patch` picks: a shipped upsampler that fits, else latent interpolation
            patch(pipe, adapter=adapter)
        else:
            patch(pipe, upsampler, adapter=adapter)
        options = _method_options(resolved)
        # Plans before anything is written: a bad option combination fails here, not after the first prompt.
        plan = plan_for(pipe, resolved.height, resolved.width, resolved.steps, **options)
    elif settings.upsampler:
        say("lssgen geneval: --upsampler is ignored with --mode baseline (the stock pipeline has no stages).")
    pipe.set_progress_bar_config(disable=True)  # one bar over prompts instead of one per call

    out = Path(settings.out)
    _check_resume(out, resolved)
    # Every process looks before any writes, so all agree on what is left to do.
    complete = [
        is_complete(prompt_folder(out, i), entry, resolved.images_per_prompt) for i, entry in enumerate(prompts)
    ]
    done = [index for index, finished in enumerate(complete) if finished]
    todo = [index for index, finished in enumerate(complete) if not finished]
    state.wait_for_everyone()

    say(
        f"lssgen geneval: {len(prompts)} prompts x {resolved.images_per_prompt} images, mode {settings.mode}, "
        f"{type(pipe).__name__} (adapter {adapter.name}) from {settings.model}"
    )
    say(
        f"device {device}, {resolved.dtype}, {state.num_processes} process(es); {resolved.steps} steps at "
        f"{resolved.width}x{resolved.height}, guidance {resolved.guidance}, batch {resolved.batch_size}, "
        f"seed {resolved.seed}"
    )
    if settings.mode == "lssgen":
        say(plan.describe())
    say(f"{len(done)} prompts already complete in {out} (skipped), {len(todo)} to generate")

    record = {
        "command": "lssgen geneval",
        "prompts_file": str(Path(prompts_file).resolve()),
        "num_prompts": len(prompts),
        "settings": asdict(resolved),
        "pipeline_class": type(pipe).__name__,
        "device": device if state.num_processes == 1 else f"{state.device.type} x {state.num_processes}",
        "num_processes": state.num_processes,
        "versions": _versions(),
        "status": "running",
    }
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".process-*.json"):
            stale.unlink()
        _write_json(out / RUN_FILE, record)
    state.wait_for_everyone()

    records = []
    with state.split_between_processes(todo) as mine:
        bar = tqdm(mine, desc=f"geneval ({settings.mode})", unit="prompt", disable=not main, dynamic_ncols=True)
        for index in bar:
            seconds = _generate_prompt(pipe, index, prompts[index], resolved, options, out, adapter.guidance_argument)
            records.append(
                {
                    "index": index,
                    "seconds": round(seconds, 4),
                    "images": resolved.images_per_prompt,
                    "process": state.process_index,
                }
            )
    _write_json(out / f".process-{state.process_index}.json", records)
    state.wait_for_everyone()
    if not main:
        return None

    merged = []
    for rank in range(state.num_processes):
        path = out / f".process-{rank}.json"
        merged.extend(json.loads(path.read_text(encoding="utf-8")))
        path.unlink()
    merged.sort(key=lambda entry: entry["index"])
    record.update(
        status="complete",
        prompts=merged,
        skipped=done,
        summary=_summary(merged, done, time.perf_counter() - started),
    )
    _write_json(out / RUN_FILE, record)
    summary = record["summary"]
    median = summary["median_seconds_per_image"]
    log(
        f"generated {summary['images']} images for {summary['generated_prompts']} prompts in "
        f"{summary['total_seconds']:.1f} s of generation ({summary['wall_seconds']:.1f} s wall)"
        + (f", median {median:.3f} s per image" if median is not None else "")
        + f" -> {out}"
    )
    return record
