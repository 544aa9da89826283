r"""
Natural photographs with clean licences for training and evaluating latent upsamplers, assembled from packages
(never committed): scikit-image's bundled sample photos (PyPI) and the photographs among Debian's desktop
wallpaper packages (`mate-backgrounds`, `plasma-workspace-wallpapers`). Drawings, renders and abstract
wallpapers in those packages are left out by the list below.

Every image is written as PNG, its long side reduced to at most `--max-side` pixels, into `OUT/train/` or
`OUT/heldout/` (a fixed split, part of the list), with `OUT/photos.json` recording per image the package and
version it came from, the path inside it, the author, the licence and a checksum; each Debian package's
copyright file is copied to `OUT/licenses/`.

Run: `python -m lssgen.training.photos --out data/photos` (downloads the two .deb files with `apt-get download`; or pass
them with `--deb FILE.deb`; `--skimage-only` needs no network).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

MAX_SIDE = 1536
TRAIN, HELDOUT = "train", "heldout"


@dataclass(frozen=True)
class Photo:
    name: str
    source: str  # "skimage" or a Debian package name
    path: str  # file name in skimage's data folder, or path inside the package
    split: str = TRAIN


_MATE = "usr/share/backgrounds/mate/nature/"
_PLASMA = "usr/share/wallpapers/{}/contents/images/2560x1600.jpg"

# Only photographs (checked by eye); the held-out six span portrait, food, landscape, forest, macro and sky.
PHOTOS = (
    Photo("astronaut", "skimage", "astronaut.png", HELDOUT),
    Photo("chelsea", "skimage", "chelsea.png"),
    Photo("coffee", "skimage", "coffee.png", HELDOUT),
    Photo("rocket", "skimage", "rocket.jpg"),
    *(
        Photo(
            name.lower(), "mate-backgrounds", _MATE + name + ".jpg", HELDOUT if name in ("LadyBird", "Storm") else TRAIN
        )
        for name in (
            "Aqua",
            "Blinds",
            "Dune",
            "FreshFlower",
            "Garden",
            "GreenMeadow",
            "LadyBird",
            "RainDrops",
            "Storm",
            "TwoWings",
            "Wood",
            "YellowFlower",
        )
    ),  # fmt: skip
    *(
        Photo(
            name.lower(),
            "plasma-workspace-wallpapers",
            _PLASMA.format(name),
            HELDOUT if name in ("EveningGlow", "Path") else TRAIN,
        )
        for name in (
            "BytheWater",
            "ColdRipple",
            "ColorfulCups",
            "DarkestHour",
            "EveningGlow",
            "FallenLeaf",
            "Grey",
            "Kite",
            "OneStandsOut",
            "Path",
            "summer_1am",
        )
    ),  # fmt: skip
)

# What scikit-image's own docstrings (skimage.data.<function>) say of each photo's origin and licence.
SKIMAGE_LICENCES = {
    "astronaut.png": ("NASA (Eileen Collins portrait, NASA Great Images)", "public domain"),
    "chelsea.png": ("Stefan van der Walt", "CC0-1.0"),
    "coffee.png": ("Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0-1.0"),
    "rocket.jpg": ("SpaceX (DSCOVR launch on Falcon 9)", "public domain"),
}


def _read_deb(deb: Path) -> dict[str, bytes]:
    """The regular files of a .deb's data archive, by path without the leading './'."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header).")
    offset, files = 8, {}
    while offset < len(blob):  # an ar archive: 60-byte headers, members padded to even sizes
        header = blob[offset : offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        member = blob[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(member)) as archive:
                for info in archive.getmembers():
                    if info.isfile():
                        files[info.name.removeprefix("./")] = archive.extractfile(info).read()
    if not files:
        raise ValueError(f"{deb}: no data.tar member found.")
    return files


def _deb_version(deb: Path) -> str:
    return deb.name.split("_")[1].replace("%3a", ":") if deb.name.count("_") >= 2 else "unknown"


def _dep5_stanza(copyright_text: str, relative_path: str) -> tuple[str, str]:
    """(Copyright, License) of the machine-readable copyright stanza whose Files list names `relative_path`."""
    for stanza in copyright_text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1].isspace() and key:
                fields[key].append(line.strip())
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = [value.strip()]
        if relative_path in " ".join(fields.get("Files", [])).split():
            holders = "; ".join(v for v in fields.get("Copyright", []) if v)
            return holders, fields.get("License", ["unknown"])[0]
    raise ValueError(f"No copyright stanza names {relative_path}.")


def _plasma_metadata(files: dict[str, bytes], image_path: str) -> tuple[str, str]:
    """(Author, License) from the wallpaper's own metadata.json."""
    folder = image_path.split("/contents/")[0]
    meta = json.loads(files[f"{folder}/metadata.json"])["KPlugin"]
    return "; ".join(a["Name"] for a in meta.get("Authors", [])), meta["License"]


def _save(image: Image.Image, target: Path, max_side: int) -> tuple[int, int]:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")
    return image.size


def _download_debs(packages: list[str], folder: Path) -> dict[str, Path]:
    try:
        subprocess.run(["apt-get", "download", *packages], cwd=folder, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ValueError("apt-get is not available: pass the packages with --deb FILE.deb.") from None
    except subprocess.CalledProcessError as error:
        raise ValueError(f"apt-get download {' '.join(packages)} failed: {error.stderr.strip()}") from None
    return {deb.name.split("_")[0]: deb for deb in folder.glob("*.deb")}


def assemble(out: str | Path, debs: dict[str, Path] | None = None, max_side: int = MAX_SIDE,
             skimage_only: bool = False, photos: tuple[Photo, ...] = PHOTOS) -> list[dict[str, Any]]:  # fmt: skip
    """Write the photos and `photos.json` to `out`; return the manifest's entries. `debs` maps package names to
    downloaded .deb files; missing ones are fetched with `apt-get download`."""
    import skimage

    out = Path(out)
    photos = [p for p in photos if p.source == "skimage" or not skimage_only]
    wanted = sorted({p.source for p in photos} - {"skimage"})
    debs = dict(debs or {})
    entries = []
    with tempfile.TemporaryDirectory() as scratch:
        # Packages given are read (and so checked) before any download.
        contents = {name: _read_deb(debs[name]) for name in wanted if name in debs}
        missing = [name for name in wanted if name not in debs]
        if missing:
            debs.update(_download_debs(missing, Path(scratch)))
            contents.update({name: _read_deb(debs[name]) for name in missing})
        for name in wanted:
            copyright_file = contents[name][f"usr/share/doc/{name}/copyright"]
            (out / "licenses").mkdir(parents=True, exist_ok=True)
            (out / "licenses" / f"{name}.copyright").write_bytes(copyright_file)

        skimage_data = Path(skimage.__file__).parent / "data"
        for photo in photos:
            if photo.source == "skimage":
                raw = (skimage_data / photo.path).read_bytes()
                author, licence = SKIMAGE_LICENCES[photo.path]
                version = f"scikit-image {skimage.__version__}"
            else:
                files = contents[photo.source]
                raw = files[photo.path]
                version = f"Debian {photo.source} {_deb_version(debs[photo.source])}"
                if photo.source == "plasma-workspace-wallpapers":
                    author, licence = _plasma_metadata(files, photo.path)
                else:
                    copyright_text = files[f"usr/share/doc/{photo.source}/copyright"].decode()
                    author, licence = _dep5_stanza(copyright_text, photo.path.split("backgrounds/mate/")[1])
            with Image.open(io.BytesIO(raw)) as image:
                original = image.size
                size = _save(image, out / photo.split / f"{photo.name}.png", max_side)
            entries.append(
                {
                    **asdict(photo),
                    "from": version,
                    "author": author,
                    "licence": licence,
                    "original_size": list(original),
                    "size": list(size),
                    "source_sha256": hashlib.sha256(raw).hexdigest(),
                }
            )
    manifest = {"max_side": max_side, "photos": entries}
    (out / "photos.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lssgen.training.photos", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("--out", required=True, help="folder for train/, heldout/, photos.json and licenses/")
    parser.add_argument("--deb", action="append", default=[], help="an already downloaded .deb (repeatable)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="long side of the saved photos, px")
    parser.add_argument("--skimage-only", action="store_true", help="only scikit-image's photos (no network)")
    args = parser.parse_args(argv)
    try:
        debs = {Path(d).name.split("_")[0]: Path(d) for d in args.deb}
        entries = assemble(args.out, debs, args.max_side, args.skimage_only)
    except (ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = {split: sum(e["split"] == split for e in entries) for split in (TRAIN, HELDOUT)}
    print(f"{len(entries)} photos in {args.out}: {counts[TRAIN]} train, {counts[HELDOUT]} held out; see photos.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
