"""Dead letters: what happens to a delivery that will never succeed.

Cloud Tasks deletes a task after its last attempt and has no dead-letter
queue. With the transport option ``dead_letter_queue`` (a Cloud Tasks queue
ID; keep that queue paused: it holds tasks up to 31 days, and resuming it
replays them through the endpoint), the endpoint enqueues the failed envelope
with a ``dead_letter`` mapping describing the failure::

    reason, exception_type, exception_message, traceback, attempts,
    first_attempt_at, last_attempt_at, original_queue, cloudtasks_queue,
    cloudtasks_task_name, task_id, task_name, replays

and sends :data:`task_dead_lettered`. Without a dead-letter queue, or if that
enqueue fails, the whole envelope is logged at ERROR: nothing that reached the
endpoint is lost silently.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from celery.utils.dispatch import Signal

from .envelope import TaskEnvelope
from .errors import CloudTasksError
from .execution import DeliveryMetadata, FailureInfo
from .naming import idempotency_key
from .queue import TaskQueue
from .types import EnqueueOptions, OidcToken

__all__ = [
    "REPLAYS_HEADER",
    "DeadLetterOutcome",
    "DeadLetterer",
    "dead_letter_info",
    "task_dead_lettered",
]

logger = logging.getLogger("celery_cloudtasks.deadletter")

#: Sent after a delivery was dead-lettered (or logged, when no queue is set).
#: ``sender`` is the Celery task name; keyword arguments: ``envelope`` (the
#: :class:`TaskEnvelope` with its ``dead_letter`` mapping), ``reason``,
#: ``queue`` (the dead-letter queue ID, or None) and ``enqueued`` (bool).
#: Celery message header carrying how often a task was replayed from dead letters.
REPLAYS_HEADER = "cloudtasks_replays"


def _replays(envelope: TaskEnvelope) -> int:
    previous = (envelope.dead_letter or {}).get("replays")
    counted = int(previous) + 1 if isinstance(previous, int) else 0
    header = envelope.headers.get(REPLAYS_HEADER)
    return max(counted, header if isinstance(header, int) else 0)


task_dead_lettered = Signal(name="task_dead_lettered")


@dataclass(frozen=True)
class DeadLetterOutcome:
    """Where a dead letter went: enqueued into ``queue`` as ``task_name``, or only logged."""

    enqueued: bool
    queue: str | None
    task_name: str | None
    envelope: TaskEnvelope


def dead_letter_info(
    envelope: TaskEnvelope,
    meta: DeliveryMetadata,
    *,
    reason: str,
    failure: FailureInfo | None,
    now: float,
) -> dict[str, Any]:
    """The ``dead_letter`` mapping stored with a dead-lettered envelope."""
    return {
        "reason": reason,
        "exception_type": failure.type if failure else None,
        "exception_message": failure.message if failure else None,
        "traceback": failure.traceback if failure else "",
        "attempts": meta.retry_count + 1,
        "first_attempt_at": envelope.first_dispatch_at,
        "last_attempt_at": now,
        "original_queue": envelope.queue,
        "cloudtasks_queue": meta.queue,
        "cloudtasks_task_name": meta.task_name,
        "task_id": envelope.task_id,
        "task_name": envelope.task_name,
        # A replay from the dead-letter queue that fails again: count, don't nest.
        "replays": _replays(envelope),
    }


class DeadLetterer:
    """Puts failed envelopes into the dead-letter queue (or the error log)."""

    def __init__(
        self,
        *,
        queue_id: str | None,
        queue_for: Callable[[str], TaskQueue],
        url_for: Callable[[str], str | None],
        oidc_for: Callable[[str], OidcToken | None],
        clock: Callable[[], float] = time.time,
        metrics: Any = None,
    ) -> None:
        self.queue_id = queue_id
        self.queue_for = queue_for
        self.url_for = url_for
        self.oidc_for = oidc_for
        self.clock = clock
        self.metrics = metrics

    def dead_letter(
        self,
        envelope: TaskEnvelope,
        meta: DeliveryMetadata,
        *,
        reason: str,
        failure: FailureInfo | None = None,
        fallback_url: str | None = None,
    ) -> DeadLetterOutcome:
        """Enqueue (or log) ``envelope`` as a dead letter; never raises."""
        info = dead_letter_info(envelope, meta, reason=reason, failure=failure, now=self.clock())
        dead = replace(envelope, dead_letter=info)
        outcome = self._enqueue(dead, meta, fallback_url)
        if self.metrics is not None:
            self.metrics.dead_lettered(self.queue_id or "", envelope.task_name)
        task_dead_lettered.send(
            sender=envelope.task_name,
            envelope=dead,
            reason=reason,
            queue=outcome.queue,
            enqueued=outcome.enqueued,
        )
        return outcome

    def _enqueue(
        self, dead: TaskEnvelope, meta: DeliveryMetadata, fallback_url: str | None
    ) -> DeadLetterOutcome:
        queue_id = self.queue_id
        if not queue_id:
            self._log(dead, "no dead_letter_queue is configured")
            return DeadLetterOutcome(False, None, None, dead)
        # One dead letter per Cloud Tasks task and attempt: a repeated delivery deduplicates.
        key = idempotency_key(
            "dead-letter", meta.task_name or dead.task_id or "-", meta.retry_count
        )
        try:
            url = self.url_for(queue_id) or fallback_url
            if not url:
                raise CloudTasksError("no push_url to give the dead-letter task")
            options = EnqueueOptions(idempotency_key=key, url=url, oidc=self.oidc_for(queue_id))
            result = self.queue_for(queue_id).enqueue(dead, options)
        except Exception as exc:  # the dead letter must at least reach the log
            self._log(dead, f"enqueue into {queue_id!r} failed: {exc!r}")
            return DeadLetterOutcome(False, queue_id, None, dead)
        logger.warning(
            "dead-lettered %s[%s] into %s as %s: %s",
            dead.task_name,
            dead.task_id,
            queue_id,
            result.task_name,
            _reason(dead),
            extra={"celery_task_id": dead.task_id, "cloudtasks_queue": queue_id},
        )
        return DeadLetterOutcome(True, queue_id, result.task_name, dead)

    @staticmethod
    def _log(dead: TaskEnvelope, why: str) -> None:
        logger.error(
            "dead letter for %s[%s] (%s) not stored (%s); envelope: %s",
            dead.task_name,
            dead.task_id,
            _reason(dead),
            why,
            json.dumps(dead.to_dict(), sort_keys=True, default=str),
            extra={"celery_task_id": dead.task_id},
        )


def _reason(dead: TaskEnvelope) -> str:
    info: Mapping[str, Any] = dead.dead_letter or {}
    return str(info.get("reason", ""))
