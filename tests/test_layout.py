"""The package layout: the engine (`suite/pruning/`) imports nothing of the harness above it (`suite.*`
outside it) and no method (`minillm`, `baselines`); a method imports the engine, never the harness nor
another method; the harness imports a method only when it is asked for (`python -m suite --help`
imports none); and no two modules of the project import each other, directly or around a circle.

What an import brings in is read from `sys.modules` of a fresh interpreter (one per case, so nothing
imported by another test counts); the import graph is read from the source (`ast`), module-level and
function-level imports alike, so an import deferred into a function still counts as an edge.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minillm", "baselines", "suite")
ENGINE = "suite.pruning"

# Imports a package and every module under it (subpackages too), then prints what got imported.
IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
walked = [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in walked:
    importlib.import_module(name)
print(json.dumps({"walked": walked, "modules": sorted(sys.modules)}))
"""


def fresh_env() -> dict:
    """This checkout first on the path (an installed copy of the suite elsewhere must not answer)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def import_all(package: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, package], capture_output=True, text=True,
                          env=fresh_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under `root`/<package> (a package by its __init__)."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def project(modules) -> set[str]:
    return {m for m in modules if m.partition(".")[0] in PACKAGES}


def in_engine(module: str) -> bool:
    return module == ENGINE or module.startswith(ENGINE + ".")


def test_the_engine_imports_no_harness_module_and_no_method():
    got = import_all(ENGINE)
    engine_files = {m for m in module_names(ROOT, ("suite",)) if in_engine(m)}
    assert set(got["walked"]) | {ENGINE} == engine_files  # every engine module was imported
    outside = sorted(m for m in project(got["modules"]) if not in_engine(m) and m != "suite")
    assert outside == [], f"the engine imported {outside}"


@pytest.mark.parametrize("method, other", [("minillm", "baselines"), ("baselines", "minillm")])
def test_a_method_package_imports_the_engine_and_nothing_else_of_the_project(method, other):
    got = import_all(method)
    files = set(module_names(ROOT, (method,)))
    assert set(got["walked"]) | {method} == files
    imported = project(got["modules"])
    assert any(in_engine(m) for m in imported)  # it is built on the engine
    harness = sorted(m for m in imported if m.partition(".")[0] == "suite" and not in_engine(m) and m != "suite")
    assert harness == [], f"{method} imported the harness modules {harness}"
    assert not [m for m in imported if m.partition(".")[0] == other], f"{method} imported {other}"


def imported_by_command(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m suite ARGS`; (the process, every module it imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "suite", *args], capture_output=True,
                          text=True, env=fresh_env(), cwd=ROOT, timeout=300)
    modules = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, modules


@pytest.mark.parametrize("args", [["--help"], ["prune", "--help"]])
def test_suite_help_imports_no_method_module(args):
    proc, modules = imported_by_command(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"suite.cli", "suite.methods"} <= modules  # the import log is read
    methods = sorted(m for m in modules if m.partition(".")[0] in ("minillm", "baselines"))
    assert methods == [], f"`python -m suite {' '.join(args)}` imported {methods}"
    if args[0] == "prune":  # the help names every method all the same (from the registry's summaries)
        from suite.methods import METHODS

        assert all(name in proc.stdout for name in METHODS)


def _in_type_checking_block(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: modules of the project it imports} from every import statement in its source, at
    module level or inside a function (not those under `if TYPE_CHECKING:`, which never run).
    `from a.b import c` is an edge to a.b.c when that is a module, else to a.b; a relative import
    is resolved against the importing module's package."""
    files = module_names(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
                prefix = ".".join(p for p in (base, node.module or "") if p)
                targets = [f"{prefix}.{alias.name}" for alias in node.names]
            else:
                continue
            if _in_type_checking_block(node, parents):
                continue
            edges |= {t for t in map(resolve, targets) if t and t != module}
        graph[module] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a set of modules that import
    one another around a circle), found by reachability both ways."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    components, placed = [], set()
    for m in sorted(graph):
        if m in placed:
            continue
        component = sorted({m} | {n for n in reachable[m] if m in reachable[n]})
        placed.update(component)
        if len(component) > 1:
            components.append(component)
    return components


def test_no_import_circle_between_the_projects_modules():
    graph = import_graph(ROOT)
    assert graph["suite.pipeline"] and graph["baselines.flap"]  # the graph is read
    assert circles(graph) == []


def test_no_folder_imports_another_that_imports_it_back():
    """Folder level: the engine imports no other folder; the methods import the engine only."""
    graph = import_graph(ROOT)

    def folder(module):
        return ENGINE if in_engine(module) else module.partition(".")[0]

    edges = {(folder(a), folder(b)) for a, targets in graph.items() for b in targets if folder(a) != folder(b)}
    assert {b for a, b in edges if a == ENGINE} == set()
    assert {b for a, b in edges if a in ("minillm", "baselines")} == {ENGINE}


def test_the_circle_check_sees_function_level_and_relative_imports(tmp_path):
    """The check itself on a planted project: a.x imports a.y inside a function, a.y imports a.x
    relatively at module level, a.z imports a.y only: one circle {a.x, a.y}, a.z outside it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("")
    (tmp_path / "a" / "x.py").write_text("def f():\n    from a.y import g\n    return g\n")
    (tmp_path / "a" / "y.py").write_text("from . import x\n\ndef g():\n    return x\n")
    (tmp_path / "a" / "z.py").write_text("from typing import TYPE_CHECKING\nimport a.y\n"
                                         "if TYPE_CHECKING:\n    from a import x\n")
    graph = import_graph(tmp_path, ("a",))
    assert graph == {"a": set(), "a.x": {"a.y"}, "a.y": {"a.x"}, "a.z": {"a.y"}}
    assert circles(graph) == [["a.x", "a.y"]]
