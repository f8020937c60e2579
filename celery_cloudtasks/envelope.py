"""The JSON envelope that travels as the body of each Cloud Tasks HTTP task.

It carries the kombu message exactly as Celery produced it (``body`` stays
base64 of the serialized payload, with its ``content-type``), the Celery queue,
and the times the endpoint needs to apply the queue's retry policy. Only JSON
is ever parsed here; the Celery body inside is decoded later with an explicit
accept list (:mod:`celery_cloudtasks.execution`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import EnvelopeError
from .naming import key_for_headers

__all__ = ["ENVELOPE_VERSION", "TaskEnvelope"]

ENVELOPE_VERSION = 1
_MESSAGE_KEYS = ("body", "content-type", "content-encoding", "headers", "properties")


@dataclass(frozen=True)
class TaskEnvelope:
    """One Celery task message on its way through Cloud Tasks.

    ``published_at`` is when this attempt was handed to Cloud Tasks and
    ``scheduled_at`` its earliest delivery (both epoch seconds); the first
    dispatch is the later of the two. ``dead_letter`` is set only on envelopes
    stored in a dead-letter queue and describes the failure.
    """

    message: Mapping[str, Any]
    queue: str
    published_at: float = field(default_factory=time.time)
    scheduled_at: float | None = None
    dead_letter: Mapping[str, Any] | None = None
    version: int = ENVELOPE_VERSION

    @property
    def headers(self) -> Mapping[str, Any]:
        headers = self.message.get("headers") or {}
        return headers if isinstance(headers, Mapping) else {}

    @property
    def task_id(self) -> str:
        return str(self.headers.get("id") or "")

    @property
    def task_name(self) -> str:
        return str(self.headers.get("task") or "")

    @property
    def root_id(self) -> str:
        return str(self.headers.get("root_id") or self.task_id)

    @property
    def retries(self) -> int:
        value = self.headers.get("retries") or 0
        return value if isinstance(value, int) and value >= 0 else 0

    @property
    def idempotency_key(self) -> str:
        """The key naming this attempt's Cloud Tasks task (see :mod:`.naming`)."""
        return key_for_headers(self.headers)

    @property
    def first_dispatch_at(self) -> float:
        return max(self.published_at, self.scheduled_at or 0.0)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "v": self.version,
            "queue": self.queue,
            "published_at": self.published_at,
            "scheduled_at": self.scheduled_at,
            "message": dict(self.message),
        }
        if self.dead_letter is not None:
            data["dead_letter"] = dict(self.dead_letter)
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> TaskEnvelope:
        """Parse and validate; any problem is an :class:`EnvelopeError`."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise EnvelopeError(f"body is not JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> TaskEnvelope:
        if not isinstance(raw, dict):
            raise EnvelopeError("envelope must be a JSON object")
        if raw.get("v") != ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {raw.get('v')!r}")
        message = raw.get("message")
        if not isinstance(message, dict) or not all(k in message for k in _MESSAGE_KEYS):
            raise EnvelopeError(f"envelope.message must be an object with keys {_MESSAGE_KEYS}")
        if not isinstance(message["body"], str):
            raise EnvelopeError("envelope.message.body must be a string")
        if not isinstance(message["headers"], dict) or not isinstance(message["properties"], dict):
            raise EnvelopeError("envelope.message headers and properties must be objects")
        for key in ("content-type", "content-encoding"):
            if message[key] is not None and not isinstance(message[key], str):
                raise EnvelopeError(f"envelope.message.{key} must be a string")
        headers = message["headers"]
        if not isinstance(headers.get("id"), str) or not isinstance(headers.get("task"), str):
            raise EnvelopeError("not a Celery task message (headers.id / headers.task missing)")
        queue = raw.get("queue")
        if not isinstance(queue, str):
            raise EnvelopeError("envelope.queue must be a string")
        published_at = raw.get("published_at")
        scheduled_at = raw.get("scheduled_at")
        if not isinstance(published_at, (int, float)) or isinstance(published_at, bool):
            raise EnvelopeError("envelope.published_at must be a number")
        if scheduled_at is not None and (
            not isinstance(scheduled_at, (int, float)) or isinstance(scheduled_at, bool)
        ):
            raise EnvelopeError("envelope.scheduled_at must be a number or null")
        dead_letter = raw.get("dead_letter")
        if dead_letter is not None and not isinstance(dead_letter, dict):
            raise EnvelopeError("envelope.dead_letter must be an object")
        return cls(
            message=message,
            queue=queue,
            published_at=float(published_at),
            scheduled_at=None if scheduled_at is None else float(scheduled_at),
            dead_letter=dead_letter,
        )
