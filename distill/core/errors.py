"""The error every check raises, the one "did you mean" that every unknown name gets, and the import of an optional
package that says how to install it."""
from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Iterable, Optional


class ConfigError(ValueError):
    """A configuration that cannot run, explained in words a user can act on."""


def closest(name: str, known: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(name, list(known), n=1)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`did you mean 'x'?` naming the closest of `known`, else the list of them."""
    known = list(known)
    close = closest(name, known)
    return f"did you mean '{close}'?" if close else f"known: {', '.join(known) or 'none'}"


def require_package(name: str, needed_by: str, install: str) -> ModuleType:
    """Import `name`, or fail with a ConfigError saying what needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"{needed_by} the {name} package: {install}") from err
