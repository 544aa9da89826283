"""Loading what the commands run: a device, a diffusers pipeline and a latent upsampler, with clear errors.

The `check_*` functions only read names, small JSON files and safetensors headers, so a command runs them all
before it loads anything large: a bad upsampler folder is reported before a 24 GB pipeline has been loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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


def check_vae(vae: str, subfolder: str | None = None) -> None:
    """Fail early on a local `--vae` folder (with `--subfolder`) that cannot hold a VAE."""
    from lssgen.autoencoders.taesd import is_tiny_autoencoder_folder

    if not Path(vae).expanduser().exists() and _hub_id(vae):
        return  # the hub's to check
    folder = _local_folder(Path(vae, subfolder or ""), "--vae")
    if folder is None or is_tiny_autoencoder_folder(folder):
        return
    hint = "a diffusers VAE folder" + ("" if subfolder else " (for a whole pipeline folder, add --subfolder vae)")
    _json_object(folder / "config.json", "--vae", folder, hint)
    _check_weights(sorted(folder.glob("*.safetensors")), "--vae")


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


def load_pipeline(model: str, device: str, dtype: torch.dtype) -> Any:
    """A diffusers pipeline from a folder or hub id, on `device`; a `ValueError` that says what to pass if not."""
    from diffusers import DiffusionPipeline

    check_pipeline(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        where = "" if Path(model).exists() else " (no such local folder; tried it as a Hugging Face Hub id)"
        raise ValueError(
            f"could not load a diffusers pipeline from --model {model!r}{where}: {str(error).rstrip('.')}. Give a "
            "pipeline folder (with model_index.json) or a hub id."
        ) from None
    return pipe.to(device)


def load_upsampler(path: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A `LatentUpsampler` folder, on `device`; a `ValueError` naming the folder if it cannot be read."""
    from .upsampler import LatentUpsampler

    check_upsampler(path)
    try:
        upsampler = LatentUpsampler.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as error:  # TypeError: a config value of the wrong type
        # diffusers' advice on a shape mismatch (`ignore_mismatched_sizes`) would load random weights: not ours.
        reason = str(error).split(" If you want to instead overwrite")[0]
        raise ValueError(f"--upsampler {path}: cannot load a LatentUpsampler: {reason}") from None
    return upsampler.to(device)
