"""The package layers, read from the source: ``attacks`` -> ``robust_infl`` -> ``defenses`` -> the command line.

Every module of the three packages is parsed (nothing is imported) and each import statement, module
level or inside a function or class, is resolved to the absolute module it names (relative imports
included). The rules:

- ``attacks`` imports neither ``robust_infl`` nor ``defenses``;
- ``robust_infl`` does not import ``defenses``;
- the command line (``defenses/cli.py``) is the top of ``defenses``: no other module imports it;
- no module imports ``attacks``, ``robust_infl`` or ``defenses`` inside a function or class: such an
  import is how a cycle is dodged, and the layers above leave none to dodge. Lazy imports of optional
  third-party packages (torchattacks, art, kronfluence, matplotlib, ...) are not affected;
- an experiment script (``experiments/*.py``) imports the library and ``experiments._results`` only,
  never another experiment: what two experiments share lives in the library or in ``_results``.

Nothing is allow-listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attacks", "robust_infl", "defenses")
CLI_MODULES = ("defenses.cli",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str = None) -> list:
    """``(absolute module, line, local)`` for every import in ``path`` (or in ``source``, read as if it were
    that file); ``local``: inside a def or class."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, local) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.append((target, child.lineno, local))
                # ``from . import x`` / ``from pkg import submodule``: the names may be modules too
                found.extend((f"{target}.{alias.name}", child.lineno, local) for alias in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text() if source is None else source, filename=str(path)), False)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
IMPORTS = {path: _imports(path) for path in MODULES}


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_every_package_is_parsed():
    assert {_top(_module_name(p)) for p in MODULES} == set(PACKAGES)
    assert len(MODULES) > 30


def test_attacks_imports_neither_robust_infl_nor_defenses():
    bad = [_where(p, line, m) for p, found in IMPORTS.items() if _top(_module_name(p)) == "attacks"
           for m, line, _ in found if _top(m) in ("robust_infl", "defenses")]
    assert bad == []


def test_robust_infl_does_not_import_defenses():
    bad = [_where(p, line, m) for p, found in IMPORTS.items() if _top(_module_name(p)) == "robust_infl"
           for m, line, _ in found if _top(m) == "defenses"]
    assert bad == []


def test_no_module_imports_the_command_line():
    bad = [_where(p, line, m) for p, found in IMPORTS.items() if _module_name(p) not in CLI_MODULES
           for m, line, _ in found if any(_within(m, cli) for cli in CLI_MODULES)]
    assert bad == []


def test_no_function_local_import_of_the_project_packages():
    bad = [_where(p, line, m) for p, found in IMPORTS.items() for m, line, local in found
           if local and _top(m) in PACKAGES]
    assert bad == []


EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))
SHARED_BY_EXPERIMENTS = ("experiments", "experiments._results")  # the package itself: its __init__


def _experiment_imports_another(path: Path, source: str = None) -> list:
    return [_where(path, line, m) for m, line, _ in _imports(path, source)
            if _top(m) == "experiments" and not any(m == s or _within(m, "experiments._results")
                                                    for s in SHARED_BY_EXPERIMENTS)]


def test_experiments_import_only_the_library_and_their_shared_helpers():
    assert len(EXPERIMENTS) > 10
    bad = [where for path in EXPERIMENTS for where in _experiment_imports_another(path)]
    assert bad == []


@pytest.mark.parametrize("source, caught", [
    ("from experiments.fairness import jaccard\n", True),
    ("from .noisy_labels import CheckpointingERM\n", True),
    ("import experiments.lds\n", True),
    ("from experiments import fairness\n", True),
    ("from experiments._results import write_json\n", False),
    ("from . import _results\n", False),
    ("from defenses import CheckpointingERM\n", False),
])
def test_the_experiment_rule_catches_every_form_of_importing_another(source, caught):
    assert bool(_experiment_imports_another(ROOT / "experiments" / "synthetic.py", source)) == caught


@pytest.mark.parametrize("source, expected", [
    ("from . import base\n", ["attacks", "attacks.base"]),
    ("from .base import Attack\n", ["attacks.base", "attacks.base.Attack"]),
    ("def f():\n    import robust_infl\n", ["robust_infl"]),
])
def test_the_scanner_resolves_relative_and_local_imports(source, expected):
    found = _imports(ROOT / "attacks" / "fgsm.py", source)
    assert [m for m, _, _ in found] == expected
    assert all(local == ("def" in source) for _, _, local in found)
