"""Registry of DGP primitives by their spec ``type``: every module of this package is imported,
and each Primitive subclass registers itself when defined (``Primitive.__init_subclass__``), so
adding a primitive adds a file and nothing else here."""

import importlib
import pkgutil

from devinterp.language.primitive import Primitive

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

PRIMITIVES: dict[str, type[Primitive]] = Primitive.registry

__all__ = ["PRIMITIVES"]
