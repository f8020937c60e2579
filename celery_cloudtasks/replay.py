"""Dead letters in the dead-letter queue: list, replay, purge.

Behind ``celery -A proj cloudtasks dead-letters ...``. Replay re-enqueues a dead
letter into the queue it failed on as a *new* attempt: a fresh name
``{run}/{task}/{attempt}/replay/{n}`` (the failed name is inside Cloud Tasks' dedup
window), no ``dead_letter`` mapping, and the count in the Celery message header
:data:`~celery_cloudtasks.deadletter.REPLAYS_HEADER`; the dead-letter task is deleted
afterwards (where the server implements ``delete_task``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .admin import QueueAdmin, _int, _status
from .deadletter import REPLAYS_HEADER
from .dispatcher import CloudTasksDispatcher
from .envelope import TaskEnvelope
from .errors import CloudTasksError, ConfigurationError, EnqueueError, EnvelopeError
from .publisher import Publisher
from .types import EnqueueResult

__all__ = ["DeadLetter", "DeadLetterAdmin", "ReplayReport"]


@dataclass(frozen=True)
class DeadLetter:
    """A task in the dead-letter queue; ``envelope`` is None if its body is no envelope."""

    task_name: str
    envelope: TaskEnvelope | None
    info: Mapping[str, Any]
    error: str | None = None

    @property
    def short_name(self) -> str:
        return self.task_name.rsplit("/", 1)[-1]

    @property
    def replays(self) -> int:
        header = self.envelope.headers.get(REPLAYS_HEADER) if self.envelope else 0
        return max(_int(self.info.get("replays")), _int(header))


@dataclass(frozen=True)
class ReplayReport:
    """Replayed ``(dead-letter task, new task)`` pairs, failures, and undeleted dead letters."""

    replayed: tuple[tuple[DeadLetter, EnqueueResult], ...] = ()
    failed: tuple[tuple[DeadLetter, str], ...] = ()
    not_deleted: tuple[str, ...] = ()
    delete_error: str | None = None

    @property
    def complete(self) -> bool:
        return not self.failed and not self.not_deleted


class DeadLetterAdmin(QueueAdmin):
    """:class:`QueueAdmin` plus the dead-letter queue's contents."""

    @cached_property
    def _publisher(self) -> Publisher:
        return Publisher(self.settings)

    def dead_letter_queue(self, queue_id: str | None = None) -> str:
        queue_id = queue_id or self.settings.dead_letter_queue
        if not queue_id:
            raise ConfigurationError(
                "no dead-letter queue: set broker_transport_options['dead_letter_queue']"
            )
        return queue_id

    def list_dead_letters(
        self, limit: int | None = 100, *, queue_id: str | None = None
    ) -> list[DeadLetter]:
        """Dead letters, oldest first as Cloud Tasks lists them, at most ``limit``."""
        queue_id = self.dead_letter_queue(queue_id)
        page_size = 1000 if limit is None else max(1, min(limit, 1000))
        letters: list[DeadLetter] = []
        with self._api("read_tasks", queue_id):
            pager = self.client.list_tasks(
                request={
                    "parent": self._path(queue_id),
                    "page_size": page_size,
                    "response_view": "FULL",
                },
                timeout=self._timeout,
            )
            for task in pager:
                if limit is not None and len(letters) >= limit:
                    break
                letters.append(_dead_letter(task))
        return letters

    def replay_dead_letters(
        self,
        *,
        limit: int | None = None,
        only: Collection[str] | None = None,
        queue_id: str | None = None,
    ) -> ReplayReport:
        """Re-enqueue dead letters as new attempts into their queues, then delete them.

        ``only`` selects by dead-letter task ID or Celery task ID. A server without
        ``delete_task`` (the emulator) leaves the dead letters in place:
        ``not_deleted`` lists them and ``delete_error`` says why; replaying them
        again reuses the same replay names, which Cloud Tasks deduplicates.
        """
        letters = [
            letter
            for letter in self.list_dead_letters(None, queue_id=queue_id)
            if only is None
            or letter.short_name in only
            or (letter.envelope is not None and letter.envelope.task_id in only)
        ][:limit]
        replayed, failed, not_deleted = [], [], []
        delete_error: str | None = None
        can_delete = True
        for letter in letters:
            try:
                result = self._replay(letter)
            except CloudTasksError as exc:
                failed.append((letter, str(exc)))
                continue
            replayed.append((letter, result))
            if not can_delete:
                not_deleted.append(letter.task_name)
                continue
            try:
                with self._api("delete_task", self.dead_letter_queue(queue_id)):
                    self.client.delete_task(name=letter.task_name, timeout=self._timeout)
            except EnqueueError as exc:
                not_deleted.append(letter.task_name)
                delete_error = str(exc)
                if _status(exc) == "UNIMPLEMENTED":
                    can_delete = False
                    delete_error = (
                        "delete_task is not implemented by this Cloud Tasks server (the "
                        "emulator): the replayed dead letters are still in the queue; purge it "
                        "once the replays succeeded"
                    )
        return ReplayReport(tuple(replayed), tuple(failed), tuple(not_deleted), delete_error)

    def purge_dead_letters(self, *, queue_id: str | None = None) -> int:
        return self.purge(self.dead_letter_queue(queue_id))

    def _replay(self, letter: DeadLetter) -> EnqueueResult:
        envelope = letter.envelope
        if envelope is None:
            raise EnvelopeError(f"not a Celery task envelope, cannot replay: {letter.error}")
        replays = letter.replays + 1
        message = copy.deepcopy(dict(envelope.message))
        message["headers"][REPLAYS_HEADER] = replays
        original = str(letter.info.get("cloudtasks_queue") or "").rsplit("/", 1)[-1]
        prepared = self._publisher.prepare(
            envelope.queue,
            message,
            idempotency_key=f"{envelope.idempotency_key}/replay/{replays}",
            queue_id=original or None,
        )
        target = CloudTasksDispatcher(self.settings, prepared.queue_id, client=self.client)
        with self._api("create_task", prepared.queue_id):
            return target.enqueue(prepared.envelope, prepared.options)


def _dead_letter(task: Any) -> DeadLetter:
    body = task.http_request.body
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raw = None
    info = raw.get("dead_letter") if isinstance(raw, dict) else None
    info = info if isinstance(info, dict) else {}
    try:
        return DeadLetter(task.name, TaskEnvelope.from_json(body), info)
    except EnvelopeError as exc:
        return DeadLetter(task.name, None, info, str(exc))
