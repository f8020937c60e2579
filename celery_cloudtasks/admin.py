"""Queue administration over Cloud Tasks v2: inspect, sync, pause, purge, dead letters.

Behind ``celery -A proj cloudtasks queues|dead-letters ...`` (:mod:`.cli`), usable alone::

    admin = QueueAdmin(TransportSettings.from_celery(app))
    plan = admin.plan_sync(desired_queues(app, admin.settings))
    admin.apply_sync(plan)

Every RPC runs inside :func:`~celery_cloudtasks.dispatcher.translated_errors` (the one
place Google errors are translated; google-cloud-tasks is imported only there): plain
dicts go in, fields are read off the returned objects. On top of that translation:

* a missing queue is always :class:`QueueNotFound`, also where a server answers
  UNKNOWN or FAILED_PRECONDITION (the emulator) rather than NOT_FOUND;
* :class:`PermissionDenied` names the IAM permission the operation needs.

Sync manages the retry policy (``retry``, unless ``apply_queue_retry_config`` is
False), rate limits given explicitly, and keeps the dead-letter queue PAUSED. Dead
letters are listed and replayed by :mod:`celery_cloudtasks.replay`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .dispatcher import CloudTasksDispatcher, make_client, retry_config_to_api, translated_errors
from .errors import (
    CloudTasksError,
    EnqueueError,
    PermissionDenied,
    QueueNotFound,
    TransientEnqueueError,
)
from .routing import QueueRouter, TenantRouter
from .settings import TransportSettings
from .types import RetryConfig

__all__ = [
    "DesiredQueue",
    "FieldChange",
    "QueueAdmin",
    "QueueChange",
    "QueueInfo",
    "SyncPlan",
    "desired_queues",
]

#: Celery message header counting how often a task was replayed from dead letters.
RETRY_FIELDS = ("max_attempts", "min_backoff", "max_backoff", "max_retry_duration", "max_doublings")
RATE_FIELDS = ("max_dispatches_per_second", "max_concurrent_dispatches")
_PERMISSIONS = {
    "list_queues": ("cloudtasks.queues.list", "roles/cloudtasks.viewer"),
    "get_queue": ("cloudtasks.queues.get", "roles/cloudtasks.viewer"),
    "create_queue": ("cloudtasks.queues.create", "roles/cloudtasks.queueAdmin"),
    "update_queue": ("cloudtasks.queues.update", "roles/cloudtasks.queueAdmin"),
    "pause_queue": ("cloudtasks.queues.pause", "roles/cloudtasks.queueAdmin"),
    "resume_queue": ("cloudtasks.queues.resume", "roles/cloudtasks.queueAdmin"),
    "purge_queue": ("cloudtasks.queues.purge", "roles/cloudtasks.queueAdmin"),
    "depth": ("cloudtasks.queues.get and cloudtasks.tasks.list", "roles/cloudtasks.viewer"),
    "read_tasks": ("cloudtasks.tasks.list and cloudtasks.tasks.fullView", "roles/cloudtasks.admin"),
    "delete_task": ("cloudtasks.tasks.delete", "roles/cloudtasks.taskDeleter"),
}


@dataclass(frozen=True)
class QueueInfo:
    """A queue as Cloud Tasks reports it; ``settings`` values are None when not reported."""

    queue_id: str
    path: str
    state: str
    settings: Mapping[str, Any]
    depth: int | None = None


@dataclass(frozen=True)
class DesiredQueue:
    """A queue the configuration asks for; None settings are left alone."""

    queue_id: str
    source: str
    retry: RetryConfig | None = None
    max_dispatches_per_second: float | None = None
    max_concurrent_dispatches: int | None = None
    paused: bool = False

    def wanted(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self.retry is not None:
            values.update(retry_config_to_api(self.retry))
        if self.max_dispatches_per_second is not None:
            values["max_dispatches_per_second"] = float(self.max_dispatches_per_second)
        if self.max_concurrent_dispatches is not None:
            values["max_concurrent_dispatches"] = int(self.max_concurrent_dispatches)
        if self.paused:
            values["state"] = "PAUSED"
        return values


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class QueueChange:
    """``action`` is ``create``, ``update`` or ``unchanged``."""

    desired: DesiredQueue
    action: str
    changes: tuple[FieldChange, ...] = ()


@dataclass(frozen=True)
class SyncPlan:
    changes: tuple[QueueChange, ...]

    @property
    def pending(self) -> tuple[QueueChange, ...]:
        return tuple(c for c in self.changes if c.action != "unchanged")


def desired_queues(
    app: Any,
    settings: TransportSettings,
    *,
    extra: Iterable[str] = (),
    max_dispatches_per_second: float | None = None,
    max_concurrent_dispatches: int | None = None,
) -> list[DesiredQueue]:
    """Cloud Tasks queues the app's configuration routes to, plus ``extra`` Celery queues.

    Celery queues come from ``task_default_queue``, ``task_queues``, ``task_routes``
    (static routes; :class:`TenantRouter` with ``allowed`` tenants) and ``queue_map``;
    other routers' queues need ``extra``. Each is mapped as the transport maps it,
    with its ``priority_queues`` variants. The dead-letter queue is wanted PAUSED.
    """
    conf = app.conf
    sources: dict[str, str] = {str(conf.task_default_queue or "celery"): "task_default_queue"}
    for queue in conf.task_queues or ():
        sources.setdefault(str(getattr(queue, "name", queue)), "task_queues")
    for name in _route_queues(conf.task_routes):
        sources.setdefault(name, "task_routes")
    for name in settings.queue_map:
        sources.setdefault(name, "queue_map")
    for name in extra:
        sources.setdefault(name, "--queue")
    router = QueueRouter(settings)
    retry = settings.retry if settings.apply_queue_retry_config else None
    wanted: dict[str, DesiredQueue] = {}
    for name, source in sources.items():
        for priority in (None, *sorted(settings.priority_queues)):
            queue_id = router.queue_id(name, priority)
            label = source if priority is None else f"{source}, priority >= {priority}"
            wanted.setdefault(
                queue_id,
                DesiredQueue(
                    queue_id,
                    label,
                    retry=retry,
                    max_dispatches_per_second=max_dispatches_per_second,
                    max_concurrent_dispatches=max_concurrent_dispatches,
                ),
            )
    if settings.dead_letter_queue:
        dlq = settings.dead_letter_queue
        wanted[dlq] = DesiredQueue(dlq, "dead_letter_queue", paused=True)
    return list(wanted.values())


def _route_queues(routes: Any) -> list[str]:
    """Queue names of ``task_routes``: static routes, and TenantRouters with ``allowed``."""
    if isinstance(routes, TenantRouter):
        tenants = sorted(routes.allowed or ())
        names = [routes.queue_template.format(tenant=tenant) for tenant in tenants]
        return names + ([routes.default_queue] if routes.default_queue else [])
    if isinstance(routes, Mapping):
        names = []
        for route in routes.values():
            queue = route.get("queue") if isinstance(route, Mapping) else route
            queue = getattr(queue, "name", queue)
            if isinstance(queue, str):
                names.append(queue)
        return names
    if isinstance(routes, (list, tuple)):
        if len(routes) == 2 and isinstance(routes[0], str) and isinstance(routes[1], Mapping):
            return _route_queues({routes[0]: routes[1]})
        return [name for item in routes for name in _route_queues(item)]
    return []  # router objects and import paths: pass their queues with --queue


class QueueAdmin:
    """Administers the Cloud Tasks queues of one project and location."""

    def __init__(self, settings: TransportSettings, client: Any = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.settings.emulator_host)
        return self._client

    @property
    def _timeout(self) -> float:
        return self.settings.create_timeout_seconds

    # -- queues -------------------------------------------------------------------------

    def list_queues(self) -> list[QueueInfo]:
        """Queues in ``projects/P/locations/L`` (no depth: that costs a call each)."""
        parent = self.settings.parent
        with self._api("list_queues"):
            queues = list(self.client.list_queues(parent=parent, timeout=self._timeout))
        # The emulator matches the parent as a string prefix: keep exact children only.
        return sorted(
            (_info(q) for q in queues if q.name.startswith(parent + "/queues/")),
            key=lambda info: info.queue_id,
        )

    def exists(self, queue_id: str) -> bool:
        return any(info.queue_id == queue_id for info in self.list_queues())

    def describe(self, queue_id: str, *, depth: bool = True) -> QueueInfo:
        """Settings and state, with the depth estimate of ``CloudTasksDispatcher.queue_depth``."""
        with self._api("get_queue", queue_id):
            info = _info(self.client.get_queue(name=self._path(queue_id), timeout=self._timeout))
        if not depth:
            return info
        with self._api("depth", queue_id):
            count = CloudTasksDispatcher(self.settings, queue_id, client=self.client).queue_depth()
        return QueueInfo(info.queue_id, info.path, info.state, info.settings, count)

    def pause(self, queue_id: str) -> QueueInfo:
        with self._api("pause_queue", queue_id):
            return _info(self.client.pause_queue(name=self._path(queue_id), timeout=self._timeout))

    def resume(self, queue_id: str) -> QueueInfo:
        with self._api("resume_queue", queue_id):
            queue = self.client.resume_queue(name=self._path(queue_id), timeout=self._timeout)
        return _info(queue)

    def purge(self, queue_id: str) -> int:
        """Delete every task of the queue; returns how many were counted just before."""
        with self._api("depth", queue_id):
            count = CloudTasksDispatcher(self.settings, queue_id, client=self.client).queue_depth()
        with self._api("purge_queue", queue_id):
            self.client.purge_queue(name=self._path(queue_id), timeout=self._timeout)
        return count

    # -- sync ---------------------------------------------------------------------------

    def plan_sync(self, desired: Iterable[DesiredQueue]) -> SyncPlan:
        """What :meth:`apply_sync` would change to make the queues match ``desired``."""
        current = {info.queue_id: info for info in self.list_queues()}
        plan = []
        for want in desired:
            have = current.get(want.queue_id)
            if have is None:
                fields = tuple(FieldChange(k, None, v) for k, v in want.wanted().items())
                plan.append(QueueChange(want, "create", fields))
                continue
            old_values = {**have.settings, "state": have.state}
            fields = tuple(
                FieldChange(k, old_values.get(k), v)
                for k, v in want.wanted().items()
                if old_values.get(k) != v
            )
            plan.append(QueueChange(want, "update" if fields else "unchanged", fields))
        return SyncPlan(tuple(plan))

    def apply_sync(self, plan: SyncPlan) -> list[QueueChange]:
        """Create and update queues as planned; returns the changes made, in order."""
        done = []
        for change in plan.pending:
            want = change.desired
            if change.action == "create":
                self._create(want)
            else:
                self._update(want, {c.field for c in change.changes})
            done.append(change)
        return done

    def _create(self, want: DesiredQueue) -> None:
        queue: dict[str, Any] = {"name": self._path(want.queue_id)}
        if want.retry is not None:
            queue["retry_config"] = retry_config_to_api(want.retry)
        rates = {k: v for k, v in want.wanted().items() if k in RATE_FIELDS}
        if rates:
            queue["rate_limits"] = rates
        with self._api("create_queue"):
            self.client.create_queue(
                parent=self.settings.parent, queue=queue, timeout=self._timeout
            )
        if want.paused:
            self.pause(want.queue_id)

    def _update(self, want: DesiredQueue, fields: Collection[str]) -> None:
        wanted = want.wanted()
        queue: dict[str, Any] = {"name": self._path(want.queue_id)}
        paths = []
        if want.retry is not None and set(fields) & set(RETRY_FIELDS):
            queue["retry_config"] = retry_config_to_api(want.retry)
            paths.append("retry_config")
        rates = {k: wanted[k] for k in RATE_FIELDS if k in fields}
        if rates:
            queue["rate_limits"] = rates
            paths.extend(f"rate_limits.{k}" for k in rates)
        if paths:
            with self._api("update_queue", want.queue_id):
                self.client.update_queue(
                    queue=queue, update_mask={"paths": paths}, timeout=self._timeout
                )
        if "state" in fields:
            self.pause(want.queue_id) if want.paused else self.resume(want.queue_id)

    # -- errors -------------------------------------------------------------------------

    def _path(self, queue_id: str) -> str:
        return self.settings.queue_path(queue_id)

    @contextmanager
    def _api(self, operation: str, queue_id: str | None = None) -> Iterator[None]:
        """Translated errors, a QueueNotFound for missing queues, permissions named."""
        where = self._path(queue_id) if queue_id else self.settings.parent
        try:
            with translated_errors(where):
                yield
        except PermissionDenied as exc:
            if operation not in _PERMISSIONS:  # create_task: the dispatcher names them
                raise
            permission, role = _PERMISSIONS[operation]
            detail = getattr(exc.__cause__, "message", None) or ""
            raise PermissionDenied(
                f"permission denied for {operation} on {where}: the caller needs the IAM "
                f"permission {permission} (e.g. role {role}). {detail}".rstrip()
            ) from exc
        except (QueueNotFound, TransientEnqueueError):
            raise
        except EnqueueError as exc:
            if queue_id is not None and operation != "create_task" and self._missing(queue_id):
                raise QueueNotFound(
                    f"Cloud Tasks queue {queue_id!r} does not exist in {self.settings.parent}; "
                    "create it with `celery -A proj cloudtasks queues sync`"
                ) from exc
            raise

    def _missing(self, queue_id: str) -> bool:
        try:
            return not self.exists(queue_id)
        except CloudTasksError:
            return False


def _status(exc: BaseException) -> str | None:
    """The gRPC status name of the Google error behind a translated error."""
    return getattr(getattr(exc.__cause__, "grpc_status_code", None), "name", None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _has(message: Any, name: str) -> bool:
    try:
        return name in message
    except TypeError:
        return True


def _info(queue: Any) -> QueueInfo:
    values: dict[str, Any] = dict.fromkeys(RETRY_FIELDS + RATE_FIELDS)
    if _has(queue, "retry_config"):
        values.update({k: getattr(queue.retry_config, k) for k in RETRY_FIELDS})
    if _has(queue, "rate_limits"):
        values.update({k: getattr(queue.rate_limits, k) for k in RATE_FIELDS})
    for key in ("min_backoff", "max_backoff", "max_retry_duration"):
        if isinstance(values[key], (int, float)):
            values[key] = timedelta(seconds=values[key])
    state = getattr(queue.state, "name", str(queue.state))
    return QueueInfo(queue.name.rsplit("/", 1)[-1], queue.name, state, values)
