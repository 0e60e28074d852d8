"""A hash of the code a stage runs: its module and every project module it imports.

The driver's rerun key (pipelines/driver.py) covers it, so a stage reruns after an edit to
any code it runs (`actors/followup_rules.py` for followups) and after nothing else (a
README edit reruns nothing). Imports are read from the source with `ast`, those inside
functions included, following only the project's own packages; a package's template and
data files beside its `__init__.py` (the role prompts) count as its code. Hashing the
files, not asking git, also works in a `ray job submit` working directory.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGES = ("actors", "pipelines", "serve", "sim")
REPO = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = (".jinja", ".json", ".yaml", ".txt")


def module_file(module: str, root: Path) -> Path | None:
    """The source file of a project module under `root`, or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path) -> set[str]:
    """Project modules a file imports (anywhere in it), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipelines.stages.rewrites import quality` may name a submodule.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            for end in range(1, len(parts) + 1):
                if module_file(".".join(parts[:end]), root) is not None:
                    found.add(".".join(parts[:end]))
    return found


def module_closure(module: str, root: Path = REPO) -> list[str]:
    """`module` and every project module reachable from it through imports, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            raise ModuleNotFoundError(f"no project module {name!r} under {root}")
        seen.add(name)
        todo.extend(imported_modules(path, root) - seen)
    return sorted(seen)


def code_files(module: str, root: Path = REPO) -> list[Path]:
    """The files whose content a module's behaviour depends on."""
    files = []
    for name in module_closure(module, root):
        path = module_file(name, root)
        files.append(path)
        if path.name == "__init__.py":
            files += sorted(p for p in path.parent.iterdir() if p.suffix in DATA_SUFFIXES)
    return files


@lru_cache(maxsize=None)
def code_hash(module: str, root: Path = REPO) -> str:
    """A short hash over the paths and contents of `code_files(module)`."""
    digest = hashlib.sha256()
    for path in code_files(module, root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
