"""Cloud Tasks limits, checked before any RPC so a bad task fails early and clearly."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from .errors import PayloadTooLarge

__all__ = [
    "MAX_DISPATCH_DEADLINE",
    "MAX_SCHEDULE_AHEAD",
    "MAX_TASK_BYTES",
    "MIN_DISPATCH_DEADLINE",
    "check_task_size",
    "clamp_dispatch_deadline",
    "split_schedule_time",
]

#: Cloud Tasks rejects tasks over 1 MB (body, headers and URL together).
MAX_TASK_BYTES = 1_000_000
#: ``schedule_time`` may be at most 30 days ahead.
MAX_SCHEDULE_AHEAD = timedelta(days=30)
#: HTTP targets accept dispatch deadlines from 15 seconds to 30 minutes.
MIN_DISPATCH_DEADLINE = timedelta(seconds=15)
MAX_DISPATCH_DEADLINE = timedelta(minutes=30)
#: Room left for the task name, OIDC settings and protobuf framing.
_OVERHEAD_BYTES = 2_048


def check_task_size(
    body: bytes, url: str, headers: dict[str, str], *, task_name: str, limit: int = MAX_TASK_BYTES
) -> None:
    """Raise :class:`PayloadTooLarge` if the task would exceed ``limit`` bytes."""
    size = len(body) + len(url) + sum(len(k) + len(v) for k, v in headers.items()) + _OVERHEAD_BYTES
    if size > limit:
        raise PayloadTooLarge(
            f"task {task_name} is {size} bytes, over the Cloud Tasks limit of {limit} bytes; "
            "pass large data by reference (e.g. a Cloud Storage object name), not in the arguments",
            task_name=task_name,
        )


def clamp_dispatch_deadline(value: timedelta | None) -> timedelta | None:
    """Clamp a dispatch deadline into Cloud Tasks' accepted range (None stays None)."""
    if value is None:
        return None
    return max(MIN_DISPATCH_DEADLINE, min(MAX_DISPATCH_DEADLINE, value))


def split_schedule_time(
    eta: datetime | None, now: datetime | None = None
) -> tuple[datetime | None, bool]:
    """The schedule time to give Cloud Tasks, and whether the real ETA lies beyond it.

    ETAs past the 30-day horizon are scheduled at the horizon (minus a minute
    of slack); the envelope keeps the real ETA, and the push endpoint re-enqueues
    the task until it is due, so far ETAs are honoured rather than refused.
    """
    if eta is None:
        return None, False
    now = now or datetime.now(timezone.utc)
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    horizon = now + MAX_SCHEDULE_AHEAD - timedelta(minutes=1)
    if eta > horizon:
        return horizon, True
    return eta, False
