"""traceparent travels from apply_async into the message and the Cloud Tasks request."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_cloudtasks import InMemoryCloudTasks
from celery_cloudtasks.tracing import valid_traceparent

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def setup() -> tuple[Celery, InMemoryCloudTasks]:
    memory = InMemoryCloudTasks()
    app = Celery("traced", broker="cloudtasks://projects/p/locations/l")
    app.conf.broker_transport_options = {
        "push_url": "http://h/_cloudtasks",
        "queue_factory": memory,
    }
    return app, memory


def test_explicit_traceparent_reaches_message_and_http_request(
    setup: tuple[Celery, InMemoryCloudTasks],
) -> None:
    app, memory = setup
    app.send_task("t.x", headers={"traceparent": TRACE})
    [task] = memory.queue("celery").tasks
    assert task.envelope.message["headers"]["traceparent"] == TRACE
    assert task.options.headers["traceparent"] == TRACE
    assert memory.queue("celery").build_delivery(task).headers["traceparent"] == TRACE


def test_malformed_traceparent_is_not_forwarded(setup: tuple[Celery, InMemoryCloudTasks]) -> None:
    app, memory = setup
    app.send_task("t.x", headers={"traceparent": "00-zz-yy-01\r\nX-Evil: 1"})
    [task] = memory.queue("celery").tasks
    assert "traceparent" not in task.options.headers


@pytest.fixture
def opentelemetry_present() -> Iterator[None]:
    module = types.ModuleType("opentelemetry.propagate")

    def inject(carrier: dict[str, str]) -> None:
        carrier["traceparent"] = TRACE

    module.inject = inject  # type: ignore[attr-defined]
    sys.modules["opentelemetry.propagate"] = module
    try:
        yield
    finally:
        del sys.modules["opentelemetry.propagate"]


def test_current_opentelemetry_span_is_propagated(
    setup: tuple[Celery, InMemoryCloudTasks], opentelemetry_present: None
) -> None:
    app, memory = setup
    app.send_task("t.x")
    [task] = memory.queue("celery").tasks
    assert task.options.headers["traceparent"] == TRACE


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TRACE, True),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        (TRACE.upper(), False),
        (None, False),
        (42, False),
    ],
)
def test_traceparent_validation(value: object, ok: bool) -> None:
    assert (valid_traceparent(value) is not None) is ok


def test_follow_ups_published_by_a_running_task_keep_its_trace() -> None:
    from celery import chain

    from celery_cloudtasks.testing import CloudTasksHarness

    app = Celery("traced-chain")
    app.conf.result_backend = "cache+memory://"
    seen: list[str | None] = []

    @app.task(name="step", shared=False, bind=True)
    def step(self: object, x: int) -> int:
        seen.append(getattr(self.request, "traceparent", None))  # type: ignore[attr-defined]
        return x + 1

    with CloudTasksHarness(app) as ct:
        result = chain(step.s(1), step.s(), step.s()).apply_async(headers={"traceparent": TRACE})
        ct.run_until_idle()
        assert result.get(timeout=0) == 4
    assert seen == [TRACE, TRACE, TRACE]
