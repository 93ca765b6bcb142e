"""The package's import graph, read from the source with `ast`: dependencies run one way (no cycle among swsc_hf
modules, function-local imports included) and no module imports another module's private (underscore) name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "swsc_hf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported swsc_hf module, imported name or None, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == "swsc_hf"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "swsc_hf":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from . import lora` imports a module, not a name
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: {target for target, _, _ in imports_of(name, path, modules) if target != name}
            for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    edges = graph()
    assert "swsc_hf.model_ops" in edges["swsc_hf.quantizer"]
    assert "swsc_hf.core.spec" in edges["swsc_hf.config"]


def test_no_import_cycle_among_package_modules():
    edges = graph()
    # the package's __init__ imports the public API from every module; no module may import the package itself
    importers = sorted(name for name, targets in edges.items() if "swsc_hf" in targets and name != "swsc_hf")
    assert not importers, f"these modules import the swsc_hf package (a cycle through __init__): {importers}"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_name():
    modules = package_modules()
    private = [
        f"{module_name(path)}:{line} imports {target}.{imported}"
        for name, path in modules.items()
        for target, imported, line in imports_of(name, path, modules)
        if imported is not None and imported.startswith("_") and target != name
    ]
    assert not private, "\n".join(private)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
