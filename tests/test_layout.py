"""The architecture, checked from the source: who may import whom, and how long modules and functions get.

- ``studykit/`` is the core every stage shares: it imports no stage and not the orchestrator;
- a stage (``synthdocs/``, ``finetune/``, ``eval/``) imports the core only, never another stage or ``study/``;
- ``study/`` (the orchestrator) sits above the stages and may import them all;
- modules stay under 400 lines and functions under 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = "studykit"
STAGES = ("synthdocs", "finetune", "eval")
ORCHESTRATION = "study"
PACKAGES = (CORE, *STAGES, ORCHESTRATION)


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages a module imports (at any depth of the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", [CORE, *STAGES])
def test_imports_follow_the_layers(package):
    allowed = {CORE} if package == CORE else {CORE, package}
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) - allowed) for p in modules(package)}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_every_stage_exports_a_spec_the_orchestrator_lists():
    from study.specs import SPECS

    assert set(SPECS) == {"generate", "policy", "finetune", "rl", "eval", "eval_backdoor", "eval_antilab"}
    for package in STAGES:
        assert (ROOT / package / "spec.py").is_file()
    for spec in SPECS.values():
        assert spec.launch[0] in ("python", "accelerate") and spec.records, spec.kind


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_modules_and_functions_stay_short():
    long_modules = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in modules(pkg)
                    if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    long_functions = {name: n for pkg in PACKAGES for p in modules(pkg) for name, n in function_lengths(p).items()
                      if n > 80}
    assert long_modules == {} and long_functions == {}
