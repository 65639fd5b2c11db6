"""The package's shape: no import cycle (function-local imports included), no function-local
import without a comment saying why (saving a heavy or optional import at start-up), no
module reaching into another's private names, and the catalog importable without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ecoflap"
# modules whose function-local imports are their design, said in their docstring or header:
# the CLI imports each stage's code only when that stage runs (allocate and aggregate never load torch)
DISPATCHERS = {"ecoflap.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]):
    """(imported ecoflap module, line, function-local?) for every import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            yield name, node.lineno, id(node) in local


def test_no_import_cycle():
    modules = _modules()
    graph = {m: sorted({n for n, _, _ in _imports(p, modules) if n in modules and n != m}) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_function_local_imports_say_why():
    modules = _modules()
    unexplained = []
    for name, path in sorted(modules.items()):
        if name in DISPATCHERS:
            continue
        lines = path.read_text().splitlines()
        for _mod, lineno, local in _imports(path, modules):
            # a comment on the import's line, or on the nearest line above that is not an import
            # (one comment for a group of imports; a `try:  # why` counts)
            above = lineno - 2
            while above > 0 and lines[above].strip().startswith(("import ", "from ")) and "#" not in lines[above]:
                above -= 1
            if local and "#" not in lines[lineno - 1] and "#" not in lines[above]:
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {lines[lineno - 1].strip()}")
    assert not unexplained, "function-local imports without a comment saying what they save:\n" + "\n".join(
        sorted(set(unexplained)))


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ecoflap"):
                offenders += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_catalog_and_config_check_import_without_torch():
    """The config is validated before any job is planned: no torch, no transformers."""
    code = ("import sys; import ecoflap.catalog, ecoflap.config, ecoflap.allocation.plan; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# lower layers never import higher ones: data readers know no model, the model layer knows no
# method, the catalog and the utilities know no other room (they are imported by all)
LAYERS = {
    "ecoflap.catalog": ("ecoflap",),
    "ecoflap.utils": ("ecoflap.models", "ecoflap.data", "ecoflap.blocks", "ecoflap.scoring", "ecoflap.allocation",
                      "ecoflap.pruning", "ecoflap.evaluation", "ecoflap.reporting", "ecoflap.cli", "ecoflap.config"),
    "ecoflap.data": ("ecoflap.models", "ecoflap.blocks", "ecoflap.scoring", "ecoflap.allocation", "ecoflap.pruning",
                     "ecoflap.evaluation", "ecoflap.reporting", "ecoflap.cli"),
    "ecoflap.models": ("ecoflap.blocks", "ecoflap.scoring", "ecoflap.allocation", "ecoflap.pruning",
                       "ecoflap.evaluation", "ecoflap.reporting", "ecoflap.cli"),
    "ecoflap.allocation": ("ecoflap.models", "ecoflap.data", "ecoflap.blocks", "ecoflap.scoring", "ecoflap.pruning",
                           "ecoflap.evaluation", "ecoflap.cli"),
}


def test_lower_layers_do_not_import_higher_ones():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for room, forbidden in LAYERS.items():
            if name == room or name.startswith(room + "."):
                offenders += [f"{name} imports {n}" for n, _, _ in _imports(path, modules)
                              if n.startswith(forbidden) and not (n == room or n.startswith(room + "."))]
    assert not offenders, offenders
