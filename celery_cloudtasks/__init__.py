"""Run Celery applications on Google Cloud Tasks.

``import celery_cloudtasks`` registers the ``cloudtasks://`` kombu transport;
it does not import google-cloud-tasks, google-auth or Flask (each is imported
by the one module that needs it, when used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kombu.transport import TRANSPORT_ALIASES

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


# Everything but the errors is imported on first use: a Celery app that only needs
# the transport registered pays for nothing else at start-up.
_LAZY = {
    "CloudTasksDispatcher": "dispatcher",
    "EnqueueOptions": "types",
    "EnqueueResult": "types",
    "InMemoryCloudTasks": "memory",
    "InMemoryTaskQueue": "memory",
    "ManualClock": "memory",
    "OidcToken": "types",
    "RetryConfig": "types",
    "TaskEnvelope": "envelope",
    "TaskQueue": "queue",
    "TenantRouter": "routing",
    "dispatch_batch": "batch",
    "idempotency_key": "naming",
    "task_id_for": "naming",
}


def __getattr__(name: str) -> object:
    """Names whose modules only some programs need, imported on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_cloudtasks' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


if TYPE_CHECKING:
    from .batch import dispatch_batch
    from .dispatcher import CloudTasksDispatcher
    from .envelope import TaskEnvelope
    from .memory import InMemoryCloudTasks, InMemoryTaskQueue, ManualClock
    from .naming import idempotency_key, task_id_for
    from .queue import TaskQueue
    from .routing import TenantRouter
    from .types import EnqueueOptions, EnqueueResult, OidcToken, RetryConfig
