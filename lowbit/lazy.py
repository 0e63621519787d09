"""Names of a package imported on first use (PEP 562), so that ``lowbit --help``, input errors and
``lowbit inspect`` never wait for torch and transformers to load."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(package: str, table: dict[str, tuple[str, str | None]]
                    ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: name -> (module, attribute; None for the module)."""

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = table[name]
        value = importlib.import_module(module)
        return value if attr is None else getattr(value, attr)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table})

    return __getattr__, __dir__
