"""Node functions for the example agents, importable by YAML ``uses: examples.nodes:NAME``.

They are module-level so that every strategy can run them, the process and celery ones
included (code never travels in messages: workers import these by name). The searches are
fakes that sleep briefly and return canned hits, so the examples run with no services.
"""

from __future__ import annotations

import time
from typing import Any

SEARCH_SECONDS = 0.2

_WEB = ["{q}: an introduction", "{q} explained in five minutes", "Why {q} matters"]
_DOCS = ["{q} reference manual", "{q}: frequently asked questions"]


def _hits(titles: list[str], query: str, source: str) -> list[dict[str, str]]:
    return [{"title": t.format(q=query), "source": source} for t in titles]


def prepare(state: dict[str, Any]) -> dict[str, Any]:
    """Normalise the query."""
    return {"query": str(state.get("query", "")).strip()}


def search_web(state: dict[str, Any]) -> dict[str, Any]:
    """Pretend to search the web for ``state["query"]``."""
    time.sleep(SEARCH_SECONDS)
    return {"hits": _hits(_WEB, state["query"], "web")}


def search_docs(state: dict[str, Any]) -> dict[str, Any]:
    """Pretend to search internal documentation for ``state["query"]``."""
    time.sleep(SEARCH_SECONDS)
    return {"hits": _hits(_DOCS, state["query"], "docs")}


def merge_hits(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """Fan-in: every successful branch's hits, in branch order, and the branches that failed."""
    hits = [hit for r in parallel_results if r.success for hit in r.state.get("hits", [])]
    failed = [r.branch for r in parallel_results if not r.success]
    return {"hits": hits, "failed_branches": failed}


def square(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU-bound-looking branch: the square of ``state["value"]``."""
    return {"value": state["value"] ** 2}


def cube(state: dict[str, Any]) -> dict[str, Any]:
    """Another branch: the cube of ``state["value"]``."""
    return {"value": state["value"] ** 3}


def total(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """Fan-in: the sum of the branches' values."""
    return {"total": sum(r.state["value"] for r in parallel_results if r.success)}
