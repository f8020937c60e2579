"""An in-memory Cloud Tasks queue for tests and local runs.

:class:`InMemoryTaskQueue` behaves like a Cloud Tasks queue where it matters:
named tasks deduplicate (within a configurable window after completion, like
Cloud Tasks' tombstones), tasks wait for their ``schedule_time``, pausing
stops deliveries, failed deliveries are retried with the queue's
:class:`~celery_cloudtasks.types.RetryConfig` backoff until it gives up. It
delivers HTTP requests (with the ``X-CloudTasks-*`` headers and, if a token
factory is given, an OIDC bearer token) to any handler, such as a WSGI app
wrapped by :func:`wsgi_handler`. Its clock is injectable, so tests can jump
over countdowns.

:class:`InMemoryCloudTasks` is a set of such queues by name, the shape the
Celery transport needs (``broker_transport_options={"queue_factory": ...}``).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from .envelope import TaskEnvelope
from .limits import MAX_TASK_BYTES, check_task_size
from .naming import task_id_for
from .types import EnqueueOptions, EnqueueResult, OidcToken, RetryConfig

__all__ = [
    "HttpDelivery",
    "InMemoryCloudTasks",
    "InMemoryTask",
    "InMemoryTaskQueue",
    "ManualClock",
    "wsgi_handler",
]

Clock = Callable[[], float]
DeliveryHandler = Callable[["HttpDelivery"], int]
TokenFactory = Callable[[OidcToken], str]


class ManualClock:
    """A clock that moves only when told to (epoch seconds)."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float | timedelta) -> None:
        delta = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
        with self._lock:
            self._now += delta


@dataclass
class InMemoryTask:
    """A task held by an :class:`InMemoryTaskQueue` (mutable: it records attempts)."""

    task_id: str
    queue: str
    envelope: TaskEnvelope
    options: EnqueueOptions
    body: bytes
    created_at: float
    schedule_time: float
    retry_count: int = 0
    execution_count: int = 0
    first_attempt_at: float | None = None
    responses: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.task_id


@dataclass(frozen=True)
class HttpDelivery:
    """One HTTP push as Cloud Tasks would make it."""

    url: str
    headers: dict[str, str]
    body: bytes
    task: InMemoryTask


class InMemoryTaskQueue:
    """A :class:`~celery_cloudtasks.queue.TaskQueue` held in memory. Thread-safe."""

    def __init__(
        self,
        queue_name: str = "default",
        *,
        retry: RetryConfig | None = None,
        clock: Clock = time.time,
        dedup_window: timedelta = timedelta(hours=1),
        max_task_bytes: int = MAX_TASK_BYTES,
        token_factory: TokenFactory | None = None,
    ) -> None:
        self._queue_name = queue_name
        self.retry = retry or RetryConfig()
        self.clock = clock
        self.dedup_window = dedup_window
        self.max_task_bytes = max_task_bytes
        self.token_factory = token_factory
        self.paused = False
        self._tasks: dict[str, InMemoryTask] = {}
        self._tombstones: dict[str, float] = {}
        self._lock = threading.RLock()
        #: Tasks answered with 2xx, in order.
        self.completed: list[InMemoryTask] = []
        #: Tasks Cloud Tasks would have deleted after their last failed attempt.
        self.exhausted: list[InMemoryTask] = []
        #: Every enqueue result, including deduplicated ones.
        self.results: list[EnqueueResult] = []

    @property
    def queue_name(self) -> str:
        return self._queue_name

    # -- TaskQueue ---------------------------------------------------------

    def enqueue(self, envelope: TaskEnvelope, options: EnqueueOptions) -> EnqueueResult:
        started = time.perf_counter()
        task_id = task_id_for(options.idempotency_key)
        body = envelope.to_json()
        check_task_size(
            body, options.url, dict(options.headers), task_name=task_id, limit=self.max_task_bytes
        )
        now = self.clock()
        with self._lock:
            self._expire_tombstones(now)
            deduplicated = task_id in self._tasks or task_id in self._tombstones
            if not deduplicated:
                schedule = options.schedule_time.timestamp() if options.schedule_time else now
                self._tasks[task_id] = InMemoryTask(
                    task_id=task_id,
                    queue=self._queue_name,
                    envelope=envelope,
                    options=options,
                    body=body,
                    created_at=now,
                    schedule_time=schedule,
                )
            result = EnqueueResult(
                task_name=task_id,
                queue=self._queue_name,
                deduplicated=deduplicated,
                dispatch_latency_seconds=time.perf_counter() - started,
            )
            self.results.append(result)
        return result

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._tasks)

    def purge(self) -> int:
        with self._lock:
            count = len(self._tasks)
            now = self.clock()
            for task_id in self._tasks:
                self._tombstones[task_id] = now
            self._tasks.clear()
            return count

    # -- inspection --------------------------------------------------------

    @property
    def tasks(self) -> list[InMemoryTask]:
        """Pending tasks, earliest schedule first."""
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: (t.schedule_time, t.created_at))

    def get(self, task_id: str) -> InMemoryTask | None:
        with self._lock:
            return self._tasks.get(task_id)

    def due(self, now: float | None = None) -> list[InMemoryTask]:
        now = self.clock() if now is None else now
        return [task for task in self.tasks if task.schedule_time <= now]

    def next_schedule_time(self) -> float | None:
        tasks = self.tasks
        return tasks[0].schedule_time if tasks else None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def delete(self, task_id: str) -> bool:
        with self._lock:
            task = self._tasks.pop(task_id, None)
            if task is not None:
                self._tombstones[task_id] = self.clock()
            return task is not None

    # -- delivery ----------------------------------------------------------

    def build_delivery(self, task: InMemoryTask) -> HttpDelivery:
        """The HTTP request Cloud Tasks would send for the task's next attempt."""
        headers = {
            "Content-Type": "application/json",
            **dict(task.options.headers),
            "X-CloudTasks-QueueName": self._queue_name,
            "X-CloudTasks-TaskName": task.task_id,
            "X-CloudTasks-TaskRetryCount": str(task.retry_count),
            "X-CloudTasks-TaskExecutionCount": str(task.execution_count),
            "X-CloudTasks-TaskETA": f"{task.schedule_time:.6f}",
        }
        if task.responses:
            headers["X-CloudTasks-TaskPreviousResponse"] = str(task.responses[-1])
        if task.options.oidc is not None and self.token_factory is not None:
            headers["Authorization"] = f"Bearer {self.token_factory(task.options.oidc)}"
        return HttpDelivery(url=task.options.url, headers=headers, body=task.body, task=task)

    def deliver(self, task: InMemoryTask, handler: DeliveryHandler) -> int:
        """Make one attempt of ``task`` and apply Cloud Tasks' rules to the answer."""
        delivery = self.build_delivery(task)
        now = self.clock()
        if task.first_attempt_at is None:
            task.first_attempt_at = now
        try:
            status = handler(delivery)
        except Exception:  # a crashed handler is "no answer": retried
            status = 599
        with self._lock:
            task.responses.append(status)
            if 200 <= status < 300:
                self._finish(task, self.completed)
                return status
            if status < 500:
                task.execution_count += 1
            elapsed = timedelta(seconds=now - task.first_attempt_at)
            if self.retry.is_final_attempt(task.retry_count, elapsed):
                self._finish(task, self.exhausted)
            else:
                task.schedule_time = (
                    self.clock() + self.retry.backoff(task.retry_count + 1).total_seconds()
                )
                task.retry_count += 1
        return status

    def deliver_due(self, handler: DeliveryHandler, *, limit: int | None = None) -> int:
        """Deliver every task due now (once each); returns how many were delivered."""
        if self.paused:
            return 0
        delivered = 0
        for task in self.due():
            if limit is not None and delivered >= limit:
                break
            if self.get(task.task_id) is task:
                self.deliver(task, handler)
                delivered += 1
        return delivered

    def _finish(self, task: InMemoryTask, into: list[InMemoryTask]) -> None:
        if self._tasks.pop(task.task_id, None) is not None:
            self._tombstones[task.task_id] = self.clock()
            into.append(task)

    def _expire_tombstones(self, now: float) -> None:
        window = self.dedup_window.total_seconds()
        expired = [name for name, at in self._tombstones.items() if now - at > window]
        for name in expired:
            del self._tombstones[name]


class InMemoryCloudTasks:
    """A set of :class:`InMemoryTaskQueue` by queue ID, created on first use.

    Pass it as ``broker_transport_options["queue_factory"]`` to route a Celery
    app through memory instead of Google Cloud Tasks.
    """

    def __init__(
        self,
        *,
        retry: RetryConfig | None = None,
        clock: Clock = time.time,
        token_factory: TokenFactory | None = None,
        max_task_bytes: int = MAX_TASK_BYTES,
    ) -> None:
        self.retry = retry
        self.clock = clock
        self.token_factory = token_factory
        self.max_task_bytes = max_task_bytes
        self.queues: dict[str, InMemoryTaskQueue] = {}
        self._lock = threading.Lock()

    def __call__(self, queue_id: str) -> InMemoryTaskQueue:
        return self.queue(queue_id)

    def queue(self, queue_id: str) -> InMemoryTaskQueue:
        with self._lock:
            if queue_id not in self.queues:
                self.queues[queue_id] = InMemoryTaskQueue(
                    queue_id,
                    retry=self.retry,
                    clock=self.clock,
                    token_factory=self.token_factory,
                    max_task_bytes=self.max_task_bytes,
                )
            return self.queues[queue_id]

    def all_tasks(self) -> list[InMemoryTask]:
        return [task for queue in list(self.queues.values()) for task in queue.tasks]

    def deliver_due(self, handler: DeliveryHandler) -> int:
        return sum(queue.deliver_due(handler) for queue in list(self.queues.values()))

    def next_schedule_time(self) -> float | None:
        times = [
            t
            for q in list(self.queues.values())
            if not q.paused
            for t in [q.next_schedule_time()]
            if t is not None
        ]
        return min(times) if times else None


def wsgi_handler(app: Callable[..., Iterable[bytes]]) -> DeliveryHandler:
    """Adapt a WSGI app (e.g. the push endpoint) into a delivery handler."""

    def handle(delivery: HttpDelivery) -> int:
        parts = urlsplit(delivery.url)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": "POST",
            "SCRIPT_NAME": "",
            "PATH_INFO": parts.path or "/",
            "QUERY_STRING": parts.query,
            "SERVER_NAME": parts.hostname or "localhost",
            "SERVER_PORT": str(parts.port or (443 if parts.scheme == "https" else 80)),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_LENGTH": str(len(delivery.body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": parts.scheme or "http",
            "wsgi.input": io.BytesIO(delivery.body),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for key, value in delivery.headers.items():
            name = key.upper().replace("-", "_")
            if name == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            else:
                environ[f"HTTP_{name}"] = value
        status: list[int] = []

        def start_response(line: str, _headers: Any, _exc_info: Any = None) -> Any:
            status.append(int(line.split(" ", 1)[0]))
            return lambda _data: None

        chunks = app(environ, start_response)
        try:
            for _chunk in chunks:
                pass
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return status[0]

    return handle
