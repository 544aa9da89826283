"""`lssgen.outputs`: output paths checked by a real write before any slow work."""

from pathlib import Path

import pytest

from lssgen.outputs import check_writable

PROC = Path("/proc")


def test_a_writable_folder_passes_and_keeps_no_probe(tmp_path):
    assert check_writable(tmp_path / "new" / "image.png", "--out", image=True) == tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (PROC / "self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_whose_permission_bits_say_writable_but_refuses_files():
    # As root, os.access() says /proc is writable; creating a file there fails. Only a real write tells.
    with pytest.raises(ValueError, match=r"--out /proc/nope/x.png: cannot write in /proc"):
        check_writable("/proc/nope/x.png", "--out", image=True)
