"""Frozen value types shared by every part of the library.

Durations are :class:`datetime.timedelta` (or ``*_seconds`` floats where a
plain number is the natural unit, such as a measured latency).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .errors import ConfigurationError

__all__ = ["EnqueueOptions", "EnqueueResult", "OidcToken", "RetryConfig"]


def _as_timedelta(name: str, value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return timedelta(seconds=value)
    raise ConfigurationError(
        f"retry.{name} must be seconds (a number) or a timedelta, got {value!r}"
    )


@dataclass(frozen=True)
class RetryConfig:
    """A Cloud Tasks queue retry policy.

    ``max_attempts`` counts the first attempt (-1 means unlimited). Retrying
    stops only when both ``max_attempts`` and ``max_retry_duration`` are
    reached (a zero duration means no duration limit). Backoff starts at
    ``min_backoff``, doubles ``max_doublings`` times, then grows linearly, and
    is capped at ``max_backoff``.
    """

    max_attempts: int = 5
    min_backoff: timedelta = timedelta(seconds=10)
    max_backoff: timedelta = timedelta(seconds=300)
    max_retry_duration: timedelta = timedelta(seconds=3600)
    max_doublings: int = 16

    def __post_init__(self) -> None:
        if self.max_attempts == 0 or self.max_attempts < -1:
            raise ConfigurationError("retry.max_attempts must be >= 1, or -1 for unlimited")
        if self.min_backoff < timedelta(0) or self.max_backoff < self.min_backoff:
            raise ConfigurationError("retry backoff must satisfy 0 <= min_backoff <= max_backoff")
        if self.max_retry_duration < timedelta(0):
            raise ConfigurationError("retry.max_retry_duration must be >= 0")
        if self.max_doublings < 0:
            raise ConfigurationError("retry.max_doublings must be >= 0")

    @classmethod
    def from_value(cls, value: RetryConfig | Mapping[str, Any] | None) -> RetryConfig:
        """Build from a ``RetryConfig``, a mapping of seconds (as in settings), or None."""
        if value is None:
            return cls()
        if isinstance(value, RetryConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"retry must be a mapping, got {type(value).__name__}")
        unknown = set(value) - {
            "max_attempts",
            "min_backoff",
            "max_backoff",
            "max_retry_duration",
            "max_doublings",
        }
        if unknown:
            raise ConfigurationError(f"unknown retry settings: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key in ("min_backoff", "max_backoff", "max_retry_duration"):
            if key in value:
                kwargs[key] = _as_timedelta(key, value[key])
        for key in ("max_attempts", "max_doublings"):
            if key in value:
                if not isinstance(value[key], int) or isinstance(value[key], bool):
                    raise ConfigurationError(f"retry.{key} must be an integer")
                kwargs[key] = value[key]
        return cls(**kwargs)

    def backoff(self, retry_count: int) -> timedelta:
        """Delay Cloud Tasks waits before attempt ``retry_count + 1`` (0-based retries)."""
        if retry_count <= 0:
            return self.min_backoff
        retry_count = min(retry_count, 1_000_000)  # forged headers must not overflow
        doublings = min(retry_count - 1, self.max_doublings)
        base = self.min_backoff.total_seconds()
        delay = base * 2.0**doublings
        if retry_count - 1 > self.max_doublings:
            delay += base * 2.0**self.max_doublings * (retry_count - 1 - self.max_doublings)
        return min(timedelta(seconds=delay), self.max_backoff)

    def is_final_attempt(self, retry_count: int, elapsed: timedelta) -> bool:
        """Whether Cloud Tasks would give up if the attempt numbered ``retry_count`` fails.

        ``elapsed`` is the time since the first dispatch. Errs towards "final"
        by counting the next backoff into the duration: ending a little early
        dead-letters a task that could still have been retried (replayable),
        whereas answering 5xx on a real last attempt would lose it.
        """
        attempts_done = retry_count + 1
        attempts_reached = self.max_attempts != -1 and attempts_done >= self.max_attempts
        if self.max_retry_duration == timedelta(0):
            duration_reached = True
        else:
            duration_reached = elapsed + self.backoff(attempts_done) >= self.max_retry_duration
        return attempts_reached and duration_reached


@dataclass(frozen=True)
class OidcToken:
    """Ask Cloud Tasks to sign each delivery with an OIDC token for this account."""

    service_account_email: str
    audience: str


@dataclass(frozen=True)
class EnqueueOptions:
    """How one envelope becomes a Cloud Tasks task.

    ``idempotency_key`` (``{run_id}/{task_id}/{attempt}``) becomes the task
    name; two enqueues with the same key create one task.
    """

    idempotency_key: str
    url: str
    schedule_time: datetime | None = None
    dispatch_deadline: timedelta | None = None
    oidc: OidcToken | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EnqueueResult:
    """What an enqueue did: the task name, its queue, and whether it already existed."""

    task_name: str
    queue: str
    deduplicated: bool
    dispatch_latency_seconds: float
