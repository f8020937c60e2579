"""W3C trace context (``traceparent``) carried from the producer to the execution.

On publish, the current trace context is taken from, in order: the message's
own ``traceparent`` header (``apply_async(headers={"traceparent": ...})``),
OpenTelemetry's current span (only if the application already imported
``opentelemetry``; this library never imports it by itself), or the Celery
task being executed (so chains, retries and callbacks stay in one trace).
It travels in the Celery message headers (``task.request.traceparent`` at
execution) and as the ``traceparent`` HTTP header of the Cloud Tasks request,
so Cloud Run's request log joins the trace that enqueued the task.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["TRACEPARENT", "current_traceparent", "valid_traceparent"]

TRACEPARENT = "traceparent"
_FORMAT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: Any) -> str | None:
    """``value`` if it is a well-formed W3C traceparent, else None."""
    if isinstance(value, str) and _FORMAT.match(value) and not value.startswith("ff"):
        return value
    return None


def _from_opentelemetry() -> str | None:
    if "opentelemetry.propagate" not in sys.modules:
        return None
    propagate: Any = sys.modules["opentelemetry.propagate"]
    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier)
    except Exception:  # a broken propagator must not break publishing
        return None
    return valid_traceparent(carrier.get(TRACEPARENT))


def _from_current_task() -> str | None:
    if "celery" not in sys.modules:
        return None
    from celery import current_task

    task = current_task
    if task is None:
        return None
    request = getattr(task, "request", None)
    return valid_traceparent(getattr(request, TRACEPARENT, None))


def current_traceparent(headers: Mapping[str, Any]) -> str | None:
    """The trace context a message published now should carry."""
    return (
        valid_traceparent(headers.get(TRACEPARENT)) or _from_opentelemetry() or _from_current_task()
    )
