"""Data flows config -> tasks -> methods -> orchestrator; only the orchestrator imports Ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    found = {}
    for file in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(file.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("common", {"tasks", "methods", "orchestrator", "ray"}),
        ("tasks", {"methods", "orchestrator", "ray"}),
        ("methods", {"orchestrator", "ray"}),
    ],
)
def test_layers_import_only_downstream(package, forbidden):
    for file, names in _imports(package).items():
        assert not names & forbidden, f"{file} imports {names & forbidden}"


def test_orchestrator_names_no_method_artifact_kind_or_analysis():
    """The orchestrator follows registrations; it never branches on (or mentions) a plug-in's name."""
    import methods

    names = set(methods.METHODS.names()) | set(methods.ANALYSES.names()) | set(methods.DISCOVERERS.names())
    for file in (ROOT / "orchestrator").rglob("*.py"):
        text = file.read_text()
        found = sorted(n for n in names if n in text)
        assert not found, f"{file.relative_to(ROOT)} names {found}"
        for kind in methods.ARTIFACTS.names():
            assert f'"{kind}"' not in text and f"'{kind}'" not in text, f"{file.relative_to(ROOT)} names {kind!r}"


def _code_words(tree: ast.AST) -> set[str]:
    """The strings (docstrings aside), attribute names, keyword names and class fields of a module."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            words.add(node.arg)
        elif isinstance(node, ast.ClassDef):
            words |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return words


def test_orchestrator_code_names_no_plug_in_block_axis_or_report_extra():
    """The blocks plug-ins declare (`discovery`, `transfer`, a kind's or method's own), the axes kinds
    declare (`mask.sparsity`) and report extras reach the orchestrator through their declarations:
    no string, attribute, keyword or field of its code names one (docstrings may, as examples), and
    the word sparsity appears nowhere in it."""
    import methods
    from common.config import BLOCKS
    from methods.reports import REPORTS

    owned = [name for name, p in [*methods.METHODS.items(), *methods.ARTIFACTS.items()] if p.Config is not None]
    names = {*BLOCKS, *methods.ARTIFACTS.names(), *owned, *REPORTS.names()}
    paths = {path for _, kind in methods.ARTIFACTS.items() for path in (*kind.axes, *kind.shorthand)}
    for file in (ROOT / "orchestrator").rglob("*.py"):
        text = file.read_text()
        assert "sparsit" not in text.lower(), f"{file.relative_to(ROOT)} mentions sparsity"
        words = _code_words(ast.parse(text))
        found = sorted(w for w in words if w in names | paths or w.split(".")[0] in names and "." in w)
        assert not found, f"{file.relative_to(ROOT)} names {found}"


def test_orchestrator_modules_import_without_cycles():
    """Each orchestrator module and package imports on its own, in a fresh interpreter (no results <-> sweep cycle)."""
    import subprocess
    import sys

    names = [f.stem for f in (ROOT / "orchestrator").glob("*.py")]
    names += [f.parent.name for f in (ROOT / "orchestrator").glob("*/__init__.py")]  # a package imports as a whole
    for name in sorted(names):
        module = f"orchestrator.{name}"
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{module}: {done.stderr[-500:]}"


def test_no_eval_or_exec_and_no_unsafe_loading():
    for package in ("common", "tasks", "methods", "orchestrator"):
        for file in (ROOT / package).rglob("*.py"):
            tree = ast.parse(file.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id not in {"eval", "exec"}, f"{file}: {node.func.id}()"
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                    owner = getattr(node.func.value, "id", "")
                    if owner in {"torch", "pickle"}:
                        kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                        assert owner == "torch" and kw.get("weights_only") is True, f"{file}: unsafe {owner}.load"
            assert "yaml.load(" not in file.read_text(), f"{file}: use yaml.safe_load"
