"""The library files a rule's script can load, found by walking its imports (no import runs).

They are the rule's `code` inputs: editing one reruns exactly the jobs that can load it, and a
list kept by hand would drift from the code. Every import counts, those inside functions too
(a lazy import still runs in some job), and so does each package's `__init__.py` on the way.
Two kinds of import are not followed, as they never run: those under `if TYPE_CHECKING:`, and
a package's PEP 562 `__getattr__` unless a name it serves is imported from the package.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from pathlib import Path


def script_code(script: Path, root: Path, without: Iterable[str] = ()) -> list[Path]:
    """The files `script` can load: itself, the scripts beside it it imports, and the modules of
    the packages under `root` (e.g. root/sdxl) it reaches, sorted.

    `without`: dotted module names the job never loads with its configuration (e.g. a branch
    its settings turn off); neither they nor what only they import are included.
    """
    script, root = script.resolve(), root.resolve()
    skip, seen, todo = set(without), set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        name = _module_name(path, root)
        for module, names in _imports(path, name):
            for found in _targets(module, names, root, script.parent):
                if found not in seen and _module_name(found, root) not in skip:
                    todo.append(found)
    return sorted(seen)


def _module_name(path: Path, root: Path) -> str | None:
    """`sdxl.data.dataset` for root/sdxl/data/dataset.py; None outside root."""
    try:
        parts = list(path.relative_to(root).with_suffix("").parts)
    except ValueError:
        return None
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(module: str, names: tuple[str, ...], root: Path, scripts: Path) -> list[Path]:
    """The files `import module` / `from module import names` loads (parents' __init__ too)."""
    parts = module.split(".")
    if len(parts) == 1 and (scripts / f"{module}.py").is_file():
        return [scripts / f"{module}.py"]  # a helper beside the scripts (`from common import`)
    found = []
    for k in range(1, len(parts) + 1):
        file = _file(root, parts[:k])
        if file is None:
            return found  # not ours (torch, json, ...): nothing under root
        found.append(file)
    package = found[-1]
    for name in names:
        sub = _file(root, [*parts, name])
        if sub is not None:
            found.append(sub)
        elif package.name == "__init__.py":  # a name: maybe one the package serves lazily
            for lazy, served in _lazy_imports(package, module):
                found += _targets(lazy, served, root, scripts)
    return found


def _file(root: Path, parts: list[str]) -> Path | None:
    return _file_cached(root, tuple(parts))


@functools.cache
def _file_cached(root: Path, parts: tuple[str, ...]) -> Path | None:
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _parse(path: Path) -> ast.Module:
    return _parse_version(path, _version(path))


@functools.cache
def _parse_version(path: Path, _version: tuple[int, int]) -> ast.Module:
    """Parsed once per file version: a workflow parse asks for the same modules many times."""
    return ast.parse(path.read_bytes(), filename=str(path))


def _imports(path: Path, name: str | None) -> list[tuple[str, tuple[str, ...]]]:
    """(module, imported names) of every import `path` can run."""
    return _imports_version(path, name, _version(path))


@functools.cache
def _imports_version(path: Path, name: str | None, _version: tuple[int, int]) -> list:
    package = name if path.name == "__init__.py" else (name or "").rpartition(".")[0]
    return _import_pairs(_reachable(_parse(path).body), package)


def _import_pairs(nodes, package: str | None) -> list[tuple[str, tuple[str, ...]]]:
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = (package or "").split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            found.append((module, tuple(alias.name for alias in node.names)))
    return found


def _lazy_imports(init: Path, package: str) -> list[tuple[str, tuple[str, ...]]]:
    """What a package's __init__ imports inside its module-level __getattr__."""
    getattrs = [s for s in _parse(init).body if _is_getattr(s)]
    return _import_pairs((n for s in getattrs for n in ast.walk(s)), package)


def _reachable(body: list[ast.stmt]):
    """Every statement under `body` (imports are statements) but `if TYPE_CHECKING:` blocks
    and a module's __getattr__."""
    todo = [s for s in body if not _is_getattr(s)]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            todo += getattr(node, field, None) or []


def _is_getattr(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.FunctionDef) and stmt.name == "__getattr__"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )
