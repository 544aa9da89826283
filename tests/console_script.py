"""The `lssgen` command the command-line tests run: the console script installed beside this interpreter (the
environment under test), else `python -m lssgen` with this interpreter. Never the first `lssgen` on PATH, which
may belong to another checkout or environment."""

from __future__ import annotations

import sys
from pathlib import Path

_BESIDE = Path(sys.executable).with_name("lssgen.exe" if sys.platform == "win32" else "lssgen")
LSSGEN: list[str] = [str(_BESIDE)] if _BESIDE.is_file() else [sys.executable, "-m", "lssgen"]
