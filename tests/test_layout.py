"""The package's shape, kept: docs/ARCHITECTURE.md lists the packages bottom to top, and the
modules of each package bottom to top; every import between convnet's modules (at the top of
a file, inside a function, or under ``TYPE_CHECKING``) points down both lists, so there is no
circle at either level; no module is over 450 lines; an import of a convnet module inside a
function outside the command line says why (a heavy dependency kept off a path that does not
need it)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "convnet"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 450
LAZY_OK = {"cli"}  # the command line imports inside each command, so that `convnet --help` is fast


def modules() -> dict[str, Path]:
    """Every module by its dotted name below the package (``data.folders``; ``estimator``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return found


def ladders(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The packages (and top-level modules), bottom first, and each package's modules, bottom first."""
    top = re.findall(r"^\d+\. `([\w.]+)`", text.split("## Packages", 1)[1].split("\n## ", 1)[0], re.M)
    inner = {}
    for name, body in re.findall(r"^### `(\w+)`\n(.*?)(?=^### |^## |\Z)", text, re.M | re.S):
        inner[name] = re.findall(r"^\d+\. `(\w+)`", body, re.M)
    return top, inner


def rank(module: str, top: list[str], inner: dict[str, list[str]]) -> tuple[int, int]:
    """Where a module stands: its package's place, then its place in the package."""
    package, _, name = module.partition(".")
    return top.index(package), (inner[package].index(name) if name else -1)


def convnet_imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(module, line, inside a function)`` for every import of a convnet module in ``path``,
    the module named as :func:`modules` names it (``from convnet.core import runfolder`` is
    ``core.runfolder``; ``from convnet.data.load import x`` is ``data.load``)."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for node in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "convnet":
            base = node.module.removeprefix("convnet").lstrip(".")
            for alias in node.names:
                dotted = f"{base}.{alias.name}" if base else alias.name
                names.append(dotted if dotted in known else base or "__init__")
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("convnet.") for a in node.names if a.name.startswith("convnet.")]
        found += [(name, node.lineno, id(node) in in_function) for name in names if name in known]
    return found


def test_the_architecture_lists_every_package_and_module_once() -> None:
    top, inner = ladders(ARCHITECTURE.read_text())
    found = modules()
    packages = sorted({m.split(".")[0] for m in found})
    assert len(top) == len(set(top)) and sorted(top) == packages, sorted(set(top) ^ set(packages))
    for package, names in inner.items():
        own = sorted(m.split(".", 1)[1] for m in found if m.startswith(package + "."))
        assert len(names) == len(set(names)) and sorted(names) == own, (package, sorted(set(names) ^ set(own)))
    assert set(inner) == {m.split(".")[0] for m in found if "." in m}
    assert len(top) <= 12  # `ls src/convnet` stays a map


def test_every_import_points_down_both_ladders() -> None:
    top, inner = ladders(ARCHITECTURE.read_text())
    found = modules()
    upward = []
    for name, path in found.items():
        for target, line, _ in convnet_imports(path, set(found)):
            if target == name or target.split(".")[0] == name:  # a package's __init__ may name its own modules
                continue
            here, there = rank(name, top, inner), rank(target, top, inner)
            if there[0] > here[0] or (there[0] == here[0] and there[1] >= here[1]):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}, which the ladder puts above")
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_say_why() -> None:
    found = modules()
    silent = []
    for name, path in found.items():
        if name.split(".")[0] in LAZY_OK or name == "__main__":
            continue
        lines = path.read_text().splitlines()
        for target, line, inside in convnet_imports(path, set(found)):
            if inside and "#" not in lines[line - 1] + lines[line - 2]:
                silent.append(f"{path.name}:{line} imports {target} inside a function without a comment saying why")
    assert not silent, "\n".join(silent)


def test_no_module_is_over_the_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: an import hidden in a function is found and placed."""
    (tmp_path / "a.py").write_text("from convnet.data.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from convnet.core import a\n")
    known = {"data.b", "core.a", "core"}
    assert convnet_imports(tmp_path / "a.py", known) == [("data.b", 1, False)]
    assert convnet_imports(tmp_path / "b.py", known) == [("core.a", 2, True)]
    text = "## Packages\n\n1. `core` x\n2. `data` y\n\n## Modules\n\n### `core`\n\n1. `a` z\n\n### `data`\n\n1. `b` w\n"
    top, inner = ladders(text)
    assert top == ["core", "data"] and inner == {"core": ["a"], "data": ["b"]}
    assert rank("data.b", top, inner) > rank("core.a", top, inner)  # b importing a points down; a importing b up


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["tune", "--help"], ["recipes"],
                                  ["datasets"], ["models"]], ids=" ".join)
def test_help_and_the_tables_load_no_torch(args: list[str]) -> None:
    """Every --help and the commands that print a table start without PyTorch (or numpy): well under a second."""
    code = (f"import sys\nfrom convnet.cli.parser import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'sklearn', 'onnxruntime', 'fastapi', 'matplotlib') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_training_and_scoring_load_no_matplotlib() -> None:
    """matplotlib (about half a second) is imported only to draw: the modules `convnet train`, `evaluate` and
    `inspect` start from do not load it."""
    code = ("import sys\nimport convnet.cli.commands, convnet.tools.experiment, convnet.trust.report, "
            "convnet.trust.inspection\nprint('MATPLOTLIB', 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "MATPLOTLIB False" in out, out
