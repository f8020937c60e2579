"""Turn a Celery (kombu) message into a Cloud Tasks task, and enqueue it.

Shared by the kombu transport (every ``apply_async``), the push endpoint
(re-enqueues, dead letters) and concurrent batches. It holds one
:class:`~celery_cloudtasks.queue.TaskQueue` per Cloud Tasks queue ID, built by
``queue_factory`` when configured (tests: :class:`InMemoryCloudTasks`) or as a
:class:`~celery_cloudtasks.dispatcher.CloudTasksDispatcher`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timedelta, timezone
from typing import Any

from .batch import current_batch
from .envelope import TaskEnvelope
from .errors import ConfigurationError, EnqueueError
from .limits import split_schedule_time
from .metrics import CREATED, DEDUPLICATED, FAILED, DispatchMetrics, resolve_metrics
from .naming import key_for_headers
from .queue import TaskQueue
from .routing import QueueRouter
from .settings import TransportSettings
from .tracing import TRACEPARENT, current_traceparent
from .types import EnqueueOptions, EnqueueResult

__all__ = ["CALL_OPTIONS", "PublishedTask", "Publisher"]

logger = logging.getLogger("celery_cloudtasks.publish")

#: ``apply_async(cloudtasks_<name>=...)`` options understood per call.
CALL_OPTIONS = frozenset({"queue", "url", "dispatch_deadline", "idempotency_key"})
_PREFIX = "cloudtasks_"


class PublishedTask:
    """A prepared task: where it goes and what it carries (before the RPC)."""

    __slots__ = ("envelope", "options", "queue_id")

    def __init__(self, queue_id: str, envelope: TaskEnvelope, options: EnqueueOptions) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self.options = options


def _parse_eta(value: Any, *, field: str) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        eta = value
    else:
        try:
            eta = datetime.fromisoformat(str(value))
        except ValueError:
            raise ConfigurationError(f"message header {field}={value!r} is not ISO 8601") from None
    return eta if eta.tzinfo else eta.replace(tzinfo=timezone.utc)


def _deadline_from(headers: Mapping[str, Any], override: Any) -> timedelta | None:
    if override is not None:
        if isinstance(override, timedelta):
            return override
        if isinstance(override, (int, float)) and not isinstance(override, bool) and override > 0:
            return timedelta(seconds=override)
        raise ConfigurationError("cloudtasks_dispatch_deadline must be seconds or a timedelta")
    limits = headers.get("timelimit") or (None, None)
    if isinstance(limits, (list, tuple)) and len(limits) == 2:
        hard, soft = limits
        for value in (hard, soft):
            if isinstance(value, (int, float)) and value > 0:
                return timedelta(seconds=value)
    return None


class Publisher:
    """Prepares and enqueues Celery messages for one set of transport settings."""

    def __init__(self, settings: TransportSettings, *, metrics: DispatchMetrics | None = None):
        self.settings = settings
        self.router = QueueRouter(settings)
        self.metrics = metrics if metrics is not None else resolve_metrics(settings.metrics)
        self._queues: dict[str, TaskQueue] = {}
        self._lock = threading.Lock()

    def queue(self, queue_id: str) -> TaskQueue:
        """The :class:`TaskQueue` for a Cloud Tasks queue ID (created once)."""
        queue = self._queues.get(queue_id)
        if queue is not None:
            return queue
        with self._lock:
            if queue_id not in self._queues:
                factory = self.settings.queue_factory
                if factory is not None:
                    self._queues[queue_id] = factory(queue_id)
                else:
                    from .dispatcher import CloudTasksDispatcher

                    self._queues[queue_id] = CloudTasksDispatcher(self.settings, queue_id)
                watch = getattr(self.metrics, "watch_queue_depth", None)
                if watch is not None:
                    watch(queue_id, self._queues[queue_id].queue_depth)
            return self._queues[queue_id]

    def queue_for_celery(self, celery_queue: str) -> TaskQueue:
        return self.queue(self.router.queue_id(celery_queue))

    def prepare(
        self,
        celery_queue: str,
        message: MutableMapping[str, Any],
        *,
        now: datetime | None = None,
        idempotency_key: str | None = None,
        queue_id: str | None = None,
        schedule_time: datetime | None = None,
    ) -> PublishedTask:
        """Build the envelope and enqueue options for a kombu message dict.

        ``cloudtasks_*`` per-call options are removed from the message
        properties (they are instructions to us, not data for the task). The
        keyword overrides serve the library's own re-enqueues of a message
        already published once (a hop towards a far ETA, a dead-letter replay).
        """
        properties = message.setdefault("properties", {})
        headers = message.get("headers") or {}
        overrides = {}
        for key in [k for k in properties if isinstance(k, str) and k.startswith(_PREFIX)]:
            overrides[key[len(_PREFIX) :]] = properties.pop(key)
        unknown = set(overrides) - CALL_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"unknown per-call options {sorted(_PREFIX + u for u in unknown)}; "
                f"supported: {sorted(_PREFIX + o for o in CALL_OPTIONS)}"
            )
        task_id = headers.get("id")
        if not isinstance(task_id, str) or not isinstance(headers.get("task"), str):
            raise ConfigurationError(
                "only Celery task messages (protocol 2, with 'id' and 'task' headers) can be "
                "sent through Cloud Tasks"
            )
        priority = properties.get("priority")
        queue_id = (
            queue_id
            or overrides.get("queue")
            or self.router.queue_id(celery_queue, priority if isinstance(priority, int) else None)
        )
        now = now or datetime.now(timezone.utc)
        if schedule_time is None:
            eta = _parse_eta(headers.get("eta"), field="eta")
            schedule_time, _beyond = split_schedule_time(eta, now)
        key = idempotency_key or overrides.get("idempotency_key") or key_for_headers(headers)
        http_headers: dict[str, str] = {}
        traceparent = current_traceparent(headers)
        if traceparent is not None:
            headers[TRACEPARENT] = traceparent
            http_headers[TRACEPARENT] = traceparent
        envelope = TaskEnvelope(
            message=message,
            queue=celery_queue,
            published_at=now.timestamp(),
            scheduled_at=schedule_time.timestamp() if schedule_time else None,
        )
        options = EnqueueOptions(
            idempotency_key=str(key),
            url=overrides.get("url") or self.settings.url_for(queue_id),
            schedule_time=schedule_time,
            dispatch_deadline=_deadline_from(headers, overrides.get("dispatch_deadline"))
            or self.settings.dispatch_deadline,
            oidc=self.settings.oidc_for(queue_id),
            headers=http_headers,
        )
        return PublishedTask(queue_id, envelope, options)

    def publish(self, celery_queue: str, message: MutableMapping[str, Any]) -> EnqueueResult | None:
        """Prepare and enqueue; inside a :func:`~celery_cloudtasks.batch.dispatch_batch`
        the RPC is handed to the batch (returns None) and awaited when it closes."""
        prepared = self.prepare(celery_queue, message)
        batch = current_batch()
        if batch is not None:
            batch.submit(self, prepared)
            return None
        return self.enqueue(prepared)

    def enqueue(self, prepared: PublishedTask) -> EnqueueResult:
        """One enqueue with metrics and a structured log line."""
        queue = self.queue(prepared.queue_id)
        envelope = prepared.envelope
        started = time.perf_counter()
        try:
            result = queue.enqueue(envelope, prepared.options)
        except EnqueueError as exc:
            self.metrics.dispatched(prepared.queue_id, FAILED, time.perf_counter() - started)
            logger.error(
                "dispatch failed: %s",
                exc,
                extra=_log_fields(envelope, prepared.queue_id, exc.task_name),
            )
            raise
        outcome = DEDUPLICATED if result.deduplicated else CREATED
        self.metrics.dispatched(prepared.queue_id, outcome, result.dispatch_latency_seconds)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "dispatched %s[%s] as %s (%s)",
                envelope.task_name,
                envelope.task_id,
                result.task_name,
                outcome,
                extra=_log_fields(envelope, prepared.queue_id, result.task_name),
            )
        return result


def _log_fields(envelope: TaskEnvelope, queue_id: str, task_name: str | None) -> dict[str, Any]:
    return {
        "celery_task_id": envelope.task_id,
        "celery_task_name": envelope.task_name,
        "cloudtasks_task": task_name,
        "cloudtasks_queue": queue_id,
        "attempt": envelope.retries,
    }
