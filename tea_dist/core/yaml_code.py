"""Python written inside a YAML agent: node bodies (``run: |``) and ``when:`` routing.

Both keep their source, compile it again when unpickled (so the process strategy can send
them to child processes) and report the YAML file's own line numbers, in syntax errors and
in tracebacks alike. Both see the agent's ``variables`` (the document's ``variables:``
mapping): one dict shared by every node of the agent in a process, as in The Edge Agent;
a child process or a Celery worker has its own copy, so writes there stay there.
"""

from __future__ import annotations

import builtins
import textwrap
from collections.abc import Sequence
from types import CodeType
from typing import Any

from tea_dist.core.errors import GraphError, YAMLError

__all__ = ["InlineCode", "WhenCondition"]


def _compile(text: str, filename: str, first_line: int, mode: str, what: str) -> CodeType:
    """Compile ``text`` so that its first line is line ``first_line`` of ``filename``."""
    pad = max(first_line - 1, 0)
    try:
        return compile("\n" * pad + text, filename, mode)
    except SyntaxError as exc:
        line = (exc.lineno or pad + 1) - pad + first_line - 1
        raise YAMLError(f"{filename}:{line}: {what}: invalid Python: {exc.msg}") from None


_SIGNATURE = "state, config=None, node=None, parallel_results=None, cancel_token=None"


class InlineCode:
    """A node body written inline in YAML (``run: |``), callable like a node function.

    The body runs as a function of ``state, config, node, parallel_results, cancel_token``
    and returns the state update. Pickling keeps only the source, so the copy in a child
    process compiles it again.
    """

    def __init__(
        self,
        source: str,
        name: str,
        filename: str = "<yaml>",
        first_line: int = 1,
        variables: dict[str, Any] | None = None,
    ):
        self.source, self.name, self.filename, self.first_line = source, name, filename, first_line
        self.variables = variables if variables is not None else {}
        body = textwrap.indent(textwrap.dedent(source).rstrip(), "    ")
        # The header goes on the line before the body, so body lines keep their YAML numbers;
        # the trailing ``pass`` makes an empty (or comment-only) body valid.
        text = f"def __inline__({_SIGNATURE}):\n{body}\n    pass\n"
        code = _compile(text, filename, first_line - 1, "exec", f"node '{name}'")
        namespace: dict[str, Any] = {
            "__builtins__": builtins,
            "__name__": "tea_dist.core.yaml_code",
            "variables": self.variables,
        }
        exec(code, namespace)
        fn = namespace["__inline__"]
        fn.__code__ = fn.__code__.replace(co_name=name, co_qualname=name)
        self._fn = fn

    def __call__(
        self,
        state: dict[str, Any],
        config: Any = None,
        node: Any = None,
        parallel_results: Any = None,
        cancel_token: Any = None,
    ) -> Any:
        return self._fn(state, config, node, parallel_results, cancel_token)

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.source, self.name, self.filename, self.first_line, self.variables)
        return (type(self), args)

    def __repr__(self) -> str:
        first = next((ln.strip() for ln in self.source.splitlines() if ln.strip()), "")
        return (
            f"<InlineCode node={self.name!r} at {self.filename}:{self.first_line}: {first[:40]!r}>"
        )


class WhenCondition:
    """Routing after ``node``: the index of the first ``when`` expression true for the state.

    Expressions see ``state`` and ``variables``. When none holds, the edge without ``when`` is
    taken (key ``"default"``); with no such edge the run fails with a ``GraphError``.
    """

    def __init__(
        self,
        node: str,
        expressions: Sequence[tuple[str, int]],
        filename: str = "<yaml>",
        has_default: bool = False,
        variables: dict[str, Any] | None = None,
    ):
        self.node, self.filename, self.has_default = node, filename, has_default
        self.variables = variables if variables is not None else {}
        self.expressions = tuple((expr, line) for expr, line in expressions)
        self._codes = [
            _compile(expr.strip(), filename, line, "eval", f"'when' after node '{node}'")
            for expr, line in self.expressions
        ]

    def __call__(self, state: dict[str, Any]) -> int | str:
        scope = {"__builtins__": builtins, "state": state, "variables": self.variables}
        for index, code in enumerate(self._codes):
            if eval(code, scope):
                return index
        if self.has_default:
            return "default"
        shown = ", ".join(expr for expr, _ in self.expressions)
        raise GraphError(
            f"no 'when' condition after node '{self.node}' holds ({shown}) "
            "and it has no edge without 'when'"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.node, self.expressions, self.filename, self.has_default, self.variables)
        return (type(self), args)

    def __repr__(self) -> str:
        return f"<WhenCondition after {self.node!r}: {[e for e, _ in self.expressions]}>"
