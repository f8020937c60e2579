"""The Flask push endpoint: each Cloud Tasks delivery becomes a real Celery execution.

::

    from celery_cloudtasks.flask import CloudTasksPush, create_app

    wsgi = create_app(celery_app)                        # a ready Flask app, or
    CloudTasksPush(flask_app, celery_app=celery_app)     # the init_app pattern

Route: ``POST {CLOUDTASKS_URL_PREFIX}/_cloudtasks`` and any sub-path of it.
Settings come from the Celery app's ``broker_transport_options`` (see
:mod:`celery_cloudtasks.transport`), overridden by these Flask config keys
(also keyword arguments of :func:`create_app`):

==================================  =============================================
``CLOUDTASKS_VERIFY_OIDC``          True; False needs saying, and logs a warning
``CLOUDTASKS_OIDC_AUDIENCE``        ``oidc_audience`` (else the push URL)
``CLOUDTASKS_OIDC_SERVICE_ACCOUNTS`` ``[oidc_service_account_email]``; required
``CLOUDTASKS_OIDC_CERTS_URL``       Google's v1 certs URL
``CLOUDTASKS_OIDC_ISSUERS``         ``accounts.google.com``, with and without https
``CLOUDTASKS_OIDC_CLOCK_SKEW_SECONDS`` 10
``CLOUDTASKS_MAX_BODY_BYTES``       ``max_task_bytes`` (1 MB); larger bodies: 413
``CLOUDTASKS_URL_PREFIX``           ``""``
``CLOUDTASKS_RETRY_AFTER_SECONDS``  30 (``Retry-After`` of 503 answers)
``CLOUDTASKS_CLOCK``                ``time.time`` (tests pass a ManualClock)
``CLOUDTASKS_METRICS``              serve Prometheus metrics; default: on when the
                                    transport option ``metrics`` is ``"prometheus"``
``CLOUDTASKS_METRICS_PATH``         ``/metrics``
==================================  =============================================

Responses are small JSON objects (outcome and task id); never a traceback.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Flask, Response, current_app, jsonify, request

from .batch import dispatch_batch
from .deadletter import DeadLetterer
from .envelope import TaskEnvelope
from .errors import BatchEnqueueError, ConfigurationError, EnvelopeError, OidcError
from .execution import (
    DeliveryExecutor,
    DeliveryMetadata,
    ExecutionResult,
    FailureInfo,
    Outcome,
)
from .limits import MAX_SCHEDULE_AHEAD
from .metrics import PrometheusMetrics, render_metrics
from .publisher import Publisher
from .settings import TransportSettings

__all__ = ["CloudTasksPush", "PushState", "create_app"]

logger = logging.getLogger("celery_cloudtasks.endpoint")

EXTENSION_KEY = "cloudtasks"
ROUTE = "/_cloudtasks"


@dataclass(frozen=True)
class PushState:
    """Everything one Flask app needs to answer deliveries (``app.extensions["cloudtasks"]``)."""

    celery_app: Any
    settings: TransportSettings
    executor: DeliveryExecutor
    publisher: Publisher
    dead_letterer: DeadLetterer
    verifier: Any  # OidcVerifier, or None when verification is explicitly off
    max_body_bytes: int
    retry_after_seconds: int
    clock: Callable[[], float]


class CloudTasksPush:
    """Flask extension serving the Cloud Tasks push route for a Celery app."""

    def __init__(self, app: Flask | None = None, *, celery_app: Any = None) -> None:
        self.celery_app = celery_app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, celery_app: Any = None) -> None:
        celery_app = celery_app or self.celery_app
        if celery_app is None:
            raise ConfigurationError("CloudTasksPush needs celery_app=<your Celery app>")
        state = _build_state(app.config, celery_app)
        app.extensions[EXTENSION_KEY] = state
        prefix = str(app.config["CLOUDTASKS_URL_PREFIX"]).rstrip("/")
        app.add_url_rule(prefix + ROUTE, "cloudtasks_push", _view, methods=["POST"])
        app.add_url_rule(
            prefix + ROUTE + "/<path:subpath>", "cloudtasks_push_sub", _view, methods=["POST"]
        )
        metrics = app.config["CLOUDTASKS_METRICS"]
        if metrics is None:
            metrics = isinstance(state.publisher.metrics, PrometheusMetrics)
        if metrics:
            if not isinstance(state.publisher.metrics, PrometheusMetrics):
                raise ConfigurationError(
                    "CLOUDTASKS_METRICS needs broker_transport_options['metrics'] = 'prometheus' "
                    "(or a PrometheusMetrics instance)"
                )
            app.add_url_rule(
                prefix + app.config["CLOUDTASKS_METRICS_PATH"], "cloudtasks_metrics", _metrics_view
            )


def create_app(celery_app: Any, **config: Any) -> Flask:
    """A Flask app serving only the push endpoint; ``config`` are ``CLOUDTASKS_*`` keys."""
    app = Flask("celery_cloudtasks")
    for key, value in config.items():
        app.config[key if key.isupper() else f"CLOUDTASKS_{key.upper()}"] = value
    CloudTasksPush(app, celery_app=celery_app)
    return app


def _build_state(config: Any, celery_app: Any) -> PushState:
    settings = TransportSettings.from_celery(celery_app)
    config.setdefault("CLOUDTASKS_VERIFY_OIDC", True)
    config.setdefault("CLOUDTASKS_OIDC_AUDIENCE", None)
    config.setdefault("CLOUDTASKS_OIDC_SERVICE_ACCOUNTS", None)
    config.setdefault("CLOUDTASKS_OIDC_CERTS_URL", None)
    config.setdefault("CLOUDTASKS_OIDC_ISSUERS", None)
    config.setdefault("CLOUDTASKS_OIDC_CLOCK_SKEW_SECONDS", 10)
    config.setdefault("CLOUDTASKS_MAX_BODY_BYTES", settings.max_task_bytes)
    config.setdefault("CLOUDTASKS_URL_PREFIX", "")
    config.setdefault("CLOUDTASKS_RETRY_AFTER_SECONDS", 30)
    config.setdefault("CLOUDTASKS_CLOCK", time.time)
    config.setdefault("CLOUDTASKS_METRICS", None)
    config.setdefault("CLOUDTASKS_METRICS_PATH", "/metrics")
    clock = config["CLOUDTASKS_CLOCK"]
    max_body = config["CLOUDTASKS_MAX_BODY_BYTES"]
    if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body <= 0:
        raise ConfigurationError("CLOUDTASKS_MAX_BODY_BYTES must be a positive integer")
    celery_app.loader.import_default_modules()  # register tasks, as a worker does at start
    publisher = Publisher(settings)
    return PushState(
        celery_app=celery_app,
        settings=settings,
        executor=DeliveryExecutor(
            celery_app,
            accept_content=settings.endpoint_accept_content,
            allow_compression=settings.endpoint_allow_compression,
            retry_on_failure=settings.retry_on_failure,
            clock=clock,
        ),
        publisher=publisher,
        dead_letterer=DeadLetterer(
            queue_id=settings.dead_letter_queue,
            queue_for=publisher.queue,
            url_for=lambda q: settings.push_urls.get(q) or settings.push_url,
            oidc_for=settings.oidc_for,
            clock=clock,
            metrics=publisher.metrics,
        ),
        verifier=_build_verifier(config, settings),
        max_body_bytes=max_body,
        retry_after_seconds=int(config["CLOUDTASKS_RETRY_AFTER_SECONDS"]),
        clock=clock,
    )


def _emails(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [e.strip() for e in value.split(",") if e.strip()]
    return [str(e) for e in value]


def _build_verifier(config: Any, settings: TransportSettings) -> Any:
    verify = config["CLOUDTASKS_VERIFY_OIDC"]
    if verify is False or (isinstance(verify, str) and verify.lower() in ("0", "false", "no")):
        logger.warning(
            "OIDC verification of Cloud Tasks push requests is OFF "
            "(CLOUDTASKS_VERIFY_OIDC=False): anyone who can reach this endpoint can run "
            "tasks. Only do this behind another authentication layer or in local tests."
        )
        return None
    from .oidc import GOOGLE_CERTS_URL, GOOGLE_ISSUERS, OidcVerifier

    audience = config["CLOUDTASKS_OIDC_AUDIENCE"] or settings.audience_for()
    accounts = _emails(config["CLOUDTASKS_OIDC_SERVICE_ACCOUNTS"]) or _emails(
        settings.oidc_service_account_email
    )
    if not accounts:
        raise ConfigurationError(
            "set CLOUDTASKS_OIDC_SERVICE_ACCOUNTS (or broker_transport_options"
            "['oidc_service_account_email']): without it any Google account could call the "
            "endpoint; CLOUDTASKS_VERIFY_OIDC=False turns verification off explicitly"
        )
    return OidcVerifier(
        audience=audience,
        allowed_service_accounts=accounts,
        issuers=tuple(config["CLOUDTASKS_OIDC_ISSUERS"] or GOOGLE_ISSUERS),
        certs_url=config["CLOUDTASKS_OIDC_CERTS_URL"] or GOOGLE_CERTS_URL,
        clock_skew_seconds=int(config["CLOUDTASKS_OIDC_CLOCK_SKEW_SECONDS"]),
    )


def _reply(status: int, headers: Mapping[str, str] | None = None, **payload: Any) -> Response:
    response = jsonify(payload)
    response.status_code = status
    response.headers.update(dict(headers or {}))
    return response


def _view(subpath: str = "") -> Response:
    state: PushState = current_app.extensions[EXTENSION_KEY]
    if state.verifier is not None:
        try:
            state.verifier.verify(request.headers.get("Authorization"))
        except OidcError as exc:
            status = int(getattr(exc, "status_code", 401))
            logger.warning("push request refused (%d): %s", status, exc)
            if status == 503:
                retry_after = {"Retry-After": str(state.retry_after_seconds)}
                return _reply(503, retry_after, error="unavailable")
            return _reply(status, error="forbidden" if status == 403 else "unauthorized")
    length = request.content_length
    if length is not None and length > state.max_body_bytes:
        return _reply(413, error="payload too large")
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is None and chunked and not request.environ.get("wsgi.input_terminated"):
        # Cloud Tasks always sends Content-Length; a chunked body this server cannot
        # read would otherwise look empty and be dead-lettered.
        return _reply(411, error="length required")
    body = request.stream.read(state.max_body_bytes + 1)
    if len(body) > state.max_body_bytes:
        return _reply(413, error="payload too large")
    try:
        return _deliver(state, body)
    except Exception:
        logger.exception("push endpoint failed outside the task (body of %d bytes)", len(body))
        return _reply(503, {"Retry-After": str(state.retry_after_seconds)}, error="internal")


def _int_header(name: str) -> int:
    try:
        return min(max(0, int(request.headers.get(name, "0") or 0)), 2**31)
    except ValueError:
        return 0


def _metadata(state: PushState, envelope: TaskEnvelope | None, now: float) -> DeliveryMetadata:
    retry_count = _int_header("X-CloudTasks-TaskRetryCount")
    try:
        eta: float | None = float(request.headers.get("X-CloudTasks-TaskETA") or "")
    except ValueError:
        eta = None
    first = envelope.first_dispatch_at if envelope is not None else now
    elapsed = timedelta(seconds=max(0.0, now - first))
    return DeliveryMetadata(
        queue=request.headers.get("X-CloudTasks-QueueName", ""),
        task_name=request.headers.get("X-CloudTasks-TaskName", ""),
        retry_count=retry_count,
        execution_count=_int_header("X-CloudTasks-TaskExecutionCount"),
        eta=eta,
        final_attempt=state.settings.retry.is_final_attempt(retry_count, elapsed),
    )


def _deliver(state: PushState, body: bytes) -> Response:
    now = state.clock()
    try:
        envelope = TaskEnvelope.from_json(body)
    except EnvelopeError as exc:
        meta = _metadata(state, None, now)
        _undecodable(state, body, meta, str(exc))
        return _reply(200, outcome=Outcome.UNDELIVERABLE.value)
    meta = _metadata(state, envelope, now)
    if meta.queue and isinstance(state.publisher.metrics, PrometheusMetrics):
        state.publisher.queue(meta.queue.rsplit("/", 1)[-1])  # its depth joins the scrape
    try:
        # Follow-ups the task publishes (chain steps, group members, retries) go out
        # concurrently and are all confirmed before Cloud Tasks hears "done".
        with dispatch_batch(state.settings.max_concurrent_dispatches):
            result = state.executor.execute(envelope, meta)
    except BatchEnqueueError as exc:
        logger.error(
            "delivery %s[%s]: follow-up tasks not enqueued, asking for redelivery: %s",
            envelope.task_name,
            envelope.task_id,
            exc,
            extra=_log_fields(envelope, meta),
        )
        return _reply(503, {"Retry-After": str(state.retry_after_seconds)}, error="publish")
    state.publisher.metrics.delivered(
        envelope.task_name, result.outcome.value, result.runtime_seconds
    )
    logger.info(
        "delivery %s[%s] attempt %d: %s",
        envelope.task_name,
        envelope.task_id,
        meta.retry_count + 1,
        result.outcome.value,
        extra=_log_fields(envelope, meta),
    )
    if result.outcome is Outcome.NOT_DUE:
        return _defer(state, envelope, meta, result)
    if result.redeliver and not meta.final_attempt:
        if result.outcome is Outcome.INTERNAL_ERROR:
            return _reply(
                503,
                {"Retry-After": str(state.retry_after_seconds)},
                outcome=result.outcome.value,
                task_id=result.task_id,
            )
        return _reply(500, outcome=result.outcome.value, task_id=result.task_id)
    reason = result.dead_letter_reason
    if result.redeliver:  # final attempt: Cloud Tasks would drop it after this answer
        reason = f"final attempt ({meta.retry_count + 1}): {result.outcome.value}"
    if reason is not None:
        state.dead_letterer.dead_letter(
            envelope, meta, reason=reason, failure=result.failure, fallback_url=request.base_url
        )
    return _reply(200, outcome=result.outcome.value, task_id=result.task_id)


def _log_fields(envelope: TaskEnvelope, meta: DeliveryMetadata) -> dict[str, Any]:
    return {
        "celery_task_id": envelope.task_id,
        "celery_task_name": envelope.task_name,
        "cloudtasks_task": meta.task_name,
        "cloudtasks_queue": meta.queue,
        "attempt": meta.retry_count + 1,
    }


def _metrics_view() -> Response:
    state: PushState = current_app.extensions[EXTENSION_KEY]
    payload, content_type = render_metrics(state.publisher.metrics)
    return Response(payload, status=200, content_type=content_type)


def _undecodable(state: PushState, body: bytes, meta: DeliveryMetadata, why: str) -> None:
    """Dead-letter a body that is not an envelope, kept verbatim (base64) for inspection."""
    import base64

    envelope = TaskEnvelope(
        message={
            "body": base64.b64encode(body).decode("ascii"),
            "content-type": request.headers.get("Content-Type"),
            "content-encoding": "binary",
            "headers": {},
            "properties": {"body_encoding": "base64"},
        },
        queue="",
        published_at=state.clock(),
    )
    state.dead_letterer.dead_letter(
        envelope,
        meta,
        reason=f"undeliverable: {why}",
        failure=FailureInfo("EnvelopeError", why),
        fallback_url=request.base_url,
    )


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


def _defer(
    state: PushState, envelope: TaskEnvelope, meta: DeliveryMetadata, result: ExecutionResult
) -> Response:
    """Re-enqueue a task delivered before its ETA (early, or beyond the 30-day horizon)."""
    now = state.clock()
    eta = result.eta.timestamp() if result.eta else now
    horizon = (MAX_SCHEDULE_AHEAD - timedelta(minutes=1)).total_seconds()
    # Anchored on this hop's schedule, so a repeated delivery re-enqueues the same name.
    anchor = envelope.scheduled_at or envelope.published_at
    not_before = min(eta, anchor + horizon, now + horizon)
    if not_before <= now:
        not_before = min(eta, now + horizon)
    try:
        prepared = state.publisher.prepare(
            envelope.queue,
            copy.deepcopy(dict(envelope.message)),
            now=_utc(now),
            idempotency_key=f"{envelope.idempotency_key}/not-before/{int(not_before)}",
            queue_id=meta.queue.rsplit("/", 1)[-1] or None,
            schedule_time=_utc(not_before),
        )
        state.publisher.enqueue(prepared)
    except Exception as exc:
        logger.error("could not re-enqueue %s until its ETA: %r", envelope.task_id, exc)
        if meta.final_attempt:
            state.dead_letterer.dead_letter(
                envelope,
                meta,
                reason=f"could not re-enqueue until its ETA: {exc!r}",
                failure=FailureInfo.from_exception(exc),
                fallback_url=request.base_url,
            )
            return _reply(200, outcome=result.outcome.value, task_id=result.task_id)
        return _reply(503, {"Retry-After": str(state.retry_after_seconds)}, outcome="not_due")
    return _reply(200, outcome=result.outcome.value, task_id=result.task_id)
