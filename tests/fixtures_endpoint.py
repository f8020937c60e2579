"""Helpers for endpoint and execution tests: a Celery app routed into in-memory queues."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from celery.backends.base import KeyValueStoreBackend

import celery_cloudtasks  # noqa: F401  (registers the cloudtasks:// transport)
from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.memory import InMemoryCloudTasks, InMemoryTask, ManualClock
from celery_cloudtasks.types import RetryConfig

PUSH_URL = "http://endpoint.test/_cloudtasks"
SMALL_RETRY = {"max_attempts": 3, "min_backoff": 1, "max_backoff": 10, "max_retry_duration": 0}


def make_app(
    backend: str = "cache+memory://",
    *,
    clock: ManualClock | None = None,
    retry: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[Celery, InMemoryCloudTasks]:
    """A fresh Celery app publishing into in-memory Cloud Tasks queues."""
    retry = dict(SMALL_RETRY if retry is None else retry)
    queues = InMemoryCloudTasks(clock=clock or ManualClock(), retry=RetryConfig.from_value(retry))
    transport_options = {"queue_factory": queues, "push_url": PUSH_URL, "retry": retry}
    transport_options.update(options)
    app = Celery(
        "tests",
        set_as_current=False,
        broker="cloudtasks://projects/test-project/locations/local",
        backend=backend,
        broker_transport_options=transport_options,
    )
    return app, queues


def sqlite_backend(tmp_path: Path) -> str:
    return f"db+sqlite:///{tmp_path / 'results.sqlite'}"


def take(queues: InMemoryCloudTasks, queue: str = "celery") -> InMemoryTask:
    """Remove and return the earliest task of ``queue`` (as if Cloud Tasks delivered it)."""
    q = queues.queue(queue)
    tasks = q.tasks
    assert tasks, f"queue {queue!r} is empty"
    q.delete(tasks[0].task_id)
    return tasks[0]


def drain(queues: InMemoryCloudTasks, queue: str = "celery") -> list[InMemoryTask]:
    tasks = queues.queue(queue).tasks
    for task in tasks:
        queues.queue(queue).delete(task.task_id)
    return tasks


def with_message(envelope: TaskEnvelope, **changes: Any) -> TaskEnvelope:
    """A copy of ``envelope`` with message fields replaced (``content_type=...`` style)."""
    message = json.loads(json.dumps(dict(envelope.message)))
    for key, value in changes.items():
        message[key.replace("_", "-") if key.startswith("content") else key] = value
    return TaskEnvelope(
        message=message,
        queue=envelope.queue,
        published_at=envelope.published_at,
        scheduled_at=envelope.scheduled_at,
    )


def body_of(args: Any, kwargs: Any | None = None, embed: Any | None = None) -> str:
    raw = json.dumps([args, kwargs or {}, embed or {}]).encode()
    return base64.b64encode(raw).decode()


def iter_signal(signal: Any) -> Iterator[list[dict[str, Any]]]:
    """Collect a Celery signal's keyword arguments while the generator is open."""
    received: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        received.append({"sender": sender, **kwargs})

    signal.connect(receiver, weak=False)
    try:
        yield received
    finally:
        signal.disconnect(receiver)


class DownBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """A key/value result backend whose server is unreachable (every call fails)."""

    def get(self, key: Any) -> Any:
        raise ConnectionError("result backend unreachable")

    def set(self, key: Any, value: Any) -> Any:
        raise ConnectionError("result backend unreachable")

    def mget(self, keys: Any) -> Any:
        raise ConnectionError("result backend unreachable")

    def delete(self, key: Any) -> Any:
        raise ConnectionError("result backend unreachable")


DOWN_BACKEND = "fixtures_endpoint:DownBackend"
