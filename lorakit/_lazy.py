"""Package attributes imported on first use (PEP 562): ``import lorakit`` stays free of torch."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: dict[str, Any], exports: dict[str, str]) -> tuple[Callable[[str], Any],
                                                                                 Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for ``exports`` (public name -> defining module).

    ``package`` is the package's ``globals()``: a name, once imported, is stored there, so later
    lookups no longer reach ``__getattr__``.
    """
    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        package[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(package) | set(exports))

    return __getattr__, __dir__
