"""The :class:`~celery_cloudtasks.queue.TaskQueue` over Google Cloud Tasks (API v2).

This is the only module that imports ``google-cloud-tasks`` (and ``grpc``),
lazily: ``import celery_cloudtasks`` stays cheap, and without the ``gcp``
extra a :class:`ConfigurationError` names the extra to install.

Each enqueue creates one named HTTP task: ``POST`` to the push URL with the
JSON envelope as body, an OIDC token, ``schedule_time`` and
``dispatch_deadline``. ``AlreadyExists`` is a successful, deduplicated
enqueue. UNAVAILABLE and DEADLINE_EXCEEDED are retried with bounded
exponential backoff (safe: a retried named create cannot duplicate); every
other API error is translated once, in :func:`translate_api_error`.

gRPC clients are thread-safe and costly to build, so one client per emulator
host / credentials is kept per process, as are the queues whose retry policy
has been applied.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .envelope import TaskEnvelope
from .errors import (
    ConfigurationError,
    EnqueueError,
    PermissionDenied,
    QueueNotFound,
    TransientEnqueueError,
)
from .limits import check_task_size, clamp_dispatch_deadline
from .naming import task_id_for
from .settings import TransportSettings
from .types import EnqueueOptions, EnqueueResult, RetryConfig

__all__ = [
    "CloudTasksDispatcher",
    "make_client",
    "retry_config_to_api",
    "translate_api_error",
    "translated_errors",
]

logger = logging.getLogger(__name__)

_clients: dict[tuple[str, str | None], Any] = {}
_retry_applied: set[tuple[str, RetryConfig]] = set()
_lock = threading.Lock()


def make_client(emulator_host: str | None = None, *, version: str = "v2") -> Any:
    """A ``CloudTasksClient`` of API ``version`` (``v2``, or ``v2beta3`` for queue stats).

    Shared per process and per emulator host (gRPC clients are thread-safe and
    costly to build); an emulator is reached over an insecure channel.
    """
    key = (version, emulator_host)
    with _lock:
        if key in _clients:
            return _clients[key]
        try:
            api = importlib.import_module(f"google.cloud.tasks_{version}")
        except ImportError as exc:
            raise ConfigurationError(
                "CloudTasksDispatcher needs google-cloud-tasks: "
                "pip install 'celery-cloudtasks[gcp]'"
            ) from exc
        if emulator_host:
            import grpc
            from google.auth.credentials import AnonymousCredentials

            transports = importlib.import_module(
                f"google.cloud.tasks_{version}.services.cloud_tasks.transports"
            )
            transport = transports.CloudTasksGrpcTransport(
                channel=grpc.insecure_channel(emulator_host), credentials=AnonymousCredentials()
            )
            client = api.CloudTasksClient(transport=transport)
        else:
            client = api.CloudTasksClient()
        _clients[key] = client
        return client


@contextmanager
def translated_errors(queue: str, *, task_name: str | None = None) -> Iterator[None]:
    """Run Cloud Tasks calls, turning Google API errors into library errors."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        raise translate_api_error(exc, task_name=task_name, queue=queue) from exc


def translate_api_error(exc: Exception, *, task_name: str | None, queue: str) -> EnqueueError:
    """Map a google.api_core error to the library's error tree (the one boundary)."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.PermissionDenied):
        return PermissionDenied(
            f"permission denied on queue {queue}: the caller needs roles/cloudtasks.enqueuer "
            "(cloudtasks.tasks.create) and iam.serviceAccounts.actAs on the OIDC service "
            f"account ({exc.message})",
            task_name=task_name,
        )
    if isinstance(exc, gexc.NotFound) or (
        isinstance(exc, gexc.FailedPrecondition) and "does not exist" in str(exc.message)
    ):
        return QueueNotFound(
            f"Cloud Tasks queue {queue} does not exist; create it (celery cloudtasks queues sync)",
            task_name=task_name,
        )
    if isinstance(exc, (gexc.RetryError, gexc.ServiceUnavailable, gexc.DeadlineExceeded)):
        return TransientEnqueueError(
            f"Cloud Tasks unavailable for queue {queue} after retrying: {exc}",
            task_name=task_name,
        )
    if isinstance(exc, gexc.ResourceExhausted):
        return TransientEnqueueError(
            f"Cloud Tasks quota exhausted for queue {queue}: {exc.message}", task_name=task_name
        )
    message = getattr(exc, "message", None) or str(exc)
    return EnqueueError(
        f"Cloud Tasks refused task on queue {queue}: {type(exc).__name__}: {message}",
        task_name=task_name,
    )


class CloudTasksDispatcher:
    """One Cloud Tasks queue, reached through the official client."""

    def __init__(self, settings: TransportSettings, queue_id: str, *, client: Any = None) -> None:
        self.settings = settings
        self._queue_id = queue_id
        self.queue_path = settings.queue_path(queue_id)
        self._client = client
        self._stats_supported: bool | None = None
        self._create_retry: Any = None

    @property
    def queue_name(self) -> str:
        return self._queue_id

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.settings.emulator_host)
        return self._client

    def _retry(self) -> Any:
        if self._create_retry is not None:
            return self._create_retry
        from google.api_core import exceptions as gexc
        from google.api_core import retry as gretry

        self._create_retry = gretry.Retry(
            predicate=gretry.if_exception_type(gexc.ServiceUnavailable, gexc.DeadlineExceeded),
            initial=0.1,
            maximum=2.0,
            multiplier=2.0,
            timeout=self.settings.create_retry_deadline_seconds,
        )
        return self._create_retry

    def build_task(self, envelope: TaskEnvelope, options: EnqueueOptions) -> dict[str, Any]:
        """The ``Task`` (as a dict the client accepts) for this envelope."""
        task_id = task_id_for(options.idempotency_key)
        body = envelope.to_json()
        headers = {"Content-Type": "application/json", **dict(options.headers)}
        check_task_size(
            body, options.url, headers, task_name=task_id, limit=self.settings.max_task_bytes
        )
        http_request: dict[str, Any] = {
            "url": options.url,
            "http_method": "POST",
            "headers": headers,
            "body": body,
        }
        if options.oidc is not None:
            http_request["oidc_token"] = {
                "service_account_email": options.oidc.service_account_email,
                "audience": options.oidc.audience,
            }
        task: dict[str, Any] = {
            "name": f"{self.queue_path}/tasks/{task_id}",
            "http_request": http_request,
        }
        if options.schedule_time is not None:
            task["schedule_time"] = options.schedule_time
        deadline = clamp_dispatch_deadline(options.dispatch_deadline)
        if deadline is not None:
            task["dispatch_deadline"] = deadline
        return task

    def enqueue(self, envelope: TaskEnvelope, options: EnqueueOptions) -> EnqueueResult:
        from google.api_core import exceptions as gexc

        task = self.build_task(envelope, options)
        self.ensure_retry_config()
        started = time.perf_counter()
        deduplicated = False
        try:
            self.client.create_task(
                parent=self.queue_path,
                task=task,
                retry=self._retry(),
                timeout=self.settings.create_timeout_seconds,
            )
        except gexc.AlreadyExists:
            deduplicated = True
        except gexc.GoogleAPICallError as exc:
            raise translate_api_error(exc, task_name=task["name"], queue=self.queue_path) from exc
        except gexc.RetryError as exc:
            raise translate_api_error(exc, task_name=task["name"], queue=self.queue_path) from exc
        return EnqueueResult(
            task_name=task["name"],
            queue=self._queue_id,
            deduplicated=deduplicated,
            dispatch_latency_seconds=time.perf_counter() - started,
        )

    def ensure_retry_config(self) -> None:
        """Apply the configured retry policy to this queue once per process."""
        if not self.settings.apply_queue_retry_config:
            return
        key = (self.queue_path, self.settings.retry)
        with _lock:
            if key in _retry_applied:
                return
            _retry_applied.add(key)
        try:
            self.apply_retry_config(self.settings.retry)
        except PermissionDenied:
            logger.warning(
                "could not apply the retry policy to Cloud Tasks queue %s: the caller lacks "
                "cloudtasks.queues.update; publishing continues with the queue's own policy "
                "(set apply_queue_retry_config=False for queues managed elsewhere)",
                self.queue_path,
            )
        except EnqueueError:
            with _lock:
                _retry_applied.discard(key)
            raise

    def apply_retry_config(self, retry: RetryConfig) -> None:
        """``update_queue`` with a ``retry_config`` field mask (creates a missing queue)."""

        queue = {"name": self.queue_path, "retry_config": retry_config_to_api(retry)}
        with translated_errors(self.queue_path):
            self.client.update_queue(
                queue=queue,
                update_mask={"paths": ["retry_config"]},
                timeout=self.settings.create_timeout_seconds,
            )

    def queue_depth(self) -> int:
        """Estimated tasks in the queue (see :meth:`_count_tasks` for the fallback)."""
        if self._stats_supported is not False:
            depth = self._stats_depth()
            if depth is not None:
                return depth
        return self._count_tasks()

    def _stats_depth(self) -> int | None:
        from google.api_core import exceptions as gexc

        client = make_client(self.settings.emulator_host, version="v2beta3")
        try:
            queue = client.get_queue(
                request={"name": self.queue_path, "read_mask": {"paths": ["name", "stats"]}},
                timeout=self.settings.create_timeout_seconds,
            )
        except (gexc.MethodNotImplemented, gexc.Unknown, gexc.InvalidArgument):
            self._stats_supported = False
            return None
        except gexc.GoogleAPICallError as exc:
            raise translate_api_error(exc, task_name=None, queue=self.queue_path) from exc
        self._stats_supported = True
        return int(queue.stats.tasks_count)

    def _count_tasks(self) -> int:
        """Count ``list_tasks`` pages (1000 per page), at most ``queue_depth_max_pages``."""

        count = 0
        with translated_errors(self.queue_path):
            pager = self.client.list_tasks(
                request={"parent": self.queue_path, "page_size": 1000, "response_view": "BASIC"},
                timeout=self.settings.create_timeout_seconds,
            )
            for pages, page in enumerate(pager.pages, start=1):
                count += len(page.tasks)
                if pages >= self.settings.queue_depth_max_pages:
                    break
        return count

    def purge(self) -> int:
        from google.api_core import exceptions as gexc

        depth = self._count_tasks()
        try:
            self.client.purge_queue(
                name=self.queue_path, timeout=self.settings.create_timeout_seconds
            )
        except gexc.GoogleAPICallError as exc:
            raise translate_api_error(exc, task_name=None, queue=self.queue_path) from exc
        return depth


def retry_config_to_api(retry: RetryConfig) -> dict[str, Any]:
    """Our :class:`RetryConfig` as the API's ``RetryConfig`` mapping."""
    return {
        "max_attempts": retry.max_attempts,
        "min_backoff": retry.min_backoff,
        "max_backoff": retry.max_backoff,
        "max_retry_duration": retry.max_retry_duration,
        "max_doublings": retry.max_doublings,
    }
