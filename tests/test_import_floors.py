"""Imports run down the floors of the package (README "Architecture"), never up, and no module imports
another module's private (underscore) name. Every module under src/vlmprune is parsed with `ast`,
imports inside functions included, so an import hidden in a function to dodge a cycle is caught too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlmprune"

# The floor map: a module's floor is that of the longest key that is the module or a package above it
# ("vlmprune" itself, the package's front door, matches only its own __init__). A module may import
# from its own floor or lower ones.
FLOORS = {
    # 0: foundations, no knowledge of models
    "vlmprune.errors": 0,
    "vlmprune.files": 0,
    "vlmprune.memory": 0,
    "vlmprune.registry": 0,  # the one registry mechanism (methods, families, weight kernels)  # peak memory growth while a function runs
    "vlmprune.training": 0,  # the resumable training loop both trainers use
    "vlmprune.validate": 0,  # the scalar checks every floor shares
    # 1: model families
    "vlmprune.models": 1,
    "vlmprune.processors": 1,
    # 2: data (every dataset; FashionScenes and the testbed recipe and trainer)
    "vlmprune.data": 2,
    "vlmprune.testbed": 2,
    # 3: the engine, and the counts and prices of what it runs
    "vlmprune.engine": 3,
    "vlmprune.counts": 3,
    "vlmprune.testbed.decisions": 3,  # random drops and oracles as Plans
    # 4: methods and weight pruning
    "vlmprune.methods": 4,
    "vlmprune.weights": 4,
    # 5: the wrapped model and what builds its decisions
    "vlmprune.pruned_model": 5,
    "vlmprune.loading": 5,
    "vlmprune.prompting": 5,
    "vlmprune.decisions": 5,
    # 6: measurement
    "vlmprune.eval": 6,
    # 7: commands and integrations
    "vlmprune.cli": 7,
    "vlmprune.recipes": 7,  # YAML recipes as command lines
    "vlmprune.demo": 7,
    "vlmprune.integrations": 7,
    "vlmprune": 7,
}

# Edges that still run up a floor or import a private name, each with its reason; an entry that no
# longer occurs fails the test, so the list only shrinks. (importer, imported module, name)
KNOWN = {
    ("vlmprune.weights.checkpoints", "vlmprune.loading", "load"):
        "load_for_pruning opens a supported VLM through vlmprune.load; it belongs beside loading (issue 20 weights)",
    ("vlmprune.weights.checkpoints", "vlmprune.loading", "load_options"): "as load",
    ("vlmprune.weights.checkpoints", "vlmprune.loading", "_resolve"): "as load, and private",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def floor(name: str) -> int:
    keys = [k for k in FLOORS if name == k or (k != "vlmprune" and name.startswith(k + "."))]
    if not keys:
        raise KeyError(f"{name} has no floor: add it to FLOORS here and to the README's architecture section")
    return FLOORS[max(keys, key=len)]


def imports(source: str, name: str, is_package: bool = False) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of vlmprune in module `name`'s
    `source`, at any depth; a name that is a submodule (``from ..testbed import data``) is that module."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "vlmprune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "vlmprune":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None, node.lineno) if is_module(sub) else (target, alias.name, node.lineno))
    return out


def edges() -> list[tuple[str, str, str | None, int]]:
    return [
        (module_name(p), target, name, line)
        for p in sorted(PACKAGE.rglob("*.py"))
        for target, name, line in imports(p.read_text(), module_name(p), p.name == "__init__.py")
    ]


def test_every_module_has_a_floor():
    for path in PACKAGE.rglob("*.py"):
        floor(module_name(path))


def test_no_import_runs_up_a_floor_or_takes_a_private_name():
    found, problems = set(), []
    for importer, target, name, line in edges():
        upward = floor(target) > floor(importer)
        private = name is not None and name.startswith("_") and target != importer
        if not (upward or private):
            continue
        key = (importer, target, name)
        if key in KNOWN:
            found.add(key)
            continue
        why = f"floor {floor(importer)} imports floor {floor(target)}" if upward else "a private name"
        problems.append(f"{importer}:{line} imports {target}{'.' + name if name else ''} ({why})")
    assert not problems, "\n".join(problems)
    stale = set(KNOWN) - found
    assert not stale, f"these KNOWN edges no longer occur; remove them: {sorted(stale)}"


def test_the_checker_sees_function_level_relative_and_private_imports():
    source = "import torch\n\ndef f():\n    from ..eval.vqa import evaluate\n    from ..testbed import data\n    from .budget import _hidden\n"
    found = imports(source, "vlmprune.methods.probe")
    assert found == [("vlmprune.eval.vqa", "evaluate", 4), ("vlmprune.testbed.data", None, 5), ("vlmprune.methods.budget", "_hidden", 6)]
    assert floor("vlmprune.eval.vqa") > floor("vlmprune.methods.probe") > floor("vlmprune.testbed.data")
    assert imports("from . import load\nimport vlmprune.cli\n", "vlmprune", is_package=True) == [
        ("vlmprune", "load", 1), ("vlmprune.cli", None, 2)]


@pytest.mark.parametrize("module, expected", [("vlmprune", 7), ("vlmprune.testbed.train", 2), ("vlmprune.testbed.decisions", 3),
                                              ("vlmprune.counts", 3), ("vlmprune.methods.par.train", 4)])
def test_floor_lookup_takes_the_longest_key(module, expected):
    assert floor(module) == expected
