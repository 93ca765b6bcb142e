"""The package's import graph, read from the source with `ast`: dependencies run one way (no cycle among swsc_hf
modules, function-local imports included) and no module imports another module's private (underscore) name. And
the public API: the README, docs and examples use only names in `swsc_hf.__all__`, all listed in docs/api.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import swsc_hf

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


# ---- the public API -----------------------------------------------------------------------------------------------
REPO = PACKAGE.parent


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(encoding="utf-8"), flags=re.S)


def swsc_uses(source: str) -> list[str]:
    """Problems with the swsc_hf names a piece of user code uses: submodule imports, names outside `__all__`."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a docs snippet with "..." placeholders: read its import lines only
        tree = ast.parse("\n".join(line for line in source.splitlines() if line.startswith(("import ", "from "))))
        problems = [f"uses swsc_hf.{name}" for name in re.findall(r"\bswsc_hf\.(\w+)", source)
                    if name not in swsc_hf.__all__]
    else:
        problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("swsc_hf"):
            if node.module != "swsc_hf":
                problems.append(f"imports from {node.module}")
            problems += [f"imports {a.name}" for a in node.names if a.name not in swsc_hf.__all__]
        elif isinstance(node, ast.Import):
            problems += [f"imports {a.name}" for a in node.names if a.name.startswith("swsc_hf.")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "swsc_hf":
            if node.attr not in swsc_hf.__all__ and node.attr != "__version__":
                problems.append(f"uses swsc_hf.{node.attr}")
    return problems


def test_readme_docs_and_examples_use_only_the_public_api():
    sources = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in sorted(REPO.glob("examples/*.py"))}
    for markdown in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for index, block in enumerate(python_blocks(markdown)):
            sources[f"{markdown.relative_to(REPO)} block {index}"] = block
    problems = [f"{where}: {problem}" for where, source in sources.items() for problem in swsc_uses(source)]
    assert not problems, "\n".join(problems)
    assert swsc_uses("from swsc_hf.pipeline import x\nswsc_hf.private_thing()") == [
        "imports from swsc_hf.pipeline", "imports x", "uses swsc_hf.private_thing"]


def test_api_doc_lists_every_public_name_once():
    listed = re.findall(r"^- `(\w+)", (REPO / "docs" / "api.md").read_text(encoding="utf-8"), flags=re.M)
    assert sorted(listed) == sorted(swsc_hf.__all__)
    assert all(hasattr(swsc_hf, name) for name in swsc_hf.__all__)
