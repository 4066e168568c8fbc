"""Package attributes imported on first use (PEP 562): ``import lorakit`` stays free of torch."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable


def lazy_attributes(package: dict[str, Any], exports: dict[str, str]) -> tuple[Callable[[str], Any],
                                                                                 Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for ``exports`` (public name -> defining module).

    ``package`` is the package's ``globals()``: a name, once imported, is stored there, so later
    lookups no longer reach ``__getattr__``.
    """
    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:  # a submodule (``lorakit.analysis.lowrank``), as an eager package gives it
            qualified = f"{package['__name__']}.{name}"
            if name.startswith("_") or importlib.util.find_spec(qualified) is None:
                raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
            return importlib.import_module(qualified)  # (the import sets it on the package)
        value = getattr(importlib.import_module(module), name)
        package[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(package) | set(exports))

    return __getattr__, __dir__
