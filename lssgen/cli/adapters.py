"""`lssgen adapters`: the installed adapters and the package providing each."""

from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("adapters", help="list the installed adapters and the package providing each")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    from lssgen.adapters import installed_adapters

    rows = [("adapter", "pipelines", "kind", "steps", "guidance", "shorten", "package")]
    for name, info in sorted(installed_adapters().items()):
        adapter = info.adapter
        rows.append(
            (
                name,
                ", ".join(adapter.pipeline_classes),
                "flow" if adapter.flow else "diffusion",
                str(adapter.default_steps),
                str(adapter.default_guidance),
                "on" if adapter.shorten_intermediate_steps else "off",
                info.package,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
