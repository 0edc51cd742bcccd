"""The layers of docs/ARCHITECTURE.md, checked against the code's imports.

A package imports only packages of lower layers (and itself); the one import that goes up
(defenses -> restorers.export) sits inside a function, so it runs at call time; no code imports
a script (train.py, eval.py, certify.py); and each package imports alone in a fresh interpreter without
pulling in a package above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LAYERS = {
    "engine": 0,
    "datamodules": 1,
    "classifiers": 1,
    "attacks": 1,
    "defenses": 1,
    "restorers": 2,
    "evaluation": 3,
}
# (importing package, imported module): allowed upward, inside a function only
CALL_TIME_UPWARD = {("defenses", "restorers.export")}
SCRIPTS = {"train", "eval", "certify"}
CODE_DIRS = [*LAYERS, "tests", "scripts", "benchmarks"]


def project_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for each import of a project module in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    function_nodes = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in LAYERS or name in SCRIPTS:
                found.append((name, id(node) not in function_nodes, node.lineno))
    return found


def python_files(directory: str) -> list[Path]:
    return sorted((REPO_ROOT / directory).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_a_package_imports_only_lower_layers(package: str):
    wrong = []
    for path in python_files(package):
        for name, module_level, line in project_imports(path):
            target = name.split(".")[0]
            if target == package or LAYERS[target] < LAYERS[package]:
                continue
            if (package, name) in CALL_TIME_UPWARD and not module_level:
                continue
            wrong.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name} (layer {LAYERS[target]})")
    assert not wrong, f"{package} is layer {LAYERS[package]}; see docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_nothing_imports_a_script():
    wrong = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for directory in CODE_DIRS
        for path in python_files(directory)
        for name, _, line in project_imports(path)
        if name in SCRIPTS
    ]
    wrong += [
        f"{script}.py:{line} imports {name}"
        for script in SCRIPTS
        for name, _, line in project_imports(REPO_ROOT / f"{script}.py")
        if name in SCRIPTS
    ]
    assert not wrong, "scripts are thin; import the library they call:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_a_package_imports_alone_without_the_layers_above(package: str):
    above = sorted(name for name, layer in LAYERS.items() if layer > LAYERS[package])
    probe = (
        f"import sys, {package}\n"
        f"loaded = sorted({{name.split('.')[0] for name in sys.modules}} & {set(above)!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"importing {package} loaded {result.stdout.strip()} (a higher layer)"
