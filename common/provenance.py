"""What code made a result: the project's code version, and the source of plug-in modules.

- `code_version()`: the project's version, recorded in every row and artifact (not in keys): in a
  git checkout the commit (`git describe --always`) and `-dirty` when tracked files differ from it,
  otherwise the installed package's version. Computed once per process; the driver's travels to the
  workers with each trial spec.
- `plugin_sources(objects)`: for registered objects (methods, analyses, artifact kinds, tasks, models)
  defined outside the project's own packages, the hash of their module's source. It enters the keys
  of the trials and artifacts that use them, so editing a plug-in reruns exactly what uses it. A
  module's source is its file and the files of the modules it imports that are not installed
  packages or the project's (its helpers beside it, or its own package's modules), found from the
  import statements of its file.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import os
import subprocess
import sys
import sysconfig
import types
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_PACKAGES = ("common", "methods", "orchestrator", "tasks")
ROOT = Path(__file__).resolve().parent.parent  # the project's checkout (or site-packages when installed)


@functools.cache
def code_version() -> str:
    """`git 214be0c4f1a2` or `git 214be0c4f1a2-dirty` in a git checkout; `instill 0.1.0` otherwise."""
    if (ROOT / ".git").exists():
        # No optional locks: `git status` must not write the index that other git commands may hold.
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        try:
            describe = _git(["describe", "--always", "--abbrev=12"], env)
            dirty = _git(["status", "--porcelain", "--untracked-files=no"], env)
        except (OSError, subprocess.SubprocessError):
            pass  # no git: the package version below
        else:
            return f"git {describe}" + ("-dirty" if dirty else "")
    try:
        return f"instill {metadata.version('instill')}"
    except metadata.PackageNotFoundError:
        return "instill (unknown version)"


def _git(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def defining_module(obj: Any) -> str:
    """The module that defines a registered object: a class's (or its instance's) own module, or for
    a record of a function (an analysis's `run`, a model's builder) the function's."""
    if isinstance(obj, (type, types.FunctionType)):
        return obj.__module__
    own = type(obj).__module__
    if is_plugin(own):
        return own
    for value in getattr(obj, "__dict__", {}).values():
        if inspect.isfunction(value):
            return value.__module__
    return own


def is_plugin(module: str) -> bool:
    """Whether `module` lies outside the project's own packages."""
    return module.split(".")[0] not in PROJECT_PACKAGES


def plugin_sources(objects: list[Any]) -> dict[str, str]:
    """{module: source hash} of the plug-in modules among those defining `objects` (empty when all
    are the project's own: its version is `code_version`, recorded beside the key, not in it)."""
    modules = sorted({m for m in map(defining_module, objects) if is_plugin(m)})
    return {m: source_hash(m) for m in modules}


_HASHES: dict[str, tuple[types.ModuleType | None, str]] = {}


def source_hash(name: str) -> str:
    """The hash of module `name`'s source (see the module docstring), once per loaded module: the
    code it ran with, even if its file is edited later in this process's life (re-importing it
    gives a new module, hashed anew)."""
    module = sys.modules.get(name)
    cached = _HASHES.get(name)
    if cached is not None and cached[0] is module:
        return cached[1]
    digest = hashlib.sha256()
    for path in _source_files(module) if module is not None else []:
        digest.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
    value = digest.hexdigest()[:16] if module is not None else "not loaded"
    _HASHES[name] = (module, value)
    return value


def _source_files(root: types.ModuleType) -> list[Path]:
    """`root`'s file and those of the local modules its file imports, transitively (each `import`
    statement of the file, those inside functions included, that names a loaded module), sorted."""
    top = root.__name__.split(".")[0]
    seen, files, todo = {root.__name__}, [], [root]
    while todo:
        module = todo.pop()
        path = _file(module)
        if path is None:
            continue
        files.append(path)
        for name in _imported(module, path):
            other = sys.modules.get(name)
            if other is None or name in seen or not is_plugin(name):
                continue
            seen.add(name)
            if name.split(".")[0] == top or _is_local(other):
                todo.append(other)
    return sorted(set(files))


def _imported(module: types.ModuleType, path: Path) -> list[str]:
    """The module names the file's import statements name (`from a import b`: `a`, and `a.b` if b is a module)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__ or "")
            except (ImportError, ValueError):
                continue
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _file(module: types.ModuleType) -> Path | None:
    path = getattr(module, "__file__", None)
    return Path(path) if isinstance(path, str) and path.endswith(".py") and os.path.isfile(path) else None


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(str(Path(r).resolve()) for r in roots)


def _is_local(module: types.ModuleType) -> bool:
    """A module of the user's own (beside a plug-in), not the standard library or an installed package."""
    path = _file(module)
    if path is None:
        return False
    text = str(path.resolve())
    return (
        "site-packages" not in path.parts
        and "dist-packages" not in path.parts
        and not text.startswith(_installed_roots())
    )
