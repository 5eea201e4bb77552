"""The layout's rules, checked on the source: who may name a concrete storage, who imports whom."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "dropr"

#: Modules that may name FilesystemStorage besides the storage package (fsck,
#: which checks files by nature, lives in it): none.
NAMES_FILESYSTEM: set[str] = set()


def imports(path: Path) -> set[str]:
    """Every module and name ``path`` imports, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PACKAGE)), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_only_the_storage_package_names_the_file_system_storage() -> None:
    naming = {
        name
        for name, path in modules()
        if not name.startswith("storage/")
        and any(i.endswith(".FilesystemStorage") for i in imports(path))
    }
    assert naming == NAMES_FILESYSTEM


def test_the_client_side_does_not_import_the_server_side() -> None:
    for name, path in modules():
        if name.startswith("client/"):
            assert not {i for i in imports(path) if i.startswith("dropr.server")}, name
