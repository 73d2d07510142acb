"""A worker app with OpenTelemetry configured, as a user's own ``celery -A`` module would be.

``celery -A tests.otel_worker worker``: the SDK exports every span as a JSON line to the file
named by ``TEA_TEST_SPANS`` (append-only, so prefork children and threads can share it), then
tea_dist's Celery app is the worker's app. Also the node and graph the tracing tests run there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tea_dist import ParallelConfig, StateGraph
from tea_dist.distributed.worker_app import app


class JsonLinesExporter(SpanExporter):  # type: ignore[misc]
    """Appends each finished span to a file as one JSON object per line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(as_dict(span)) + "\n" for span in spans)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
        return SpanExportResult.SUCCESS


def as_dict(span: ReadableSpan) -> dict[str, Any]:
    """What the tests read of a span, from either process."""
    return {
        "name": span.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "pid": os.getpid(),
    }


if os.environ.get("TEA_TEST_SPANS"):
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(os.environ["TEA_TEST_SPANS"]))
    )
    trace.set_tracer_provider(provider)


def traced_work(state: dict[str, Any], node: str) -> dict[str, Any]:
    """A node that makes a span of its own (as an instrumented client would)."""
    with trace.get_tracer("tests").start_as_current_span("user.work"):
        return {f"done_{node}": True}


def submitted_graph() -> StateGraph:
    """start -> (a, b on the queue of ``TEA_TEST_OTEL_QUEUE``) -> merge, for ``submit``."""
    from tests.nodes import fan_graph

    config = ParallelConfig(strategy="celery", queue=os.environ["TEA_TEST_OTEL_QUEUE"])
    return fan_graph({"a": traced_work, "b": traced_work}, config=config, name="submitted")


__all__ = ["app"]
