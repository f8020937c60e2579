"""Metrics hooks for both sides: dispatch (producer) and delivery (endpoint).

The default is :class:`NullMetrics`. :class:`PrometheusMetrics` (``metrics``
extra; this is the only module that imports ``prometheus_client``, lazily)
exports:

=====================================================  =========  ==================
name                                                   type       labels
=====================================================  =========  ==================
``celery_cloudtasks_dispatches_total``                 counter    queue, outcome
``celery_cloudtasks_dispatch_latency_seconds``         histogram  queue
``celery_cloudtasks_deliveries_total``                 counter    task, outcome
``celery_cloudtasks_execution_seconds``                histogram  task
``celery_cloudtasks_dead_letters_total``               counter    queue, task
``celery_cloudtasks_queue_depth``                      gauge      queue
=====================================================  =========  ==================

Dispatch outcomes: ``created``, ``deduplicated``, ``failed``. Delivery
outcomes are the values of :class:`celery_cloudtasks.execution.Outcome`
(``succeeded``, ``retry_scheduled``, ``redeliver``, ``failed``, ``rejected``,
``requeue``, ``ignored``, ``revoked``, ``unknown_task``, ``not_due``,
``internal_error``). Queue depth is collected on scrape for every queue the
process has dispatched to or received from, and cached for
``depth_cache_seconds``. With several worker processes per container each
serves its own counters; on Cloud Run prefer one process with threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigurationError

__all__ = [
    "DispatchMetrics",
    "NullMetrics",
    "PrometheusMetrics",
    "render_metrics",
    "resolve_metrics",
]

logger = logging.getLogger(__name__)

CREATED = "created"
DEDUPLICATED = "deduplicated"
FAILED = "failed"


@runtime_checkable
class DispatchMetrics(Protocol):
    """What the library reports; implement it to feed any metrics system."""

    def dispatched(self, queue: str, outcome: str, latency_seconds: float) -> None: ...

    def delivered(self, task: str, outcome: str, duration_seconds: float) -> None: ...

    def dead_lettered(self, queue: str, task: str) -> None: ...


class NullMetrics:
    """Reports nothing."""

    def dispatched(self, queue: str, outcome: str, latency_seconds: float) -> None:
        return None

    def delivered(self, task: str, outcome: str, duration_seconds: float) -> None:
        return None

    def dead_lettered(self, queue: str, task: str) -> None:
        return None


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_EXEC_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class PrometheusMetrics:
    """Prometheus counters and histograms (``pip install 'celery-cloudtasks[metrics]'``)."""

    def __init__(self, registry: Any = None, *, depth_cache_seconds: float = 15.0) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigurationError(
                "PrometheusMetrics needs prometheus_client: "
                "pip install 'celery-cloudtasks[metrics]'"
            ) from exc
        self.registry = registry if registry is not None else prom.REGISTRY
        kw: dict[str, Any] = {"registry": self.registry}
        self.dispatches = prom.Counter(
            "celery_cloudtasks_dispatches",
            "Tasks handed to Cloud Tasks",
            ["queue", "outcome"],
            **kw,
        )
        self.dispatch_latency = prom.Histogram(
            "celery_cloudtasks_dispatch_latency_seconds",
            "Time to create one Cloud Tasks task",
            ["queue"],
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.deliveries = prom.Counter(
            "celery_cloudtasks_deliveries", "Push deliveries handled", ["task", "outcome"], **kw
        )
        self.execution = prom.Histogram(
            "celery_cloudtasks_execution_seconds",
            "Time to handle one delivery",
            ["task"],
            buckets=_EXEC_BUCKETS,
            **kw,
        )
        self.dead_letters = prom.Counter(
            "celery_cloudtasks_dead_letters", "Tasks dead-lettered", ["queue", "task"], **kw
        )
        self._depth = _DepthCollector(depth_cache_seconds)
        self.registry.register(self._depth)

    def dispatched(self, queue: str, outcome: str, latency_seconds: float) -> None:
        self.dispatches.labels(queue=queue, outcome=outcome).inc()
        if outcome != FAILED:
            self.dispatch_latency.labels(queue=queue).observe(latency_seconds)

    def delivered(self, task: str, outcome: str, duration_seconds: float) -> None:
        self.deliveries.labels(task=task, outcome=outcome).inc()
        self.execution.labels(task=task).observe(duration_seconds)

    def dead_lettered(self, queue: str, task: str) -> None:
        self.dead_letters.labels(queue=queue, task=task).inc()

    def watch_queue_depth(self, queue: str, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the queue's depth gauge on scrape (cached)."""
        self._depth.watch(queue, depth)


class _DepthCollector:
    def __init__(self, cache_seconds: float) -> None:
        self.cache_seconds = cache_seconds
        self._sources: dict[str, Callable[[], int]] = {}
        self._cache: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def watch(self, queue: str, depth: Callable[[], int]) -> None:
        with self._lock:
            self._sources[queue] = depth

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "celery_cloudtasks_queue_depth",
            "Tasks waiting in the queue (estimate)",
            labels=["queue"],
        )
        now = time.monotonic()
        with self._lock:
            sources = dict(self._sources)
        for queue, source in sorted(sources.items()):
            cached = self._cache.get(queue)
            if cached is None or now - cached[0] > self.cache_seconds:
                try:
                    cached = (now, float(source()))
                except Exception:  # a failing source must not break the scrape
                    logger.warning("queue depth of %s unavailable", queue, exc_info=True)
                    continue
                self._cache[queue] = cached
            family.add_metric([queue], cached[1])
        yield family


def render_metrics(metrics: Any) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``metrics`` (a :class:`PrometheusMetrics`)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


_default_prometheus: list[PrometheusMetrics] = []
_default_lock = threading.Lock()


def resolve_metrics(value: Any) -> DispatchMetrics:
    """``None`` -> no-op, ``"prometheus"`` -> the process's Prometheus metrics, else as given."""
    if value is None:
        return NullMetrics()
    if value == "prometheus":
        with _default_lock:  # one set of collectors per default registry
            if not _default_prometheus:
                _default_prometheus.append(PrometheusMetrics())
            return _default_prometheus[0]
    if isinstance(value, DispatchMetrics):
        return value
    raise ConfigurationError(
        "metrics must be None, 'prometheus' or an object with dispatched/delivered/dead_lettered"
    )
