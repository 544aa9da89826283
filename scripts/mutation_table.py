"""Kill rate per file of the last `mutmut run` (read from mutants/**/*.meta), as the Markdown table in
docs/testing.md. `make mutation` runs both.

A mutant counts as killed when a test failed or timed out on it; "no tests" means no selected test runs its
function. Adapter files are reported for their packing and normalisation functions only (the part issue #25 puts
under mutation testing), the core files whole.

    python scripts/mutation_table.py [--survivors]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

from mutmut.stats import status_by_exit_code

CORE = ["plan", "schedule", "scaling", "controller", "latents", "upsampler"]
# The adapters' latent packing and VAE-space normalisation methods (mutant names: module.xǁClassǁmethod__mutmut_N).
ADAPTER_METHODS = {"pack", "unpack", "latents_to_vae", "vae_to_latents", "_bn_stats", "latent_normalization"}
KILLED = {"killed", "timeout"}


def _function(mutant: str) -> str:
    return re.sub(r"__mutmut_\d+$", "", mutant).split("ǁ")[-1].split(".")[-1].removeprefix("x_")


def results(root: Path = Path("mutants")) -> dict[str, dict[str, str]]:
    """{module: {mutant name: status}} for the files in scope."""
    table: dict[str, dict[str, str]] = {}
    for meta in sorted(root.glob("lssgen/**/*.py.meta")):
        module = ".".join(meta.relative_to(root).with_suffix("").with_suffix("").parts)
        statuses = {
            name: status_by_exit_code[code] for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()
        }
        if module.startswith("lssgen.adapters."):
            statuses = {name: status for name, status in statuses.items() if _function(name) in ADAPTER_METHODS}
        elif module.removeprefix("lssgen.") not in CORE:
            continue
        if statuses:
            table[module] = statuses
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--survivors", action="store_true", help="list every mutant not killed")
    args = parser.parse_args()
    table = results()
    if not table:
        raise SystemExit("no mutmut results under mutants/: run `mutmut run` first (`make mutation` does both)")
    print("| file | mutants | killed | survived | no tests | kill rate |")
    print("|---|---:|---:|---:|---:|---:|")
    for module, statuses in table.items():
        counts = collections.Counter(statuses.values())
        killed = sum(counts[status] for status in KILLED)
        path = module.replace(".", "/") + ".py"
        print(
            f"| `{path}` | {len(statuses)} | {killed} | {counts['survived']} | {counts['no tests']} "
            f"| {100 * killed / len(statuses):.1f}% |"
        )
    if args.survivors:
        for statuses in table.values():
            for name, status in statuses.items():
                if status not in KILLED:
                    print(f"{status}: {name}")


if __name__ == "__main__":
    main()
