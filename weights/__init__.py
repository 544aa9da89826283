"""The weights trained for lssgen, one folder each, installed with the package as `lssgen.weights`.

In a clone this is the repository's `weights/` folder; in an installed wheel, the same folders as package data.

Example:

```py
>>> import lssgen
>>> from lssgen.weights import weights_path
>>> upsampler = lssgen.LatentUpsampler.from_pretrained(weights_path("flux2-x2"))
```
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def shipped() -> list[str]:
    """The names of the shipped weight folders."""
    return sorted(p.name for p in FOLDER.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def weights_path(name: str) -> Path:
    """The folder of the shipped weights `name` (e.g. `"flux2-x2"`)."""
    folder = FOLDER / name
    if name not in shipped():
        raise ValueError(f"No shipped weights named {name!r}; lssgen ships {shipped()}.")
    return folder
