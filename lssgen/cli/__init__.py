"""The `lssgen` command: generate, adapters, methods, demo, eval-upsampler, train-upsampler, bench, eval-generation
and geneval.

Each command is a module of this package that owns its arguments (`add_parser(commands)`) and its work
(`run(args)`); this module only wires them together. Parsing imports the standard library alone, so `--help` and
argument errors answer at once; a command imports torch and diffusers when it runs.
"""

from __future__ import annotations

import argparse
import sys

from . import adapters, bench, demo, eval_generation, eval_upsampler, generate, geneval, methods, train_upsampler
from .options import Parser, check_inputs, set_threads

# In the order `lssgen --help` lists them.
COMMANDS = (generate, adapters, methods, demo, eval_upsampler, train_upsampler, bench, eval_generation, geneval)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a command's `run` is `args.run` once parsed."""
    parser = Parser(prog="lssgen", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    r"""
    The `lssgen` command. Returns the exit status: 0, or 2 for bad input, reported as one line on stderr
    (`lssgen <command>: error: ...`) with nothing written. Anything else is a bug and keeps its traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    from lssgen.console import quiet_console  # standard library only: filters notices the libraries log on import

    quiet_console()
    try:
        check_inputs(args)
        set_threads(args)
        args.run(args)
    except ValueError as error:
        message = " ".join(str(error).split())  # one line, however a library below worded it
        print(f"lssgen {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = ["build_parser", "main"]
