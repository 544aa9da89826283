"""The photo assembly script: licences recorded per image, the fixed split, .deb reading (no network)."""

import json
import shutil
import subprocess

import pytest
from PIL import Image

from lssgen.training.photos import HELDOUT, PHOTOS, TRAIN, Photo, assemble, main

pytest.importorskip("skimage")


def test_skimage_photos_are_written_with_licence_and_split(tmp_path):
    assert main(["--out", str(tmp_path), "--skimage-only", "--max-side", "256"]) == 0
    manifest = json.loads((tmp_path / "photos.json").read_text())
    expected = {p.name: p for p in PHOTOS if p.source == "skimage"}
    assert {e["name"] for e in manifest["photos"]} == set(expected)
    for entry in manifest["photos"]:
        assert entry["licence"] and entry["author"] and entry["from"].startswith("scikit-image")
        with Image.open(tmp_path / expected[entry["name"]].split / f"{entry['name']}.png") as image:
            assert image.mode == "RGB" and max(image.size) <= 256 and list(image.size) == entry["size"]
    assert (tmp_path / HELDOUT / "astronaut.png").is_file() and (tmp_path / TRAIN / "chelsea.png").is_file()


def test_the_split_is_fixed_and_disjoint():
    names = [p.name for p in PHOTOS]
    assert len(names) == len(set(names))
    held_out = [p.name for p in PHOTOS if p.split == HELDOUT]
    assert held_out == ["astronaut", "coffee", "ladybird", "storm", "eveningglow", "path"]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a package")
def test_debian_photos_carry_their_copyright_stanza(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: mate-backgrounds\nVersion: 9.9-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    doc = root / "usr/share/doc/mate-backgrounds"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: nature/Aqua.jpg\n       nature/Dune.jpg\nCopyright: 2008, A Photographer <a@b>\nLicense: GPL-2+\n\n"
        "Files: abstract/Silk.png\nCopyright: 2008, Someone Else\nLicense: GPL-2+\n"
    )
    nature = root / "usr/share/backgrounds/mate/nature"
    nature.mkdir(parents=True)
    Image.new("RGB", (640, 400), (10, 120, 200)).save(nature / "Dune.jpg")
    deb = tmp_path / "mate-backgrounds_9.9-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(root), str(deb)], check=True, capture_output=True)

    photo = Photo("dune", "mate-backgrounds", "usr/share/backgrounds/mate/nature/Dune.jpg")
    entries = assemble(tmp_path / "out", {"mate-backgrounds": deb}, max_side=320, photos=(photo,))
    assert entries[0]["author"] == "2008, A Photographer <a@b>" and entries[0]["licence"] == "GPL-2+"
    assert entries[0]["from"] == "Debian mate-backgrounds 9.9-1"
    assert entries[0]["original_size"] == [640, 400] and entries[0]["size"] == [320, 200]
    assert (tmp_path / "out" / "licenses" / "mate-backgrounds.copyright").is_file()


def test_a_file_that_is_not_a_package_is_a_clear_error(tmp_path, capsys):
    fake = tmp_path / "mate-backgrounds_1_all.deb"
    fake.write_bytes(b"hello")
    assert main(["--out", str(tmp_path / "out"), "--deb", str(fake), "--deb", str(fake)]) == 2
    assert "not a Debian package" in capsys.readouterr().err
