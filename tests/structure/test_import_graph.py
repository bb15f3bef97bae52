"""The layout as the import graph shows it (ARCHITECTURE.md): no import cycle, no lower layer
importing a higher one, and validation importing neither torch nor the simulation layer.

The graph is read from the source (every ``import`` statement, those inside functions too,
except under ``if TYPE_CHECKING:``), so a lazy import that would close a cycle is caught as
well. An algorithm plug-in is loaded through the registry's entry points, not imported by
name, and adds no edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedsim

SRC = Path(fedsim.__file__).parent

LAYERS = [
    ("package", ["fedsim.__root__", "fedsim.notices"]),
    ("libraries", ["fedsim.losses", "fedsim.quant", "fedsim.data", "fedsim.models", "fedsim.params", "fedsim.records",
                   "fedsim.bounded_store", "fedsim.seeding", "fedsim.topology", "fedsim.attacks", "fedsim.secagg",
                   "fedsim.privacy.accounting", "fedsim.privacy.mechanisms", "fedsim.privacy.noise",
                   "fedsim.privacy.audit", "fedsim.privacy.ghost_clipping"]),
    ("validation", ["fedsim.sections", "fedsim.config", "fedsim.config_checks", "fedsim.algorithms.api",
                    "fedsim.algorithms.registry", "fedsim.privacy.settings", "fedsim.privacy.sampling"]),
    ("clients", ["fedsim.clients", "fedsim.privacy.dp_sgd"]),
    ("server", ["fedsim.strategies", "fedsim.privacy.server"]),
    ("algorithms", ["fedsim.algorithms", "fedsim.flower", "fedsim.privacy"]),
    ("outputs", ["fedsim.outputs"]),
    ("simulation", ["fedsim.sim"]),
    ("loops", ["fedsim.loops"]),
    ("applications", ["fedsim.runner", "fedsim.cli", "fedsim.bench", "fedsim.deploy", "fedsim.loopback", "fedsim.supernode",
                      "fedsim.clientapp_process", "fedsim.preflight", "fedsim.credentials", "fedsim."]),
]
"""Layers from the bottom up, each a list of modules: a name is that module and the modules
under it, a name ending in "." the modules under it only (the first match wins, in the order
the layers are listed); a module may import its own layer and the ones below."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.Module, module: str, top_level_only: bool = False) -> set[str]:
    """The modules ``module`` imports (absolute names; ``from a import b`` counts ``a.b``
    when ``a.b`` is a module of fedsim, else ``a``)."""
    found: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level] if not MODULES.get(module, {}).get("package") else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        inside = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        if top_level_only and inside:
            return
        for child in ast.iter_child_nodes(node):
            visit(child, depth + inside)

    visit(tree, 0)
    return found


MODULES = {_module_name(p): {"path": p, "package": p.name == "__init__.py"} for p in SRC.rglob("*.py")}
TREES = {name: ast.parse(info["path"].read_text()) for name, info in MODULES.items()}
GRAPH = {name: {m for m in _imports(tree, name) if m in MODULES and m != name} for name, tree in TREES.items()}


def layer_of(module: str) -> int:
    for rank, (_, names) in enumerate(LAYERS):
        if any(module.startswith(n) if n.endswith(".") else module == n or module.startswith(n + ".") for n in names):
            return rank
    return layer_of("fedsim.__root__") if module == "fedsim" else _no_layer(module)


def _no_layer(module: str) -> int:
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_lower_layer_imports_a_higher_one():
    upward = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                    for a, targets in GRAPH.items() for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_validation_imports_neither_torch_nor_the_simulation_layer():
    validation = [m for m in MODULES if LAYERS[layer_of(m)][0] == "validation"]
    for module in validation:
        top = _imports(TREES[module], module, top_level_only=True)
        assert not {m for m in top if m == "torch" or m.startswith("torch.")}, module
        assert not {m for m in _imports(TREES[module], module) if m.startswith("fedsim.sim")}, module
    code = ("import sys, fedsim.config, fedsim.config_checks, fedsim.algorithms.registry; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fedsim.sim')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
