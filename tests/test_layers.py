"""The import rules of docs/ARCHITECTURE.md, read from the source (function-level imports included).

Layers, lowest first: ``hashing`` (the science) and ``plugin.core`` (settings, logging, UIDs, header
fields; of hashing only ``hashing.route``, the body-part terms routes compare) know nothing of the
service; ``plugin.store`` speaks Redis; ``plugin.search`` is the query over the
store; ``workers`` run the model against the store; the front layers (``plugin.dicom``,
``plugin.http``, ``plugin.ops``) face the hospital and reach the workers only through
``workers.client``; ``plugin.serve`` and ``plugin.cli`` wire processes; ``plugin.bench`` is off the
runtime path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hashing", "plugin", "workers")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement of the file names (absolute, ours or third-party)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # "from plugin.dicom import status" imports the module plugin.dicom.status
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


GRAPH = _graph()


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# layer of a module -> the prefixes it may import from (its own layer included)
ALLOWED = {
    "hashing": ("hashing",),
    "plugin.core": ("plugin.core", "hashing.route"),
    "plugin.store": ("plugin.store", "plugin.core", "hashing.route"),
    "plugin.search": (
        "plugin.search",
        "plugin.store",
        "plugin.core",
        "hashing.route",
        "hashing.search",
        "hashing.kernels",
        "hashing.bits",
    ),
    "workers.client": ("workers.client", "plugin.store", "plugin.core", "hashing.route"),
    "workers": ("workers", "plugin.store", "plugin.core", "hashing"),
    "plugin.dicom": ("plugin.dicom", "plugin.search", "plugin.store", "plugin.core", "hashing", "workers.client"),
    "plugin.http": (
        "plugin.http",
        "plugin.ops",
        "plugin.dicom",
        "plugin.search",
        "plugin.store",
        "plugin.core",
        "hashing",
        "workers.client",
    ),
    "plugin.ops": (
        "plugin.ops",
        "plugin.dicom",
        "plugin.search",
        "plugin.store",
        "plugin.core",
        "hashing",
        "workers.client",
    ),
}


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if _in(module, layer):
            return layer
    return None


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_module_imports_only_from_the_layers_below_it(module: str) -> None:
    layer = _layer(module)
    if layer is None:  # plugin.serve, plugin.cli (wiring), plugin.bench (off the runtime path)
        return
    bad = sorted(m for m in GRAPH[module] if not _in(m, *ALLOWED[layer]) and m not in ("plugin", "workers"))
    assert not bad, f"{module} ({layer}) imports {bad}"


def test_nothing_at_runtime_imports_the_benchmarks() -> None:
    users = sorted(
        m for m, deps in GRAPH.items() if not _in(m, "plugin.bench") and any(_in(d, "plugin.bench") for d in deps)
    )
    assert not users, users


def test_the_client_module_imports_neither_tasks_nor_torch() -> None:
    path = ROOT / "workers" / "client.py"
    names = _imports(path)
    assert not any(_in(n, "torch", "hashing", "workers.tasks", "workers.app", "workers.model") for n in names), names


def test_there_is_no_import_cycle() -> None:
    """Between modules, counting imports inside functions too (a cycle hidden there is still one)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if dep == node or _is_package_of(dep, node):
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def _is_package_of(package: str, module: str) -> bool:
    """``plugin.store`` for ``plugin.store.codes``: a submodule importing its package's __init__ is
    not a cycle we care about when the __init__ only re-exports."""
    return module.startswith(package + ".")
