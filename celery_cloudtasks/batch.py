"""Concurrent dispatch: many ``apply_async`` calls, bounded RPCs in flight, nothing lost.

::

    from celery_cloudtasks import dispatch_batch

    with dispatch_batch(max_in_flight=32) as batch:
        for order in orders:
            process.delay(order.id)        # returns at once; the RPC runs in the pool
    # here every task exists in Cloud Tasks (created or deduplicated)
    print(len(batch.results))

When the block ends, it waits for every RPC. If any failed, it raises
:class:`~celery_cloudtasks.errors.BatchEnqueueError` listing the task names
that were enqueued and the idempotency keys that were not, with their errors;
re-running the whole batch is safe, because names are idempotent.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import BatchEnqueueError, ConfigurationError
from .types import EnqueueResult

if TYPE_CHECKING:
    from .publisher import PublishedTask, Publisher

__all__ = ["DispatchBatch", "current_batch", "dispatch_batch"]

_current: contextvars.ContextVar[DispatchBatch | None] = contextvars.ContextVar(
    "celery_cloudtasks_batch", default=None
)


def current_batch() -> DispatchBatch | None:
    """The batch open in this context, if any."""
    return _current.get()


class DispatchBatch:
    """Collects enqueues and runs them on a bounded thread pool."""

    def __init__(self, max_in_flight: int = 32) -> None:
        if max_in_flight < 1:
            raise ConfigurationError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        # The pool starts with the second enqueue: most deliveries of the push endpoint
        # publish nothing or one follow-up, which then runs inline, without a thread.
        self._executor: ThreadPoolExecutor | None = None
        self._held: tuple[Publisher, PublishedTask] | None = None
        self._pending: list[tuple[PublishedTask, Future[EnqueueResult]]] = []
        #: Results of every enqueue, in submission order (filled by :meth:`wait`).
        self.results: list[EnqueueResult] = []

    def submit(self, publisher: Publisher, prepared: PublishedTask) -> None:
        if self._executor is None:
            if self._held is None:
                self._held = (publisher, prepared)
                return
            self._executor = ThreadPoolExecutor(
                max_workers=self.max_in_flight, thread_name_prefix="cloudtasks-dispatch"
            )
            held, self._held = self._held, None
            self._pending.append((held[1], self._executor.submit(held[0].enqueue, held[1])))
        self._pending.append((prepared, self._executor.submit(publisher.enqueue, prepared)))

    def wait(self) -> list[EnqueueResult]:
        """Wait for every submitted enqueue; raise if any failed."""
        if self._held is not None:  # a single enqueue: inline
            (publisher, prepared), self._held = self._held, None
            done: Future[EnqueueResult] = Future()
            try:
                done.set_result(publisher.enqueue(prepared))
            except Exception as exc:
                done.set_exception(exc)
            self._pending.append((prepared, done))
        pending, self._pending = self._pending, []
        try:
            wait([future for _, future in pending])
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        failed: dict[str, BaseException] = {}
        for prepared, future in pending:
            error = future.exception()
            if error is None:
                self.results.append(future.result())
            else:
                failed[prepared.options.idempotency_key] = error
        if failed:
            first = next(iter(failed.values()))
            raise BatchEnqueueError(
                f"{len(failed)} of {len(pending)} tasks may not have been enqueued (first error: "
                f"{first}); {len(self.results)} were. Re-dispatching the batch is safe: names "
                "are idempotent.",
                enqueued=[result.task_name for result in self.results],
                failed=failed,
            )
        return self.results


@contextmanager
def dispatch_batch(max_in_flight: int = 32) -> Iterator[DispatchBatch]:
    """Dispatch every task published inside the block concurrently (see module docs)."""
    outer = _current.get()
    if outer is not None:  # nested: join the outer batch
        yield outer
        return
    batch = DispatchBatch(max_in_flight)
    token = _current.set(batch)
    try:
        yield batch
    except BaseException:
        _current.reset(token)
        with contextlib.suppress(BatchEnqueueError):  # the body's own error is reported
            batch.wait()
        raise
    else:
        _current.reset(token)
        batch.wait()
