"""Start-up cost: `lssgen --help` and argument errors answer without importing torch, diffusers or transformers, and
`import lssgen` loads a submodule only when one of its names is used. Checked in fresh interpreters, by what is
imported (not by timing)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers")

# One argument error per command, found by argparse (the checks that need torch run after parsing).
ARGUMENT_ERRORS = {
    "generate": ["--model", "m", "--steps", "0"],
    "adapters": ["--verbose"],
    "methods": ["--verbose"],
    "demo": ["--height", "-64"],
    "eval-upsampler": ["--vae", "v", "--images", "i", "--grid", "-1"],
    "train-upsampler": ["--vae", "v", "--images", "i", "--out", "o", "--batch-size", "0"],
    "bench": ["--repeats", "0"],
    "eval-generation": ["--per-category", "0"],
    "geneval": ["prompts.jsonl", "--model", "m", "--out", "o", "--max-sequence-length", "0"],
}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def main_in_a_fresh_interpreter(argv: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """`lssgen.cli.main(argv)` in a new process; returns the process and {"status", "imported"} it printed last."""
    code = (
        "import json, sys\n"
        "import lssgen.cli\n"
        f"status = lssgen.cli.main({argv!r})\n"
        f"print(json.dumps({{'status': status, 'imported': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    return result, json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("command", [None, *ARGUMENT_ERRORS])
def test_help_imports_no_heavy_library(command):
    result, report = main_in_a_fresh_interpreter([command, "--help"] if command else ["--help"])
    assert report == {"status": 0, "imported": []}
    assert "usage: lssgen" in result.stdout


@pytest.mark.parametrize("command", list(ARGUMENT_ERRORS))
def test_an_argument_error_imports_no_heavy_library(command):
    result, report = main_in_a_fresh_interpreter([command, *ARGUMENT_ERRORS[command]])
    assert report == {"status": 2, "imported": []}
    lines = result.stderr.splitlines()
    # argparse reports an unknown option from the top-level parser (adapters and methods have no options of their own).
    options = command not in ("adapters", "methods")
    prefix = f"lssgen {command}: error: argument " if options else "lssgen: error: unrecognized"
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr


def test_methods_and_a_bad_method_import_no_heavy_library():
    """`lssgen methods` and `--method`'s checks are arithmetic: they answer without torch."""
    result, report = main_in_a_fresh_interpreter(["methods"])
    assert report == {"status": 0, "imported": []} and "refine" in result.stdout
    for method in ("refine:sigma=2", "mrflow"):
        result, report = main_in_a_fresh_interpreter(["generate", "--model", "m", "--method", method])
        assert report == {"status": 2, "imported": []}
        assert result.stderr.startswith("lssgen generate: error: ") and "method" in result.stderr, result.stderr


def test_import_lssgen_loads_no_submodule_until_a_name_is_used():
    code = (
        "import sys, types\n"
        "import lssgen\n"
        "before = sorted(m for m in ('torch', 'diffusers', 'diffusers.hooks', 'lssgen.patch') if m in sys.modules)\n"
        "assert before == [], before\n"
        "assert 'patch' in dir(lssgen) and lssgen.__version__\n"
        "assert isinstance(lssgen.patch, types.FunctionType), lssgen.patch\n"
        "assert lssgen.patch.__module__ == 'lssgen.patch'\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_patch_stays_the_function_after_its_submodule_is_imported():
    # Importing the submodule `lssgen.patch` (as `from lssgen.patch import ...` in any module does) makes Python
    # set the package attribute `patch` to it; lssgen keeps the function there.
    code = (
        "import types\n"
        "import lssgen\n"
        "from lssgen.patch import plan_for\n"
        "import lssgen.pipelines\n"
        "assert isinstance(lssgen.patch, types.FunctionType), lssgen.patch\n"
        "from lssgen import patch\n"
        "assert isinstance(patch, types.FunctionType), patch\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_public_names_resolve_and_match_all():
    import lssgen

    assert sorted(lssgen.__all__) == sorted(lssgen._LAZY_NAMES)
    for name in lssgen.__all__:
        assert getattr(lssgen, name) is getattr(sys.modules[lssgen._LAZY_NAMES[name]], name)
        assert name in dir(lssgen)
    for gone in ("SceneDenoiser", "TinyFlux2Autoencoder", "no_such_name"):  # they live in their tool packages now
        with pytest.raises(AttributeError, match=f"module 'lssgen' has no attribute '{gone}'"):
            getattr(lssgen, gone)


def test_the_commands_copies_of_heavy_constants_agree():
    # The parsers cannot import these modules (torch), so they hold copies.
    from lssgen.cli.eval_generation import EVALUATION_PER_CATEGORY
    from lssgen.cli.options import DTYPE_NAMES
    from lssgen.loading import DTYPES
    from lssgen.scenes import world

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
    assert EVALUATION_PER_CATEGORY == world.EVALUATION_PER_CATEGORY
