"""A fork's own modules, named by ``config.imports``, imported before the config is checked.

A backbone or an algorithm registers itself when its module is imported
(``@register_backbone``, ``@register_algorithm``); a fork's module is not imported by this
package, so the config names it: ``--config.imports=my_pkg.my_backbone`` (several: separated by
commas). The field is saved with the run (config.json), so ``evaluate``, ``export`` and a linear
evaluation of that run import the same modules. A module that cannot be imported is a
``ConfigError`` naming it.
"""

from __future__ import annotations

import importlib
from typing import Any

from moco_jax.config.checks import ConfigError


def module_names(imports: Any) -> list[str]:
    """The module names of ``config.imports``: a comma-separated string (or a list of names)."""
    if imports is None:
        return []
    names = imports.split(",") if isinstance(imports, str) else list(imports)
    return [name.strip() for name in names if str(name).strip()]


def import_user_modules(config: Any) -> None:
    """Import every module ``config.imports`` names (once: Python keeps imported modules)."""
    for name in module_names(config.get("imports", "")):
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"imports: {name!r} is not a module name (e.g. my_pkg.my_backbone)")
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"imports: cannot import {name!r} ({err}); the module must be importable "
                "(pip install -e your package, or put it on PYTHONPATH)"
            ) from None
