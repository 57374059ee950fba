"""Package attributes imported on first use (PEP 562): importing a package costs only what is
used, so that the data tools start without importing torch."""

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A `__getattr__` for `package`: each exported name comes from the module `exports` maps it
    to, imported on first use; a name mapped to the submodule of that name is the submodule."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        return module if exports[name] == f"{package}.{name}" else getattr(module, name)

    return __getattr__
