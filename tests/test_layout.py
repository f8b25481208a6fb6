"""The package's shape, kept: README's "How the code is laid out" lists every module from
the bottom up, and every import between convnet's modules (at the top of a file, inside a
function, or under ``TYPE_CHECKING``) points down that list, so there is no circle; no
module is over 450 lines; an import of a convnet module inside a function outside the
command line says why (a heavy dependency kept off a path that does not need it)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "convnet"
MAX_LINES = 450
# the command line imports inside each command, so that `convnet --help` is fast
LAZY_OK = {"cli", "commands", "__main__"}


def ladder(readme: str) -> list[str]:
    """The modules README lists under "How the code is laid out", bottom first."""
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `([\w.]+)`", section, re.M)


def convnet_imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(module, line, inside a function)`` for every import of a convnet module in ``path``."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for node in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "convnet":
            sub = node.module.split(".")[1:]
            names = [sub[0]] if sub else [a.name for a in node.names if a.name in modules]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("convnet.")]
        found += [(name, node.lineno, id(node) in in_function) for name in names if name in modules]
    return found


def test_readme_lists_every_module_once() -> None:
    order = ladder((ROOT / "README.md").read_text())
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(order) == len(set(order)), [m for m in order if order.count(m) > 1]
    assert sorted(order) == modules, f"README lists {sorted(set(order) ^ set(modules))} wrongly"


def test_every_import_points_down_the_ladder() -> None:
    order = ladder((ROOT / "README.md").read_text())
    rank = {m: i for i, m in enumerate(order)}
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for target, line, _ in convnet_imports(path, set(rank)):
            if target != path.stem and rank[target] >= rank[path.stem]:
                upward.append(f"{path.name}:{line} imports {target}, which README's ladder puts above it")
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_say_why() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    silent = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in LAZY_OK:
            continue
        lines = path.read_text().splitlines()
        for target, line, inside in convnet_imports(path, modules):
            if inside and "#" not in lines[line - 1] + lines[line - 2]:
                silent.append(f"{path.name}:{line} imports {target} inside a function without a comment saying why")
    assert not silent, "\n".join(silent)


def test_no_module_is_over_the_limit() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: an import hidden in a function is found and placed."""
    (tmp_path / "a.py").write_text("from convnet.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from convnet.a import y\n")
    found_a = convnet_imports(tmp_path / "a.py", {"a", "b"})
    found_b = convnet_imports(tmp_path / "b.py", {"a", "b"})
    assert found_a == [("b", 1, False)] and found_b == [("a", 2, True)]
    assert ladder("## How the code is laid out\n\n1. `b` x\n2. `a` y\n\n## Next\n3. `c`") == ["b", "a"]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["tune", "--help"], ["recipes"],
                                  ["datasets"], ["models"]], ids=" ".join)
def test_help_and_the_tables_load_no_torch(args: list[str]) -> None:
    """Every --help and the commands that print a table start without PyTorch (or numpy): well under a second."""
    code = (f"import sys\nfrom convnet.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'sklearn', 'onnxruntime', 'fastapi', 'matplotlib') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
