"""Writing what the commands make: checked before any work starts, and never left half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, option: str, *, image: bool = False) -> Path:
    r"""
    Check that `path` (a folder, or with `image=True` an image file) can be written, before any slow work.

    Returns the nearest existing folder at or above `path` (where temporary files can go); raises a `ValueError`
    naming `option` when `path` is of the wrong kind, sits under a file, or a file cannot be created in its folder
    (tried: a probe file is written and removed).

    Example:

    ```py
    >>> check_writable("runs/flux-x2", "--out")
    PosixPath('.')
    ```
    """
    path = Path(path)
    if path.is_dir() and image:
        raise ValueError(f"{option} {path}: is a folder; give an image file name such as {path / 'image.png'}.")
    if path.exists() and not path.is_dir() and not image:
        raise ValueError(f"{option} {path}: is an existing file. Choose a folder path.")
    if image:
        from PIL import Image

        suffix = path.suffix.lower()
        if suffix not in Image.registered_extensions():
            raise ValueError(
                f"{option} {path}: {'no file extension' if not suffix else f'unknown image type {suffix!r}'}; "
                "end the name with .png, .jpg or .webp."
            )
    # The path itself for an existing folder, else the first existing folder it would be created under.
    ancestor = _nearest_existing(path if path.is_dir() else path.parent)
    if not ancestor.is_dir():
        raise ValueError(f"{option} {path}: {ancestor} is a file, so {path} cannot be created there.")
    # A real write, not the permission bits: root passes every `os.access` check, yet cannot create files in
    # /proc, on a read-only mount or in a full file system.
    try:
        handle, probe = tempfile.mkstemp(prefix=".lssgen-write-probe-", dir=ancestor)
    except OSError as error:
        raise ValueError(
            f"{option} {path}: cannot write in {ancestor} ({error.strerror}). Choose a folder you can write to."
        ) from None
    os.close(handle)
    os.unlink(probe)
    return ancestor


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, then rename it to `path`: a crash never leaves a truncated `path`."""
    # A hidden temporary name in the same folder: `os.replace` is then an atomic rename, and a leftover from a
    # crash never looks like a result (`*.png`, `*.json`).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_folder(out_dir: str | os.PathLike, files: dict[str, Callable[[Path], None]]) -> Path:
    r"""
    Write `files` (file name → function writing that file at the path it is given) into `out_dir`, all or none.

    They are written into a hidden temporary folder and moved into `out_dir` only once every one succeeded, so a
    failure leaves neither a half-written file nor a folder (or parent folder) that was not there before.

    Example:

    ```py
    >>> write_folder("outputs/demo", {"a.png": image_a.save, "b.png": image_b.save})
    PosixPath('outputs/demo')
    ```
    """
    out_dir = Path(out_dir)
    # Staged in the nearest existing folder: folders still missing below it are on the same file system (none
    # can be a mount point), so the final moves are renames.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=_nearest_existing(out_dir.parent)))
    try:
        for name, write in files.items():
            write(staging / name)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)  # names may hold folders: "images/00/000.png"
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def save_pretrained_here(model, folder: str | os.PathLike) -> None:
    """`model.save_pretrained(folder)`, without the `_name_or_path` a model loaded with `from_pretrained` records:
    a saved model should not carry the local folder it was once loaded from (`--init-from`, `--resume`)."""
    import json

    model.save_pretrained(folder)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
