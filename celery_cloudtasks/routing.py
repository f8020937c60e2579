"""From a Celery message to a Cloud Tasks queue ID.

Order of precedence, highest first:

1. ``apply_async(cloudtasks_queue="queue-id")``: a Cloud Tasks queue ID, used as is.
2. The Celery queue chosen by Celery's own routing (``queue=``, ``task_routes``,
   :class:`TenantRouter` in ``task_routes``), mapped by ``queue_map``, else
   ``queue_name_prefix`` + the name with ``_`` and ``.`` turned into ``-``.
3. ``priority_queues`` (``{threshold: suffix}``): a message whose priority is at
   least a threshold goes to ``<queue id>-<suffix>`` of the highest such
   threshold. Priorities follow AMQP: a higher number is more urgent. Cloud
   Tasks has no priorities within a queue, so this is the only way to get them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from .errors import ConfigurationError, RoutingError
from .naming import queue_id_for
from .settings import TransportSettings

__all__ = ["QueueRouter", "TenantRouter"]


class QueueRouter:
    """Maps Celery queue names (and priorities) to Cloud Tasks queue IDs; caches results."""

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings
        self._thresholds = sorted(settings.priority_queues.items(), reverse=True)
        self._cache: dict[tuple[str, int], str] = {}
        for suffix in settings.priority_queues.values():
            if not re.fullmatch(r"[A-Za-z0-9-]{1,40}", suffix):
                raise ConfigurationError(
                    f"priority_queues suffix {suffix!r} must match [A-Za-z0-9-]"
                )

    def queue_id(self, celery_queue: str, priority: int | None = None) -> str:
        key = (celery_queue, priority or 0)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        mapped = self.settings.queue_map.get(celery_queue)
        base = (
            mapped
            if mapped is not None
            else queue_id_for(celery_queue, prefix=self.settings.queue_name_prefix)
        )
        for threshold, suffix in self._thresholds:
            if priority is not None and priority >= threshold:
                base = queue_id_for(f"{base}-{suffix}")
                break
        else:
            base = queue_id_for(base)
        if len(self._cache) < 10_000:
            self._cache[key] = base
        return base


class TenantRouter:
    """A Celery router (put it in ``task_routes``) sending each tenant to its own queue.

    The tenant comes from the message header ``header`` (``apply_async(headers=
    {"tenant": "acme"})``) or else the keyword argument ``kwarg``. It must match
    ``pattern`` (and be in ``allowed``, if given); otherwise publishing fails
    with :class:`RoutingError` rather than mixing tenants. Messages without a
    tenant go to ``default_queue`` (or are left to the next router if None).
    """

    def __init__(
        self,
        *,
        header: str = "tenant",
        kwarg: str | None = "tenant_id",
        queue_template: str = "tenant-{tenant}",
        pattern: str = r"[a-z0-9][a-z0-9-]{0,39}",
        allowed: Collection[str] | None = None,
        default_queue: str | None = None,
        tasks: Collection[str] | None = None,
    ) -> None:
        if "{tenant}" not in queue_template:
            raise ConfigurationError("queue_template must contain {tenant}")
        self.header = header
        self.kwarg = kwarg
        self.queue_template = queue_template
        self.pattern = re.compile(pattern)
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.default_queue = default_queue
        self.tasks = frozenset(tasks) if tasks is not None else None

    def tenant_of(self, kwargs: Mapping[str, Any] | None, options: Mapping[str, Any]) -> Any:
        headers = options.get("headers") or {}
        if self.header in headers:
            return headers[self.header]
        if self.header in options:
            return options[self.header]
        if self.kwarg and kwargs and self.kwarg in kwargs:
            return kwargs[self.kwarg]
        return None

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, str] | None:
        if self.tasks is not None and name not in self.tasks:
            return None
        tenant = self.tenant_of(kwargs, options)
        if tenant is None:
            return {"queue": self.default_queue} if self.default_queue else None
        if not isinstance(tenant, str) or not self.pattern.fullmatch(tenant):
            raise RoutingError(
                f"invalid tenant {tenant!r} for task {name}: must match {self.pattern.pattern}"
            )
        if self.allowed is not None and tenant not in self.allowed:
            raise RoutingError(f"unknown tenant {tenant!r} for task {name}")
        return {"queue": self.queue_template.format(tenant=tenant)}
