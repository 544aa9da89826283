"""`lssgen methods`: the multi-resolution methods, with their parameters, defaults and sources."""

from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "methods",
        help="list the multi-resolution methods with their parameters and sources",
        description="The methods `--method NAME[:key=value,...]` (and `method=` in Python) chooses from.",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    from lssgen.methods import DEFAULT_METHOD, method_table, resolve_method

    for row in method_table():
        default = " (the default)" if row["name"] == DEFAULT_METHOD else ""
        print(f"{row['name']}{default}: {row['summary']}")
        print(f"  sources: {'; '.join(row['sources'])}")
        print(f"  lssgen options it reads: {', '.join(row['options']) or 'none'}")
        if not row["parameters"]:
            print("  parameters: none")
            continue
        print("  parameters:")
        width = max(len(f"{name}={default}") for name, default, _ in row["parameters"])
        for name, default, help_text in row["parameters"]:
            print(f"    {f'{name}={default}':<{width}}  {help_text}")
        print(f"  e.g. --method {resolve_method(row['name']).spelling()}")
