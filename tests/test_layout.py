"""The package's layout: the runtime core imports no tool, tools import only what sits below them, no circles.

Read from the source (every `import`, at the top of a module or inside a function), so an import that only runs on
some path counts as much as one that runs at start-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lssgen"

# The tools around the runtime core, lowest first: each may import the core and the tools before it, never one
# after it. autoencoders are model components (the scene model's folder names one); training reads images and VAE
# latents (`training.data`, which evaluation and the scene scorer reuse); scenes build on those; evaluation
# measures everything below it; the command line drives them all.
TOOLS = ("autoencoders", "training", "scenes", "evaluation", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, *, runtime_only: bool = False) -> set[str]:
    """The lssgen modules `name` imports (a `from package import submodule` counts as the submodule)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if runtime_only and _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in MODULES)
    found.discard(name)
    return found


def layer(name: str) -> str:
    """`core` (lssgen's own modules, adapters, tiny builders, shipped weights) or the tool folder's name."""
    if name == "lssgen.__main__":  # `python -m lssgen` is the command line
        return "cli"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in TOOLS else "core"


def test_the_layout_is_the_one_described():
    # The modules this test judges exist where the README and DESIGN say (a move that breaks them fails here).
    for name in ("lssgen.patch", "lssgen.controller", "lssgen.plan", "lssgen.schedule", "lssgen.scaling"):
        assert name in MODULES
    for tool in TOOLS:
        assert f"lssgen.{tool}" in MODULES, f"lssgen/{tool}/__init__.py is missing"


@pytest.mark.parametrize("name", [name for name in MODULES if layer(name) == "core"])
def test_the_core_imports_no_tool(name):
    tools = sorted(target for target in imports_of(name) if layer(target) != "core")
    assert not tools, f"{name} (the runtime core) imports {tools}: the core must not depend on the tools above it"


@pytest.mark.parametrize("name", [name for name in MODULES if layer(name) != "core"])
def test_tools_import_only_what_sits_below_them(name):
    rank = TOOLS.index(layer(name))
    above = sorted(
        target for target in imports_of(name) if layer(target) != "core" and TOOLS.index(layer(target)) > rank
    )
    assert not above, f"{name} imports {above}, which sit above lssgen.{layer(name)} ({' < '.join(TOOLS)})"


def test_adapters_do_not_import_the_test_builders():
    offenders = {
        name: sorted(t for t in imports_of(name) if t.startswith("lssgen.tiny"))
        for name in MODULES
        if name.startswith("lssgen.adapters")
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_no_import_circles():
    graph = {name: imports_of(name, runtime_only=True) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert not circles, f"modules that import each other in a circle: {circles}"
