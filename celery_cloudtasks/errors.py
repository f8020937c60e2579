"""The one error tree of celery-cloudtasks.

Every error the library raises on purpose derives from :class:`CloudTasksError`;
Google API errors are translated into it at one boundary
(:func:`celery_cloudtasks.dispatcher.translate_api_error`)::

    CloudTasksError
    ├── ConfigurationError        settings missing, contradictory, or an extra not installed
    ├── UnsupportedOperation      remote control, events, rpc:// results, consuming
    ├── RoutingError              a message cannot be routed (bad tenant, unbound exchange)
    ├── EnqueueError              a task could not be created (carries the task name)
    │   ├── PayloadTooLarge       the envelope is over the Cloud Tasks size limit (no RPC made)
    │   ├── QueueNotFound         the Cloud Tasks queue does not exist
    │   ├── PermissionDenied      the caller lacks an IAM permission (named in the message)
    │   ├── TransientEnqueueError still unavailable after the bounded retries
    │   └── BatchEnqueueError     some tasks of a concurrent batch failed (lists which)
    ├── EnvelopeError             a push body is not a valid celery-cloudtasks envelope
    └── OidcError                 a push request's identity could not be established
        ├── MissingToken          no bearer token (HTTP 401)
        ├── InvalidToken          bad signature, expired, wrong audience or issuer (HTTP 401)
        └── ForbiddenIdentity     valid token, but not an allowed service account (HTTP 403)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BatchEnqueueError",
    "CloudTasksError",
    "ConfigurationError",
    "EnqueueError",
    "EnvelopeError",
    "ForbiddenIdentity",
    "InvalidToken",
    "MissingToken",
    "OidcError",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueNotFound",
    "RoutingError",
    "TransientEnqueueError",
    "UnsupportedOperation",
]


class CloudTasksError(Exception):
    """Root of every error raised by celery-cloudtasks."""


class ConfigurationError(CloudTasksError):
    """A setting is missing or invalid, or an optional extra is not installed."""


class UnsupportedOperation(CloudTasksError):
    """The operation needs a broker feature Cloud Tasks does not have."""


class RoutingError(CloudTasksError):
    """A message cannot be routed to a queue; nothing was published."""


class EnqueueError(CloudTasksError):
    """A task could not be created in Cloud Tasks."""

    def __init__(self, message: str, *, task_name: str | None = None) -> None:
        super().__init__(message)
        self.task_name = task_name


class PayloadTooLarge(EnqueueError):
    """The envelope exceeds the Cloud Tasks task size limit; nothing was sent."""


class QueueNotFound(EnqueueError):
    """The target Cloud Tasks queue does not exist."""


class PermissionDenied(EnqueueError):
    """The caller lacks an IAM permission for this operation."""


class TransientEnqueueError(EnqueueError):
    """Cloud Tasks stayed unavailable for the whole retry budget."""


class BatchEnqueueError(EnqueueError):
    """Some tasks of a concurrent dispatch failed.

    ``enqueued`` lists the task names that exist in Cloud Tasks (created or
    deduplicated); ``failed`` maps each idempotency key whose enqueue did not
    succeed to its error (after a timeout the task may still have been created).
    Re-dispatching the whole batch is safe: names are idempotent.
    """

    def __init__(
        self,
        message: str,
        *,
        enqueued: Sequence[str],
        failed: dict[str, BaseException],
    ) -> None:
        super().__init__(message)
        self.enqueued = list(enqueued)
        self.failed = dict(failed)


class EnvelopeError(CloudTasksError):
    """A push request body is not a valid, acceptable envelope."""


class OidcError(CloudTasksError):
    """The identity of a push request could not be established."""

    status_code = 401


class MissingToken(OidcError):
    """The request carries no ``Authorization: Bearer`` token."""


class InvalidToken(OidcError):
    """The token is malformed, badly signed, expired, or for another audience/issuer."""


class ForbiddenIdentity(OidcError):
    """The token is valid but its service account is not allowed."""

    status_code = 403
