"""Resolving ``module:qualname`` references: the one way tea_dist turns a name into code.

A reference resolves only through what its module *defines*: each part of the qualname is
looked up in the namespace of the module or class before it, statically (no ``__getattr__``,
no descriptors run), and must be a class or a function whose ``__module__`` is that module.
A module object, a name the module merely imported (``os``, ``logging.config.dictConfig``,
``subprocess.getoutput``), a builtin and a dunder attribute are never followed, so a module
allowed on a worker exposes its own functions and classes and nothing it happens to import.
A graph reference may also name a ``StateGraph`` the module assigns at its top level.

Every path that acts on a name from outside uses ``resolve``: celery branch messages, submitted
runs, YAML ``uses:`` entries, map item callables. A worker passes its allowlist's ``check`` so
that nothing is imported before the module is allowed. The rule is pure introspection, written
here because no library offers "import this name, but only if the module defines it".
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

from tea_dist.core.errors import GraphError, NotAllowedError

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def split(ref: str) -> tuple[str, str]:
    """``(module, qualname)`` of a well-formed ``module:qualname``; ``GraphError`` otherwise."""
    module, sep, qualname = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not sep or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(qualname):
        raise GraphError(f"'{ref}' is not a reference of the form 'package.module:name'")
    return module, qualname


def resolve(
    ref: str,
    *,
    check: Callable[[str], None] | None = None,
    instances: tuple[type, ...] = (),
) -> Any:
    """The function or class ``ref`` names, defined in its own module.

    ``check(ref)`` runs before anything is imported (a worker's allowlist raises
    ``NotAllowedError`` there). ``instances``: types whose instances a module's top-level name
    may also be (a ``StateGraph`` for a graph reference). ``NotAllowedError`` names a
    reference that leaves its module; ``GraphError`` one that cannot be imported.
    """
    module_name, qualname = split(ref)
    if check is not None:
        check(ref)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a module that fails to import: its error, named
        raise GraphError(f"cannot import '{ref}': {type(exc).__name__}: {exc}") from exc
    parts = qualname.split(".")
    for position, part in enumerate(parts):
        if part.startswith("__") and part.endswith("__"):
            raise _outside(ref, f"'{part}' is a special attribute")
        try:
            found = inspect.getattr_static(obj, part)
        except AttributeError:
            raise GraphError(f"cannot import '{ref}': '{part}' is not defined there") from None
        last = position == len(parts) - 1
        obj = _member(ref, obj, part, found, module_name, instances if last else ())
        if not last and not isinstance(obj, type):
            raise _outside(ref, f"'{part}' is not a class")
    return obj


def _member(
    ref: str, owner: Any, name: str, found: Any, module: str, instances: tuple[type, ...]
) -> Any:
    """``found`` (``owner``'s attribute ``name``, read statically) if ``module`` defines it."""
    if isinstance(found, staticmethod):
        found = found.__func__
    elif isinstance(found, classmethod):
        if getattr(found.__func__, "__module__", None) != module:
            raise _outside(ref, f"'{name}' is not defined in module '{module}'")
        return getattr(owner, name)  # bound to its class, which the walk checked
    if instances and isinstance(owner, ModuleType) and type(found) in instances:
        return found
    if isinstance(found, ModuleType):
        raise _outside(ref, f"'{name}' is a module")
    if not isinstance(found, type | FunctionType):
        raise _outside(ref, f"'{name}' is neither a function nor a class")
    if found.__module__ != module:
        raise _outside(
            ref,
            f"'{name}' is defined in module '{found.__module__}', not in '{module}' "
            f"(name it as '{found.__module__}:{found.__qualname__}')",
        )
    return found


def _outside(ref: str, why: str) -> NotAllowedError:
    return NotAllowedError(
        f"'{ref}' does not name a function or class defined in its module: {why}; "
        "references resolve only through what the named module itself defines"
    )
