"""Every fenced code block of the docs runs, parses or says why not (issue #26).

The blocks are read from README.md, docs/*.md, weights/*/README.md and examples/**/README.md when the tests are
collected, never copied here. By language:

- Python (```python, ```py): executed in a fresh namespace, in a temporary working folder, as `SNIPPETS` declares:
  the names the snippet leaves to the reader (`MODEL_PATH`, `pipe`, `prompt`, ...) get offline stand-ins (tiny
  random-weight pipelines saved with `save_pretrained`, the shipped weights) and values that need a GPU, the hub or
  minutes are replaced in the source text (each replaced text must still be in the snippet, so a table gone stale
  fails too). The scene model's snippets run on the real `weights/scene-t2i` (with taef2's weights).
- Shell (```bash, ```sh): each command line (`\\` continuations joined, comments dropped) is checked by what
  it runs: `lssgen ...` parses with `lssgen.cli.build_parser()` (and the cheap ones in `RUN_FOR_REAL` run);
  `python -m lssgen.X SUB ...` names a module whose `SUB --help` lists every option given; `accelerate launch`
  parses with accelerate's own parser, its `-m lssgen ...` with ours; `make T` names a Makefile target; `pip install`
  names installable folders. `lssgen` lines whose `...` stands for "the options above" are in `ELIDED`.
- JSON and TOML: parsed; those showing a real file (`SHOWN`) must agree with it; entry points name lssgen's group.
- Untagged blocks are printed output: checked against the snippet that prints it (`Snippet.prints`) or in `NOT_RUN`.

A block that none of this covers fails: "new snippet in FILE: run it or list why not".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import shlex
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend on a shared CPU

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lssgen-adapter-pixart"
DOC_FILES = sorted(
    {
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("weights/*/README.md"),
        *ROOT.glob("examples/**/README.md"),
    }
)


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    source: str  # dedented to the fence's indentation

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)


def read_blocks() -> list[Block]:
    blocks = []
    for path in DOC_FILES:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            body = textwrap.dedent(match["body"])
            blocks.append(Block(str(path.relative_to(ROOT)), line, match["lang"].lower(), body))
    return blocks


BLOCKS = read_blocks()


def find(table: dict[tuple[str, str], Any], block: Block) -> Any:
    """The entry of `table` keyed by the block's file and a substring of it (None if there is none)."""
    found = [value for (file, key), value in table.items() if file == block.file and key in block.source]
    assert len(found) <= 1, f"{block}: more than one table entry matches this block"
    return found[0] if found else None


# --- Blocks not run, parsed or checked, and why: (file, a distinctive substring of the block) -> reason ----------
NOT_RUN = {
    ("README.md", "lssgen demo: the scene model trained here"): "output of `lssgen demo` (timings vary by machine)",
    ("README.md", "-> heart-stock.png"): "output of `lssgen generate --baseline` (timings vary by machine)",
    ("docs/geneval.md", "├── run.json"): "a folder layout, not code",
}

# --- `lssgen` lines that only point at other commands, not run and not parsed, and why --------------------------
PLACEHOLDER_LINES = {
    ("README.md", "lssgen train-upsampler ... / lssgen eval-upsampler ..."): "two commands named as a pointer",
}

# `lssgen` lines in which a bare `...` stands for "the other options as in the line above": their `...` are dropped
# and options required by the command are not required (each option given must still exist and take its value).
ELIDED = {
    ("docs/flux2-upsampler.md", "lssgen train-upsampler ... --out flux2-x2-pixel2"): "as the command above",
    ("docs/flux2-upsampler.md", "lssgen train-upsampler ... --out flux2-x2 "): "as the command above",
}

# `lssgen` command lines that run for real (cheap, offline), keyed like the tables: (file, the line's start) -> a word
# their output must hold.
RUN_FOR_REAL = {("README.md", "lssgen adapters"): "flux2", ("README.md", "lssgen methods"): "refine"}


# --- Python snippets: how each runs offline ----------------------------------------------------------------------
@dataclass
class Snippet:
    """How a Python snippet runs: `given` names -> stand-in (a callable of the `Standins`), `replace` (old, new)
    texts in the snippet's source (each old text must occur), `prints`: (file, substring) of the untagged output
    block whose every line the snippet must print, `check(namespace, standins)` after it ran."""

    given: dict[str, Callable[[Standins], Any]] = field(default_factory=dict)
    replace: list[tuple[str, str]] = field(default_factory=list)
    prints: tuple[str, str] | None = None
    check: Callable[[dict, Standins], None] | None = None
    taef2: bool = False  # runs the shipped scene model: needs taef2's weights


SCENE_T2I = str(ROOT / "weights" / "scene-t2i")
ON_CPU = [("torch.bfloat16", "torch.float32"), ('"cuda"', '"cpu"')]


def registers_an_adapter(namespace: dict, standins: Standins) -> None:
    """The snippet's hook implementation is one lssgen's plugin manager accepts and calls."""
    import pluggy

    import lssgen
    from lssgen import hookspecs

    manager = pluggy.PluginManager("lssgen")
    manager.add_hookspecs(hookspecs)
    plugin = type(sys)("doc_snippet_plugin")
    plugin.__dict__.update(namespace)
    manager.register(plugin)  # validates the hook's name and arguments against the spec
    registered = []
    manager.hook.register_adapters(register=registered.append)
    assert len(registered) == 1 and isinstance(registered[0], lssgen.Adapter)


def a_pil_image(name: str) -> Callable[[dict, Standins], None]:
    def check(namespace: dict, standins: Standins) -> None:
        from PIL import Image

        assert isinstance(namespace[name], Image.Image)

    return check


SNIPPETS = {
    ("README.md", "pipe = FluxPipeline.from_pretrained(MODEL_PATH"): Snippet(
        given={
            "MODEL_PATH": lambda s: s.tiny_flux_dir,
            "UPSAMPLER_PATH": lambda s: s.tiny_upsampler_dir,
            "prompt": lambda s: "a red fox in the snow",
        },
        replace=[
            *ON_CPU,
            ("height=1024, width=1024, num_inference_steps=50", "height=128, width=128, num_inference_steps=4"),
            ("min_resolution=512)", "min_resolution=64, max_sequence_length=32)"),
        ],
        check=a_pil_image("image"),
    ),
    ("README.md", "lssgen.hires_fix(pipe, image, prompt"): Snippet(
        given={
            "lssgen": lambda s: importlib.import_module("lssgen"),
            "pipe": lambda s: s.patched_tiny_flux(),
            "image": lambda s: s.scene_image(0).resize((128, 128)),
            "prompt": lambda s: s.scene_caption(0),
        },
        replace=[("height=2048, width=2048,", "height=256, width=256, num_inference_steps=4, max_sequence_length=32,")],
        check=lambda ns, s: _enlarged_with_an_img2img_pipe(ns, (256, 256)),
    ),
    ("docs/caches.md", "sea_cache_config(pipe, threshold=0.25)"): Snippet(
        given={"pipe": lambda s: s.tiny_flux(), "upsampler": lambda s: s.tiny_upsampler()},
        replace=[
            ("lssgen.patch(pipe, upsampler)", "lssgen.patch(pipe, upsampler, min_resolution=64)"),
            ("height=1024, width=1024)", "height=128, width=128, num_inference_steps=4, max_sequence_length=32)"),
        ],
        check=a_pil_image("image"),
    ),
    ("docs/flux2-upsampler.md", 'weights_path("flux2-x2")'): Snippet(
        given={"pipe": lambda s: s.tiny_flux2(klein=True)},
        check=lambda ns, s: _patched_with(ns["pipe"], ns["upsampler"]),
    ),
    ("docs/model-folders.md", 'lssgen.load_pipeline("weights/scene-t2i")'): Snippet(
        replace=[
            ('"weights/scene-t2i"', repr(SCENE_T2I)),
            ("**defaults.call_arguments())", '**{**defaults.call_arguments(), "num_inference_steps": 4})'),
        ],
        check=lambda ns, s: _printed(s, "scaling between stages: learned upsampler") and a_pil_image("image")(ns, s),
        taef2=True,
    ),
    ("docs/how-it-works.md", 'lssgen.patch(pipe, method="refine")'): Snippet(
        # The tiny FLUX.1 pipeline has FLUX.1-dev's scheduler config: the plan is the real model's.
        given={"pipe": lambda s: s.tiny_flux()},
        prints=("docs/how-it-works.md", "method: refine:sigma=0.12,steps=1"),
    ),
    ("docs/how-it-works.md", 'lssgen.patch(pipe, method="spectral:delta=0.05")'): Snippet(
        given={"lssgen": lambda s: importlib.import_module("lssgen"), "pipe": lambda s: s.tiny_flux()},
        prints=("docs/how-it-works.md", "method: spectral:delta=0.05,halvings=1"),
    ),
    ("docs/model-folders.md", "print(lssgen.plan_for(pipe).describe())"): Snippet(
        given={"lssgen": lambda s: importlib.import_module("lssgen"), "pipe": lambda s: s.tiny_flux2()},
        prints=("docs/model-folders.md", "denoiser steps in all:"),
    ),
    ("docs/plugins.md", "register(MyAdapter())"): Snippet(
        given={
            "lssgen": lambda s: importlib.import_module("lssgen"),
            "MyAdapter": lambda s: s.pixart().PixArtSigmaAdapter,
        },
        check=registers_an_adapter,
    ),
    ("docs/scene-model.md", "sample_scene(seed=0, index=4)"): Snippet(
        # the comment's value is the caption: the snippet prints it
        replace=[("scene.caption ", "print(scene.caption)")],
        check=lambda ns, s: _printed(s, "a photo of a star below a crescent") and Path("scene.png").is_file(),
    ),
    ("docs/scene-model.md", "SceneScorer.from_pretrained"): Snippet(
        given={
            "images": lambda s: [s.scene_image(0), s.scene_image(1)],
            "captions": lambda s: [s.scene_caption(0), s.scene_caption(1)],
        },
        check=lambda ns, s: len(ns["results"]) == 2,
    ),
    ("weights/scene-t2i/README.md", 'lssgen.load_pipeline("weights/scene-t2i")'): Snippet(
        replace=[
            ('"weights/scene-t2i"', repr(SCENE_T2I)),
            ("**defaults)", '**{**defaults, "num_inference_steps": 4})'),
        ],
        check=a_pil_image("fast"),
        taef2=True,
    ),
    ("examples/lssgen-adapter-pixart/README.md", "PixArtSigmaPipeline.from_pretrained"): Snippet(
        # the adapter as `pip install` makes it found: registered in this process
        given={"_adapter": lambda s: s.pixart_registered()},
        replace=[
            ('"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"', "PIXART_PATH"),
            (
                "height=1024, width=1024, start_sigma=0.75)",
                "height=256, width=256, start_sigma=0.75, min_resolution=128, num_inference_steps=4, "
                "max_sequence_length=32, clean_caption=False)",
            ),
        ],
        check=a_pil_image("image"),
    ),
    ("examples/lssgen-adapter-pixart/README.md", "register(PixArtSigmaAdapter())"): Snippet(
        given={
            "lssgen": lambda s: importlib.import_module("lssgen"),
            "PixArtSigmaAdapter": lambda s: s.pixart().PixArtSigmaAdapter,
        },
        check=registers_an_adapter,
    ),
}

# JSON/TOML blocks that show a real file of the repository: the block must agree with it.
SHOWN = {
    ("docs/model-folders.md", '"upsampler": "flux2-x2"'): "weights/scene-t2i/lssgen.json",
    ("examples/lssgen-adapter-pixart/README.md", 'pixart = "lssgen_adapter_pixart"'): (
        "examples/lssgen-adapter-pixart/pyproject.toml"
    ),
}


def _enlarged_with_an_img2img_pipe(namespace: dict, size: tuple[int, int]) -> None:
    from diffusers import FluxImg2ImgPipeline

    import lssgen

    a_pil_image("large")(namespace, None)
    assert namespace["large"].size == size
    img2img = namespace["img2img"]
    assert isinstance(img2img, FluxImg2ImgPipeline) and lssgen.is_patched(img2img)
    assert img2img.transformer is namespace["pipe"].transformer  # the same modules, nothing copied


def _patched_with(pipe, upsampler) -> None:
    import lssgen

    assert "scaling between stages: learned upsampler" in lssgen.plan_for(pipe).describe()
    assert lssgen.find_adapter(pipe).name == "flux2" and upsampler.config.in_channels == 32


def _printed(standins: Standins, text: str) -> bool:
    assert text in standins.stdout.getvalue(), f"the snippet did not print {text!r}"
    return True


class Standins:
    """What the snippets leave to the reader, built on demand (the tiny models, the example's adapter)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        self.request, self.tmp_path = request, tmp_path
        self.stdout = io.StringIO()
        self.cleanups: list[Callable[[], None]] = []

    @property
    def tiny_flux_dir(self) -> str:
        return str(self.request.getfixturevalue("tiny_flux_dir"))

    @property
    def tiny_upsampler_dir(self) -> str:
        return str(self.request.getfixturevalue("tiny_upsampler_dir"))

    def tiny_flux(self):
        from lssgen.tiny import build_tiny_flux_pipeline

        pipe = build_tiny_flux_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def patched_tiny_flux(self):
        import lssgen

        pipe = self.tiny_flux()
        lssgen.patch(pipe, self.tiny_upsampler(), min_resolution=64)
        return pipe

    def tiny_upsampler(self):
        from lssgen import LatentUpsampler

        return LatentUpsampler.from_pretrained(self.tiny_upsampler_dir)

    def tiny_flux2(self, klein: bool = False):
        from lssgen.tiny import build_tiny_flux2_pipeline

        return build_tiny_flux2_pipeline(seed=0, klein=klein)

    def scene(self, index: int):
        from lssgen.scenes import sample_scene

        return sample_scene(seed=0, index=index)

    def scene_image(self, index: int):
        from lssgen.scenes import render

        return render(self.scene(index), 256)

    def scene_caption(self, index: int) -> str:
        return self.scene(index).caption

    def pixart(self):
        """The example's plugin module, imported from its folder (as an installed copy would be)."""
        sys.path.insert(0, str(EXAMPLE))
        self.cleanups.append(lambda: (sys.path.remove(str(EXAMPLE)), sys.modules.pop("lssgen_adapter_pixart", None)))
        return importlib.import_module("lssgen_adapter_pixart")

    def pixart_registered(self):
        from tiny_pixart import build_tiny_pixart_sigma_pipeline

        import lssgen

        folder = self.tmp_path / "tiny-pixart"
        build_tiny_pixart_sigma_pipeline().save_pretrained(folder)
        self.namespace["PIXART_PATH"] = str(folder)
        if "pixart" in lssgen.installed_adapters():  # installed in this environment: its entry point finds it
            return None
        adapter = lssgen.register_adapter(self.pixart().PixArtSigmaAdapter())
        self.cleanups.append(lambda: lssgen.unregister_adapter(adapter.name))
        return adapter


def blocks_of(*langs: str) -> list[Block]:
    return [block for block in BLOCKS if block.lang in langs]


def ids(blocks: list[Block]) -> list[str]:
    return [str(block) for block in blocks]


PYTHON_BLOCKS = blocks_of("python", "py")
SHELL_BLOCKS = blocks_of("bash", "sh", "shell", "console")
DATA_BLOCKS = blocks_of("json", "toml")
KNOWN_LANGS = {"python", "py", "bash", "sh", "shell", "console", "json", "toml", ""}


def new_snippet(block: Block) -> str:
    return f"new snippet in {block.file} (line {block.line}): run it or list why not (tests/test_docs.py)"


# --- The tests -----------------------------------------------------------------------------------------------------


def test_the_docs_have_blocks_of_every_kind():
    assert len(PYTHON_BLOCKS) >= 8 and len(SHELL_BLOCKS) >= 10 and DATA_BLOCKS
    unknown = [f"{block} ({block.lang})" for block in BLOCKS if block.lang not in KNOWN_LANGS]
    assert not unknown, f"blocks in a language this test does not check: {unknown}; check them or list why not"


@pytest.mark.parametrize(
    "table",
    [NOT_RUN, PLACEHOLDER_LINES, ELIDED, SNIPPETS, SHOWN, RUN_FOR_REAL],
    ids=["NOT_RUN", "PLACEHOLDER_LINES", "ELIDED", "SNIPPETS", "SHOWN", "RUN_FOR_REAL"],
)
def test_every_table_entry_still_names_a_block(table):
    stale = [key for key in table if not any(block.file == key[0] and key[1] in block.source for block in BLOCKS)]
    assert not stale, f"table entries whose block is gone or changed (update the key or drop it): {stale}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=ids(PYTHON_BLOCKS))
def test_python_snippet_runs(block, request, tmp_path, monkeypatch):
    if reason := find(NOT_RUN, block):
        pytest.skip(f"not run: {reason}")
    snippet = find(SNIPPETS, block)
    assert snippet is not None, new_snippet(block)
    if snippet.taef2:
        request.getfixturevalue("taef2_dir")
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a snippet that reaches for the hub fails at once, offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    source = block.source
    for old, new in snippet.replace:
        assert old in source, f"{block}: the table replaces {old!r}, which the snippet no longer has"
        source = source.replace(old, new)
    standins = Standins(request, tmp_path)
    namespace: dict[str, Any] = {"__name__": "__doc_snippet__"}
    standins.namespace = namespace
    try:
        for name, make in snippet.given.items():
            namespace[name] = make(standins)
        with contextlib.redirect_stdout(standins.stdout):
            exec(compile(source, str(block), "exec"), namespace)
        printed = standins.stdout.getvalue()
        if snippet.prints:
            output = next(
                b for b in BLOCKS if b.lang == "" and b.file == snippet.prints[0] and snippet.prints[1] in b.source
            )
            missing = [line for line in output.source.splitlines() if line.strip() and line.strip() not in printed]
            assert not missing, f"{output} shows lines that {block} does not print: {missing}\nit printed:\n{printed}"
        if snippet.check:
            assert snippet.check(namespace, standins) is not False, f"{block}: the check after running it failed"
    finally:
        for cleanup in reversed(standins.cleanups):
            cleanup()


OUTPUT_BLOCKS = blocks_of("")


@pytest.mark.parametrize("block", OUTPUT_BLOCKS, ids=ids(OUTPUT_BLOCKS))
def test_output_is_checked_or_listed(block):
    printers = [key for key, snippet in SNIPPETS.items() if snippet.prints and snippet.prints[0] == block.file]
    if any(snippet.prints[1] in block.source for snippet in (SNIPPETS[key] for key in printers)):
        return  # compared with what its snippet prints, in test_python_snippet_runs
    assert find(NOT_RUN, block), new_snippet(block)


@pytest.mark.parametrize("block", DATA_BLOCKS, ids=ids(DATA_BLOCKS))
def test_data_block_parses_and_agrees(block):
    from lssgen.plugins import ENTRY_POINT_GROUP

    shown = find(SHOWN, block)
    if block.lang == "json":
        data = json.loads(block.source)
        if shown:
            assert data == json.loads((ROOT / shown).read_text()), f"{block} differs from {shown}"
        return
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib")
    data = tomllib.loads(block.source)
    entry_points = data.get("project", {}).get("entry-points", {})
    assert ENTRY_POINT_GROUP in entry_points, f"{block}: lssgen loads plugins from [project.entry-points.lssgen]"
    if shown:
        real = tomllib.loads((ROOT / shown).read_text())
        for group, names in entry_points.items():
            assert real["project"]["entry-points"][group] == names, f"{block} differs from {shown}"


# --- Shell blocks --------------------------------------------------------------------------------------------------


def command_lines(source: str) -> list[str]:
    """The block's command lines: `\\` continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n[ \t]*", " ", source)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def exact(parser: argparse.ArgumentParser, *, elided: bool) -> argparse.ArgumentParser:
    """`parser`, in every subcommand, taking only whole option names (the docs must spell them out: argparse would
    take a prefix of a renamed option); with `elided`, no option is required (the line's `...` stands for them)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                exact(sub, elided=elided)
        elif action.option_strings and elided:
            action.required = False
    return parser


def parse_lssgen(argv: list[str], where: str, *, elided: bool = False) -> argparse.Namespace:
    from lssgen.cli import build_parser

    if elided:  # a `...` after an option that takes a value is that value; any other `...` is the elision
        argv = [arg for i, arg in enumerate(argv) if arg != "..." or (i and argv[i - 1].startswith("--"))]
    parser = exact(build_parser(), elided=elided)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `lssgen {shlex.join(argv)}` does not parse: {errors.getvalue().strip()}", pytrace=False)
    return args


def check_weights_folders(argv: list[str], where: str, made: set[str]) -> None:
    """A `weights/...` folder a command reads is in the repository, unless an earlier command of the block made it
    (its `--out`); record this command's `--out`."""
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--out":
            made.add(arg)
        elif arg.startswith("weights/") and arg not in made:
            assert (ROOT / arg).is_dir(), f"{where}: {arg} is not in the repository"


def module_help(module: str, subcommands: list[str]) -> str:
    """What `python -m MODULE SUB... --help` prints, from its own `main`."""
    main = importlib.import_module(module).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*subcommands, "--help"])
    return out.getvalue()


def check_python_m(argv: list[str], where: str) -> None:
    """`python -m MODULE ...`: lssgen's own command, or a module whose parser lists every option given."""
    assert "-m" in argv, f"{where}: a python command that is not `python -m MODULE`: {shlex.join(argv)}"
    module, args = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2 :]
    if module == "lssgen":
        parse_lssgen(args, where, elided="..." in args)
        return
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    subcommands = []
    for arg in args:
        if arg.startswith("-"):
            break
        if arg != "...":
            subcommands.append(arg)
    help_text = module_help(module, subcommands)
    for option in (arg.split("=")[0] for arg in args if arg.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text), (
            f"{where}: `python -m {module} {' '.join(subcommands)}` has no option {option}:\n{help_text}"
        )


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=ids(SHELL_BLOCKS))
def test_shell_commands_parse(block, capsys):
    if reason := find(NOT_RUN, block):
        pytest.skip(f"not run: {reason}")
    lines = command_lines(block.source)
    assert lines, f"{block}: no command in it"
    made: set[str] = set()  # the --out folders of the block's earlier commands
    to_run = {key: word for (file, key), word in RUN_FOR_REAL.items() if file == block.file and key in block.source}
    for line in lines:
        where = f"{block} `{line[:60]}`"
        if any(file == block.file and line.startswith(key) for file, key in PLACEHOLDER_LINES):
            continue
        argv = shlex.split(line, comments=True)
        command = argv[0]
        check_weights_folders(argv, where, made)
        if command == "lssgen":
            elided = any(file == block.file and line.startswith(key) for file, key in ELIDED)
            parse_lssgen(argv[1:], where, elided=elided)
            if shlex.join(argv) in to_run:
                from lssgen.cli import main

                word = to_run.pop(shlex.join(argv))
                assert main(argv[1:]) == 0, f"{where}: failed"
                assert word in capsys.readouterr().out
        elif Path(command).name in ("python", "python3"):
            check_python_m(argv, where)
        elif argv[:2] == ["accelerate", "launch"]:
            from accelerate.commands.launch import launch_command_parser

            launch = launch_command_parser().parse_args(argv[2:])
            assert launch.module, f"{where}: expected `accelerate launch ... -m lssgen ...`"
            check_python_m(["python", "-m", launch.training_script, *launch.training_script_args], where)
        elif command == "make":
            missing = set(argv[1:]) - makefile_targets()
            assert not missing, f"{where}: no Makefile target {missing}"
        elif argv[:2] == ["pip", "install"]:
            folders = [arg for arg in argv[2:] if not arg.startswith("-")]
            for folder in folders:  # run from the repository root, as the docs say
                assert (ROOT / folder / "pyproject.toml").is_file(), f"{where}: {folder} is not an installable project"
        else:
            pytest.fail(f"{where}: a command this test does not know; check it here or list why not", pytrace=False)
    assert not to_run, f"{block}: RUN_FOR_REAL names {to_run}, which is no whole command line of the block"
