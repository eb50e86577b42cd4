"""The package's levels, read from its own import statements: the model file imports nothing of mfakit, the shared
base imports no stage, the stages (convert, finetune, eval) import no other stage, nothing in the library imports
the command line or the benchmark scripts, and no module imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mfakit"
STAGES = ("convert", "finetune", "eval")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every mfakit module and the mfakit modules it imports (at any depth in the file); `from package import
    module` counts as importing that module."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("mfakit")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfakit"):
                submodules = {f"{node.module}.{a.name}" for a in node.names} & paths.keys()
                found |= submodules or {node.module}
        graph[name] = found
    return graph


def level(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == "model":
        return "model"
    if parts[1] in STAGES:
        return parts[1]
    if parts[1] == "cli":
        return "cli"
    return "base"


def test_levels_import_only_downwards():
    allowed = {
        "model": {"model"},
        "base": {"model", "base"},
        "root": {"model", "base"},
        **{stage: {"model", "base", stage} for stage in STAGES},
        "cli": {"model", "base", *STAGES, "cli"},
    }
    wrong = [
        (module, target)
        for module, targets in imports().items()
        for target in targets
        if level(target) not in allowed[level(module)]
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = imports()
    # A package's __init__ importing its own modules is how packages export; a cycle through it is still a cycle.
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*trail, module, target])}")
            if target not in state:
                visit(target, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_modeling_file_is_self_contained():
    tree = ast.parse((PACKAGE / "model" / "modeling_mfa.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"torch", "transformers", "typing", "sys", "types", "__future__"}, roots
