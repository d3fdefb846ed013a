"""What tests need to know of the modules compiled with mypyc (setup.py, NATIVE_MODULES)."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"


def attributes(cls: type) -> tuple[str, ...]:
    """The instance attributes of a class with fixed attributes: its `__slots__` as Python
    runs it, the attributes mypyc lists (`__mypyc_attrs__`) once compiled."""
    names = getattr(cls, "__slots__", None) or getattr(cls, "__mypyc_attrs__", ())
    return tuple(name for name in names if not name.startswith("__"))


def compiled_modules() -> list[Path]:
    """The sources of the modules compiled in place beside them (`make native`)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(
        path.with_name(path.name.split(".", 1)[0] + ".py")
        for path in PACKAGE.rglob("*")
        if path.name.endswith(suffixes) and not path.name.startswith("native__mypyc")
    )


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after they were built: the code of them all
    is in one library (sidecar/native__mypyc...), which `make native` touches once built."""
    libraries = [path.stat().st_mtime for path in PACKAGE.glob("native__mypyc.*")]
    built = min(libraries, default=0.0)
    return [
        str(path.relative_to(PACKAGE.parent))
        for path in compiled_modules()
        if not path.exists() or path.stat().st_mtime > built
    ]
