"""The queue interface every dispatch goes through.

Two implementations: :class:`celery_cloudtasks.dispatcher.CloudTasksDispatcher`
(Google Cloud Tasks, ``gcp`` extra) and
:class:`celery_cloudtasks.memory.InMemoryTaskQueue` (tests, local runs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .envelope import TaskEnvelope
from .types import EnqueueOptions, EnqueueResult

__all__ = ["TaskQueue"]


@runtime_checkable
class TaskQueue(Protocol):
    """One Cloud Tasks queue (or a stand-in for it)."""

    @property
    def queue_name(self) -> str:
        """The queue ID, for logs and metrics."""
        ...

    def enqueue(self, envelope: TaskEnvelope, options: EnqueueOptions) -> EnqueueResult:
        """Create the task named by ``options.idempotency_key``.

        Returns normally when the task exists afterwards, whether created now
        (``deduplicated=False``) or already there (``deduplicated=True``).
        Raises :class:`celery_cloudtasks.errors.EnqueueError` otherwise.
        """
        ...

    def queue_depth(self) -> int:
        """Tasks waiting in the queue (an estimate for Cloud Tasks)."""
        ...

    def purge(self) -> int:
        """Delete every task in the queue; returns how many were known to be there."""
        ...
