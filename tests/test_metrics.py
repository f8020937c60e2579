"""Prometheus metrics: names, labels and values after a known workload."""

from __future__ import annotations

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from celery_cloudtasks.errors import ConfigurationError
from celery_cloudtasks.flask import create_app
from celery_cloudtasks.metrics import NullMetrics, PrometheusMetrics, resolve_metrics
from celery_cloudtasks.testing import CloudTasksHarness


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_known_workload_gives_known_counts() -> None:
    app = Celery("metered")
    app.conf.result_backend = "cache+memory://"

    @app.task(name="ok", shared=False)
    def ok(x: int) -> int:
        return x

    @app.task(name="broken", shared=False, retry_on_failure=False)
    def broken() -> None:
        raise RuntimeError("always")

    metrics = PrometheusMetrics(CollectorRegistry(), depth_cache_seconds=0)
    with CloudTasksHarness(app, transport_options={"metrics": metrics}) as ct:
        for i in range(3):
            ok.delay(i)
        broken.delay()
        ok.apply_async((9,), countdown=3600)  # stays waiting: depth 1 after the run
        ct.deliver_due()
        scraped = ct.test_client().get("/metrics")
    assert scraped.status_code == 200
    assert scraped.content_type.startswith("text/plain")
    got = samples(scraped.get_data(as_text=True))
    assert (
        got[("celery_cloudtasks_dispatches_total", (("outcome", "created"), ("queue", "celery")))]
        == 5
    )
    assert (
        got[("celery_cloudtasks_deliveries_total", (("outcome", "succeeded"), ("task", "ok")))] == 3
    )
    assert (
        got[("celery_cloudtasks_deliveries_total", (("outcome", "failed"), ("task", "broken")))]
        == 1
    )
    assert (
        got[
            (
                "celery_cloudtasks_dead_letters_total",
                (("queue", "dead-letters"), ("task", "broken")),
            )
        ]
        == 1
    )
    assert got[("celery_cloudtasks_dispatch_latency_seconds_count", (("queue", "celery"),))] == 5
    assert got[("celery_cloudtasks_execution_seconds_count", (("task", "ok"),))] == 3
    assert got[("celery_cloudtasks_queue_depth", (("queue", "celery"),))] == 1


def test_metrics_route_needs_prometheus_metrics() -> None:
    app = Celery("unmetered", broker="cloudtasks://projects/p/locations/l")
    app.conf.broker_transport_options = {"push_url": "http://h/_cloudtasks"}
    plain = create_app(app, verify_oidc=False)
    assert plain.test_client().get("/metrics").status_code == 404
    with pytest.raises(ConfigurationError, match="metrics"):
        create_app(app, verify_oidc=False, metrics=True)


def test_resolve_metrics() -> None:
    assert isinstance(resolve_metrics(None), NullMetrics)
    assert resolve_metrics("prometheus") is resolve_metrics("prometheus")
    with pytest.raises(ConfigurationError):
        resolve_metrics("statsd")
