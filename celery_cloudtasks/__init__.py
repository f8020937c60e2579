"""Run Celery applications on Google Cloud Tasks.

``import celery_cloudtasks`` registers the ``cloudtasks://`` kombu transport;
it does not import google-cloud-tasks, google-auth or Flask (each is imported
by the one module that needs it, when used).
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from .batch import dispatch_batch
from .envelope import TaskEnvelope
from .errors import (
    BatchEnqueueError,
    CloudTasksError,
    ConfigurationError,
    EnqueueError,
    EnvelopeError,
    ForbiddenIdentity,
    InvalidToken,
    MissingToken,
    OidcError,
    PayloadTooLarge,
    PermissionDenied,
    QueueNotFound,
    RoutingError,
    TransientEnqueueError,
    UnsupportedOperation,
)
from .memory import InMemoryCloudTasks, InMemoryTaskQueue, ManualClock
from .naming import idempotency_key, task_id_for
from .queue import TaskQueue
from .routing import TenantRouter
from .types import EnqueueOptions, EnqueueResult, OidcToken, RetryConfig

__version__ = "0.1.0"

__all__ = [
    "BatchEnqueueError",
    "CloudTasksDispatcher",
    "CloudTasksError",
    "ConfigurationError",
    "EnqueueError",
    "EnqueueOptions",
    "EnqueueResult",
    "EnvelopeError",
    "ForbiddenIdentity",
    "InMemoryCloudTasks",
    "InMemoryTaskQueue",
    "InvalidToken",
    "ManualClock",
    "MissingToken",
    "OidcError",
    "OidcToken",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueueNotFound",
    "RetryConfig",
    "RoutingError",
    "TaskEnvelope",
    "TaskQueue",
    "TenantRouter",
    "TransientEnqueueError",
    "UnsupportedOperation",
    "__version__",
    "dispatch_batch",
    "idempotency_key",
    "task_id_for",
]

TRANSPORT_ALIASES.setdefault("cloudtasks", "celery_cloudtasks.transport:Transport")


def __getattr__(name: str) -> object:
    # CloudTasksDispatcher's module is cheap, but keep the door shut on google imports.
    if name == "CloudTasksDispatcher":
        from .dispatcher import CloudTasksDispatcher

        return CloudTasksDispatcher
    raise AttributeError(f"module 'celery_cloudtasks' has no attribute {name!r}")
