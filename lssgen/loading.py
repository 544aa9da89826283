"""Loading what the commands run: a device, a diffusers pipeline and a latent upsampler, with clear errors.

The `check_*` functions only read names, small JSON files and safetensors headers, so a command runs them all
before it loads anything large: a bad upsampler folder is reported before a 24 GB pipeline has been loaded.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys that fix the upsampler's tensor shapes: without them the defaults (16 channels) would be assumed, and
# loading would fail later on a shape mismatch that does not say the config is incomplete.
UPSAMPLER_KEYS = ("in_channels", "out_channels", "block_out_channels")


def default_dtype(device: str) -> torch.dtype:
    """float32 on the CPU, bfloat16 on an accelerator."""
    return torch.float32 if device.startswith("cpu") else torch.bfloat16


def check_device(name: str | None) -> str:
    r"""
    The device to run on: `name` once checked to exist on this machine, or, when `None`, `"cuda"` if available
    and else `"cpu"`. Raises a `ValueError` for a name torch does not know or a device this machine lacks.

    Example:

    ```py
    >>> check_device(None)
    'cpu'
    ```
    """
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name!r} is not a device name torch knows; use cpu, cuda, cuda:1, mps, xpu, ..."
        ) from None
    if device.type == "cpu":
        return name
    # mps has no `is_available` under torch.mps in older releases; the others keep it in their own module.
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None:
        raise ValueError(f"--device {name!r}: lssgen cannot compute on {device.type!r}; use cpu, cuda, mps or xpu.")
    if not is_available():
        raise ValueError(
            f"--device {name}: this machine has no {device.type} device that torch {torch.__version__} can use. "
            "Use --device cpu, or leave --device out to use the best device available."
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"--device {name}: there are {count()} {device.type} device(s), numbered from 0.")
    return name


def _hub_id(value: str) -> bool:
    """Whether `value` can be a Hugging Face Hub id (`name` or `owner/name`) rather than a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    # The hub accepts `weights/scene-t2x` as an id, but where `weights` is a folder here the user meant a local
    # path (a typo in it should say "no such folder", not fail later as a download); likewise `./x`, `/x`, `~/x`.
    first = Path(value).parts[0] if Path(value).parts else ""
    if value.startswith((".", "/", "~")) or Path(value).is_absolute() or value.count("/") > 1:
        return False
    if first and Path(first).exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _local_folder(value: str | Path, option: str) -> Path | None:
    """The folder `value` names, `None` when it names none but could be a hub id; a `ValueError` otherwise."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{option} {value}: is a file; give the folder that holds the model.")
    if _hub_id(str(value)):
        return None
    raise ValueError(f"{option} {value}: no such folder.")


def _json_object(path: Path, option: str, folder: Path, hint: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{option} {folder}: has no {path.name}, so it is not {hint}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{option} {folder}: {path.name} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}); the file is damaged, copy or download it again."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{option} {folder}: cannot read {path.name}: {error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{option} {folder}: {path.name} holds a JSON {type(data).__name__}, not an object.")
    return data


def _check_weights(files: list[Path], option: str) -> None:
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt"):  # reads the header and checks the file covers it
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{option}: {file} is not a complete safetensors file ({error}); it was probably cut short while "
                "copying or downloading: copy or download it again."
            ) from None


def check_pipeline(model: str) -> None:
    """Fail early on a local `--model` folder that cannot be a diffusers pipeline (a hub id is the hub's to check)."""
    folder = _local_folder(model, "--model")
    if folder is None:
        return
    index = _json_object(folder / "model_index.json", "--model", folder, "a diffusers pipeline folder")
    if not isinstance(index.get("_class_name"), str):
        raise ValueError(f"--model {folder}: model_index.json names no pipeline class (`_class_name`).")
    _check_weights(sorted(folder.glob("*/*.safetensors")), "--model")


def check_upsampler(path: str, option: str = "--upsampler") -> None:
    """Fail early on a local `LatentUpsampler` folder with a broken or incomplete config or weights file."""
    folder = _local_folder(path, option)
    if folder is None:
        return
    config = _json_object(folder / "config.json", option, folder, "a LatentUpsampler folder")
    missing = [key for key in UPSAMPLER_KEYS if key not in config]
    if missing:
        raise ValueError(
            f"{option} {folder}: config.json lacks {', '.join(missing)}, which fix the upsampler's shape; use the "
            "config.json saved with its weights."
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(
            f"{option} {folder}: no diffusion_pytorch_model.safetensors (LatentUpsampler loads safetensors only)."
        )
    _check_weights(weights, option)


def load_pipeline(
    model: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Any:
    r"""
    Load a diffusers pipeline with the stock loader and apply its folder's `lssgen.json` (see [`ModelDefaults`]):
    the stock call's default size becomes the model's native size, and [`model_defaults`] and `lssgen.patch` read
    the rest of the file. A folder without the file loads exactly as `DiffusionPipeline.from_pretrained` loads it.

    Args:
        model (`str` or `os.PathLike`): a pipeline folder (with `model_index.json`) or a Hugging Face Hub id.
        device (`str` or `torch.device`, *optional*): where to put the pipeline; by default it stays where the
            loader puts it (the CPU).
        dtype (`torch.dtype`, *optional*): the components' dtype; by default the loader's.

    Returns:
        The pipeline. Raises a `ValueError` that says what to pass when `model` is not a pipeline, or when its
        `lssgen.json` is malformed.

    Example:

    ```py
    >>> import lssgen
    >>> pipe = lssgen.load_pipeline(lssgen.weights_path("scene-t2i"))
    >>> image = pipe("a photo of a red star", **lssgen.model_defaults(pipe).call_arguments()).images[0]
    >>> image.size  # the native size, not the pipeline class's 1024 px
    (256, 256)
    ```
    """
    from diffusers import DiffusionPipeline

    model = str(model)
    check_pipeline(model)
    local = Path(model).expanduser().is_dir()
    defaults = model_defaults(model) if local else ModelDefaults()
    if local:
        _import_own_components(Path(model).expanduser())
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as error:
        where = "" if Path(model).exists() else " (no such local folder; tried it as a Hugging Face Hub id)"
        raise ValueError(
            f"could not load a diffusers pipeline from --model {model!r}{where}: {str(error).rstrip('.')}. Give a "
            "pipeline folder (with model_index.json) or a hub id."
        ) from None
    _apply_native_size(pipe, defaults)
    return pipe if device is None else pipe.to(device)


def _import_own_components(folder: Path) -> None:
    """Import the lssgen modules a folder's `model_index.json` names as component libraries (the scene model's
    `lssgen.scenes.denoiser`, `lssgen.autoencoders.flux2`).

    diffusers loads a component of a library outside its own list only from a module already imported (it will not
    import one because a folder names it), and `import lssgen` no longer imports every tool; modules of lssgen
    itself are ours to import. Any other library is left to diffusers' own rules.
    """
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for entry in index.values():
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
            if entry[0].startswith("lssgen."):
                importlib.import_module(entry[0])


def load_upsampler(path: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A `LatentUpsampler` folder, on `device`; a `ValueError` naming the folder if it cannot be read."""
    from .upsampler import LatentUpsampler

    check_upsampler(path)
    try:
        upsampler = LatentUpsampler.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, TypeError) as error:  # TypeError: a config value of the wrong type
        # diffusers' advice on a shape mismatch (`ignore_mismatched_sizes`) would load random weights: not ours.
        reason = str(error).split(" If you want to instead overwrite")[0]
        raise ValueError(f"--upsampler {path}: cannot load a LatentUpsampler: {reason}") from None
    return upsampler.to(device)


# Model folders: how a pipeline folder says to call it -----------------------------------------------------------------
MODEL_DEFAULTS_FILE = "lssgen.json"
MODEL_DEFAULTS_FORMAT = 1
_CALL_KEYS = ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")
_FILE_KEYS = ("format", *_CALL_KEYS, "patch")


@dataclass(frozen=True)
class ModelDefaults:
    r"""
    How a pipeline folder says to call its model: the contents of its `lssgen.json`, next to `model_index.json`
    (the format is described in docs/model-folders.md). Every field is optional; a folder without the file has
    none, and then nothing changes.

    Args:
        height (`int`, *optional*), width (`int`, *optional*):
            the model's native size in pixels. [`load_pipeline`] makes it the stock call's default size.
        num_inference_steps (`int`, *optional*): the step count the model was made for.
        guidance_scale (`float`, *optional*): the guidance scale the model was made for.
        max_sequence_length (`int`, *optional*): the prompt length in tokens the model was trained with.
        patch (`dict`, *optional*):
            defaults of `lssgen.patch` for this model: any of [`Options`] (`base_height`, `base_width`,
            `min_resolution`, `start_sigma`, ...) and `upsampler`: a shipped upsampler's name (`"flux2-x2"`), a
            folder relative to the model folder, or `None` for latent interpolation. `base_height`/`base_width`
            default to the native size. Arguments passed to `lssgen.patch` override them.
        folder (`Path`, *optional*): the folder the file was read from.

    Example:

    ```py
    >>> import lssgen
    >>> defaults = lssgen.model_defaults(lssgen.weights_path("scene-t2i"))
    >>> defaults.call_arguments()
    {'height': 256, 'width': 256, 'num_inference_steps': 20, 'guidance_scale': 4.0, 'max_sequence_length': 32}
    >>> defaults.patch_options()
    {'base_height': 256, 'base_width': 256, 'min_resolution': 64}
    ```
    """

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    patch: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    def __post_init__(self):
        _check_model_defaults(self, self.file or MODEL_DEFAULTS_FILE)

    @property
    def file(self) -> Path | None:
        """The `lssgen.json` these defaults belong to (it need not exist: a folder without one has no defaults)."""
        return None if self.folder is None else self.folder / MODEL_DEFAULTS_FILE

    def call_arguments(self) -> dict[str, Any]:
        r"""
        The pipeline call arguments the file sets (native size, steps, guidance, prompt length), to pass to
        `pipe(...)`; arguments of your own go after them: `pipe(prompt, **{**defaults.call_arguments(), "height":
        512})`.
        """
        return {name: getattr(self, name) for name in _CALL_KEYS if getattr(self, name) is not None}

    def patch_options(self) -> dict[str, Any]:
        """The `lssgen.patch` defaults the file sets, less the upsampler; the base size is the native size unless
        the file says otherwise."""
        options = {"base_height": self.height, "base_width": self.width}
        options.update({name: value for name, value in self.patch.items() if name != "upsampler"})
        return {name: value for name, value in options.items() if value is not None}

    @property
    def names_upsampler(self) -> bool:
        """Whether the file chooses the upsampler (a folder, or `None` for latent interpolation)."""
        return "upsampler" in self.patch

    def upsampler_path(self) -> Path | None:
        """The folder of the upsampler the file names: a shipped one by name, else a folder relative to the model
        folder; `None` when it names none (or asks for latent interpolation)."""
        from lssgen.weights import shipped, weights_path

        name = self.patch.get("upsampler")
        if name is None:
            return None
        if name in shipped():
            return weights_path(name)
        path = Path(name).expanduser()
        return path if path.is_absolute() or self.folder is None else self.folder / path

    def to_json(self) -> dict[str, Any]:
        """The file's contents (a JSON object)."""
        return {
            "format": MODEL_DEFAULTS_FORMAT,
            **self.call_arguments(),
            **({"patch": self.patch} if self.patch else {}),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `lssgen.json` into `folder` (a pipeline folder); returns the file's path."""
        path = Path(folder) / MODEL_DEFAULTS_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ModelDefaults:
        """The defaults in `folder`'s `lssgen.json`; none (all fields `None`) when it has no such file. A
        `ValueError` naming the file and the key when its contents are malformed."""
        folder = Path(folder).expanduser()
        file = folder / MODEL_DEFAULTS_FILE
        if not file.is_file():
            return cls(folder=folder)
        data = _json_object(file, "model folder", folder, "")
        unknown = sorted(set(data) - set(_FILE_KEYS))
        if unknown:
            raise ValueError(
                f"{file}: unknown key(s) {unknown}; an lssgen.json holds {list(_FILE_KEYS)} (docs/model-folders.md)."
            )
        version = data.pop("format", MODEL_DEFAULTS_FORMAT)
        if version != MODEL_DEFAULTS_FORMAT:
            raise ValueError(
                f"{file}: `format` is {version!r}; this lssgen reads format {MODEL_DEFAULTS_FORMAT}. Upgrade lssgen, "
                "or write the file in format 1 (docs/model-folders.md)."
            )
        patch = data.get("patch", {})
        if not isinstance(patch, dict):
            raise ValueError(f"{file}: `patch` must be a JSON object of lssgen.patch defaults, got {patch!r}.")
        return cls(folder=folder, **data)


def _check_model_defaults(defaults: ModelDefaults, file: Path | str) -> None:
    """A `ValueError` naming `file` and the key for any value lssgen could not use."""
    from .methods import resolve_method
    from .plan import OPTION_NAMES, Options, validate_options
    from .scaling import resolve_scaling_space

    positive_ints = ("height", "width", "num_inference_steps", "max_sequence_length")
    for name in positive_ints:
        value = getattr(defaults, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{file}: `{name}` must be a positive whole number, got {value!r}.")
    if (defaults.height is None) != (defaults.width is None):
        raise ValueError(f"{file}: give the native size as both `height` and `width` (pixels), or neither.")
    guidance = defaults.guidance_scale
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float)):
        raise ValueError(f"{file}: `guidance_scale` must be a number, got {guidance!r}.")
    if not isinstance(defaults.patch, dict):
        raise ValueError(f"{file}: `patch` must be a JSON object of lssgen.patch defaults, got {defaults.patch!r}.")
    unknown = sorted(set(defaults.patch) - {*OPTION_NAMES, "upsampler"})
    if unknown:
        raise ValueError(f"{file}: unknown `patch` key(s) {unknown}; known keys are {[*OPTION_NAMES, 'upsampler']}.")
    upsampler = defaults.patch.get("upsampler")
    if upsampler is not None and not isinstance(upsampler, str):
        raise ValueError(
            f"{file}: `patch.upsampler` must be a shipped upsampler's name, a folder relative to the model folder, "
            f"or null for latent interpolation; got {upsampler!r}."
        )
    options = {name: value for name, value in defaults.patch.items() if name != "upsampler"}
    try:
        chosen = Options(**options)
        validate_options(
            start_sigma=chosen.start_sigma,
            min_resolution=chosen.min_resolution,
            base_height=chosen.base_height,
            base_width=chosen.base_width,
            shorten_intermediate_steps=chosen.shorten_intermediate_steps,
        )
        # Any stand-in upsampler: here only the name is checked; `patch` checks it against the upsampler it has.
        resolve_scaling_space(chosen.scaling_space, upsampler=True)
        resolve_method(chosen.method)  # its spelling; `patch` checks it against the family
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: in `patch`: {error}") from None
    path = defaults.upsampler_path()
    # A relative folder can only be checked once the defaults belong to a folder (read from it, or saved there).
    if path is not None and (path.is_absolute() or defaults.folder is not None) and not path.is_dir():
        from lssgen.weights import shipped

        raise ValueError(
            f"{file}: `patch.upsampler` {upsampler!r} is neither shipped ({', '.join(shipped())}) nor a "
            f"folder ({path} does not exist); give a name, a folder relative to the model folder, or null."
        )


def model_defaults(pipe_or_path: Any) -> ModelDefaults:
    r"""
    How a model folder says to call its model: its `lssgen.json` as a [`ModelDefaults`].

    Args:
        pipe_or_path (`DiffusionPipeline`, `str` or `os.PathLike`):
            a pipeline folder, or a pipeline loaded from one (diffusers records the folder in `pipe.name_or_path`).
            A pipeline built in code, or loaded from a hub id, has no folder and so no defaults.

    Returns:
        The folder's defaults; all `None` when there is no file. A `ValueError` naming the file and the key when its
        contents are malformed.

    Example:

    ```py
    >>> import lssgen
    >>> pipe = lssgen.load_pipeline("weights/scene-t2i")
    >>> image = pipe("a photo of a red star", **lssgen.model_defaults(pipe).call_arguments()).images[0]
    ```
    """
    if isinstance(pipe_or_path, str | os.PathLike):
        folder = Path(pipe_or_path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model_defaults({str(pipe_or_path)!r}): no such folder; give a pipeline folder.")
        return ModelDefaults.from_folder(folder)
    name = getattr(pipe_or_path, "name_or_path", None)  # what was passed to `from_pretrained`: a str or a Path
    if not isinstance(name, str | os.PathLike) or not Path(name).expanduser().is_dir():
        return ModelDefaults()
    return ModelDefaults.from_folder(name)


def _apply_native_size(pipe: Any, defaults: ModelDefaults) -> None:
    """Make the file's native size the stock call's default size, where the pipeline takes it from
    `default_sample_size` (FLUX.1, FLUX.2, SD3, SDXL, CogView4, ...: `height = height or default_sample_size *
    vae_scale_factor`)."""
    if defaults.height is None:
        return
    sample_size, factor = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
    if defaults.height != defaults.width or not isinstance(sample_size, int) or not isinstance(factor, int):
        logger.warning(
            f"{defaults.file}: the native size {defaults.width}x{defaults.height} cannot become "
            f"{type(pipe).__name__}'s default size (it takes one square `default_sample_size`); pass "
            "`**lssgen.model_defaults(pipe).call_arguments()` to the call to use it."
        )
        return
    if defaults.height % factor:
        raise ValueError(
            f"{defaults.file}: `height`/`width` {defaults.height} is not a multiple of the VAE's scale factor "
            f"{factor}; give the native size the model was trained at."
        )
    pipe.default_sample_size = defaults.height // factor
