"""The Edge Agent's templates: Jinja2 in a sandbox, as TEA's YAML agents write them.

In an agent loaded through ``tea_dist.interfaces.tea.YAMLEngine``, a value such as
``"{{ state.urls }}"`` or ``"value_{{ state.item }}_done"`` is a Jinja2 template, rendered in a
``SandboxedEnvironment`` with ``StrictUndefined`` (a missing name is an error, not an empty
string; one expression alone that is undefined gives None, as in TEA). In scope: ``state``,
``variables`` and the extra names of the place it is used (``result`` of an action's
``output``). A value that is one
expression alone (``"{{ state.urls }}"``) gives the object itself (a list stays a list); any
other template gives a string. A dict's keys read as attributes (``state.item.url``).

tea_dist's own YAML (``tea_dist.load_yaml``) keeps its rule: ``{{ }}`` there is an optional
wrapper around a Python expression.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["TemplateValueError", "render", "render_params"]

_ONE_EXPRESSION = re.compile(r"^\{\{(.*)\}\}$", re.DOTALL)


class TemplateValueError(ValueError):
    """Raised when a template cannot be compiled or rendered (TEA raised a ``ValueError``)."""


@lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


@lru_cache(maxsize=512)
def _expression(text: str) -> Any:
    return _environment().compile_expression(text)


@lru_cache(maxsize=512)
def _template(text: str) -> Any:
    return _environment().from_string(text)


def _single_expression(text: str) -> str | None:
    """The expression of a template that is one ``{{ expression }}`` alone, else None."""
    match = _ONE_EXPRESSION.match(text.strip())
    if match is None or "{%" in text or text.count("{{") != 1:
        return None
    return match.group(1).strip()


def render(
    text: Any,
    state: Mapping[str, Any],
    variables: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """``text`` rendered for ``state``; a value that is no template is returned as it is."""
    if not isinstance(text, str) or ("{{" not in text and "{%" not in text):
        return text
    scope = {"state": state, "variables": variables or {}, **(extra or {})}
    expression = _single_expression(text)
    try:
        if expression is not None:
            return _expression(expression)(**scope)  # an undefined name gives None, as in TEA
        return _template(text).render(**scope)
    except TemplateError as exc:
        shown = f"{{{{ {expression} }}}}" if expression is not None else text
        raise TemplateValueError(f"Template error in '{shown}': {exc}") from None


def render_params(
    params: Any,
    state: Mapping[str, Any],
    variables: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Every string inside ``params`` (dicts and lists, recursively) rendered for ``state``."""
    if isinstance(params, Mapping):
        return {k: render_params(v, state, variables, extra) for k, v in params.items()}
    if isinstance(params, list):
        return [render_params(v, state, variables, extra) for v in params]
    return render(params, state, variables, extra)
