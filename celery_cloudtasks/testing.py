"""Test Celery tasks end to end through Cloud Tasks, in memory (a pytest plugin).

Installed as the ``celery_cloudtasks`` pytest plugin. Fixtures:

* ``cloudtasks_clock``: a :class:`~celery_cloudtasks.memory.ManualClock`.
* ``cloudtasks_app``: the Celery app under test. The default is a fresh app
  with an in-memory result backend; override it to return your own app.
* ``cloudtasks``: a started :class:`CloudTasksHarness` for that app.

::

    def test_signup(cloudtasks):
        result = send_welcome_mail.delay("a@example.com")
        cloudtasks.run_until_idle()          # retries and countdowns included
        assert result.get(timeout=0) == "sent"
        assert cloudtasks.dead_letters == []

The harness points the app at ``cloudtasks://`` with
:class:`~celery_cloudtasks.memory.InMemoryCloudTasks` queues sharing a manual
clock (``app.now`` follows it too), and delivers due tasks to the real push
endpoint (:func:`celery_cloudtasks.flask.create_app`, OIDC off) through
:func:`~celery_cloudtasks.memory.wsgi_handler`. The dead-letter queue is
paused, so dead letters stay there for inspection. Celery's own fixtures are
untouched. Importing this module imports neither Flask nor Google libraries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .envelope import TaskEnvelope
    from .memory import InMemoryCloudTasks, InMemoryTask, ManualClock

__all__ = [
    "CloudTasksHarness",
    "cloudtasks",
    "cloudtasks_app",
    "cloudtasks_clock",
]

DEAD_LETTER_QUEUE = "dead-letters"
PUSH_URL = "http://cloudtasks.test/_cloudtasks"


class IdleTimeout(AssertionError):
    """``run_until_idle`` made more deliveries than allowed (a retry loop?)."""


class CloudTasksHarness:
    """Route ``celery_app`` through in-memory Cloud Tasks; deliver to the push endpoint.

    Use as a context manager (or :meth:`start`/:meth:`close`): the app's
    configuration is restored on exit.
    """

    def __init__(
        self,
        celery_app: Any,
        *,
        clock: ManualClock | None = None,
        retry: Mapping[str, Any] | None = None,
        dead_letter_queue: str = DEAD_LETTER_QUEUE,
        transport_options: Mapping[str, Any] | None = None,
        endpoint_config: Mapping[str, Any] | None = None,
    ) -> None:
        from .memory import InMemoryCloudTasks, ManualClock
        from .types import RetryConfig

        self.celery_app = celery_app
        self.clock = clock or ManualClock()
        options = dict(celery_app.conf.broker_transport_options or {})
        options.pop("queue_factory", None)
        options.update(transport_options or {})
        if retry is not None:
            options["retry"] = dict(retry)
        options.setdefault("push_url", PUSH_URL)
        options["dead_letter_queue"] = dead_letter_queue
        self.retry = RetryConfig.from_value(options.get("retry"))
        self.queues: InMemoryCloudTasks = InMemoryCloudTasks(clock=self.clock, retry=self.retry)
        self.queues.queue(dead_letter_queue).pause()
        options["queue_factory"] = _ClockedQueues(self.queues)
        self.dead_letter_queue = dead_letter_queue
        self._options = options
        self._endpoint_config = dict(endpoint_config or {})
        self._saved: dict[str, Any] | None = None
        self.flask_app: Any = None
        self._handler: Any = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> CloudTasksHarness:
        from .flask import create_app
        from .memory import wsgi_handler

        app = self.celery_app
        conf = app.conf
        self._saved = {
            "conf": {
                key: conf.get(key)
                for key in ("broker_url", "broker_transport_options", "task_always_eager")
            },
            "now": app.__dict__.get("now"),
        }
        conf.update(
            broker_url="cloudtasks://projects/test-project/locations/local",
            broker_transport_options=self._options,
            task_always_eager=False,
        )
        clock = self.clock
        app.now = lambda: datetime.fromtimestamp(clock(), tz=timezone.utc)
        _reset_connections(app)
        config = {"CLOUDTASKS_VERIFY_OIDC": False, "CLOUDTASKS_CLOCK": clock}
        config.update(self._endpoint_config)
        self.flask_app = create_app(app, **config)
        self._handler = wsgi_handler(self.flask_app)
        return self

    def close(self) -> None:
        if self._saved is None:
            return
        app = self.celery_app
        app.conf.update(self._saved["conf"])
        if self._saved["now"] is None:
            app.__dict__.pop("now", None)
        else:
            app.now = self._saved["now"]
        _reset_connections(app)
        self._saved = None

    def __enter__(self) -> CloudTasksHarness:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- delivery --------------------------------------------------------------------

    def deliver_due(self) -> int:
        """Deliver every task due now, once; returns how many were delivered."""
        if self._handler is None:
            raise RuntimeError("start the harness first (use it as a context manager)")
        return self.queues.deliver_due(self._handler)

    def deliver_next(self, queue: str = "celery") -> int:
        """Deliver the earliest task of Cloud Tasks queue ``queue`` now; returns the status."""
        if self._handler is None:
            raise RuntimeError("start the harness first (use it as a context manager)")
        tasks = self.queues.queue(queue).tasks
        if not tasks:
            raise LookupError(f"no task waiting in queue {queue!r}")
        return self.queues.queue(queue).deliver(tasks[0], self._handler)

    def advance(self, seconds: float | timedelta) -> None:
        """Move the clock forward (without delivering)."""
        self.clock.advance(seconds)

    def run_until_idle(
        self, *, max_deliveries: int = 1_000, max_seconds: float | None = None
    ) -> int:
        """Deliver due tasks, jumping the clock to the next one, until none is left.

        Stops early when the next task is more than ``max_seconds`` ahead of the
        start; raises :class:`IdleTimeout` after ``max_deliveries`` deliveries.
        """
        start = self.clock()
        delivered = 0
        while True:
            count = self.deliver_due()
            delivered += count
            if delivered > max_deliveries:
                raise IdleTimeout(f"still busy after {max_deliveries} deliveries")
            if count:
                continue
            next_time = self.queues.next_schedule_time()
            if next_time is None:
                return delivered
            if max_seconds is not None and next_time - start > max_seconds:
                return delivered
            self.clock.advance(max(0.0, next_time - self.clock()))

    # -- inspection ------------------------------------------------------------------

    @property
    def pending(self) -> list[InMemoryTask]:
        """Tasks waiting in every queue but the dead-letter queue."""
        return [t for t in self.queues.all_tasks() if t.queue != self.dead_letter_queue]

    @property
    def dead_letters(self) -> list[TaskEnvelope]:
        """Envelopes in the dead-letter queue (each has a ``dead_letter`` mapping)."""
        return [task.envelope for task in self.queues.queue(self.dead_letter_queue).tasks]

    def test_client(self) -> Any:
        """A Flask test client of the push endpoint (for hand-made requests)."""
        if self.flask_app is None:
            raise RuntimeError("start the harness first")
        return self.flask_app.test_client()


class _ClockedQueues:
    """Queue factory stamping ``published_at`` with the test clock, not the real one.

    The endpoint measures retry duration from it; on a real clock it would lag the
    manual clock and the final attempt would be recognised too late.
    """

    def __init__(self, queues: InMemoryCloudTasks) -> None:
        self.queues = queues

    def __call__(self, queue_id: str) -> Any:
        return _ClockedQueue(self.queues.queue(queue_id))


class _ClockedQueue:
    def __init__(self, queue: Any) -> None:
        self._queue = queue

    @property
    def queue_name(self) -> str:
        return str(self._queue.queue_name)

    def enqueue(self, envelope: Any, options: Any) -> Any:
        from dataclasses import replace

        return self._queue.enqueue(replace(envelope, published_at=self._queue.clock()), options)

    def queue_depth(self) -> int:
        return int(self._queue.queue_depth())

    def purge(self) -> int:
        return int(self._queue.purge())


def _reset_connections(app: Any) -> None:
    """Forget pooled connections so a changed broker URL takes effect."""
    pool = getattr(app, "_pool", None)
    if pool is not None:
        pool.force_close_all()
        app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None and getattr(amqp, "_producer_pool", None) is not None:
        amqp._producer_pool = None


@pytest.fixture
def cloudtasks_clock() -> ManualClock:
    """The manual clock shared by the in-memory queues, the app and the endpoint."""
    from .memory import ManualClock

    return ManualClock()


@pytest.fixture
def cloudtasks_app() -> Iterator[Any]:
    """The Celery app under test; override this fixture to return your own app."""
    from celery import Celery

    app = Celery("cloudtasks-tests", set_as_current=False, backend="cache+memory://")
    yield app
    app.close()


@pytest.fixture
def cloudtasks(cloudtasks_app: Any, cloudtasks_clock: ManualClock) -> Iterator[CloudTasksHarness]:
    """A started :class:`CloudTasksHarness` for ``cloudtasks_app``."""
    with CloudTasksHarness(cloudtasks_app, clock=cloudtasks_clock) as harness:
        yield harness
