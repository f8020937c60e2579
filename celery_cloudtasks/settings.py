"""Parsed ``broker_transport_options``: one frozen object both sides read.

The producer (the kombu transport) and the push endpoint read the same
options from the Celery app, so retry policy, OIDC audience and dead-letter
queue cannot drift apart between them. Every option is listed, with its type
and default, in :mod:`celery_cloudtasks.transport`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError
from .limits import MAX_TASK_BYTES
from .types import OidcToken, RetryConfig

__all__ = ["EMULATOR_HOST_ENV", "TransportSettings", "parse_broker_url"]

EMULATOR_HOST_ENV = "CLOUD_TASKS_EMULATOR_HOST"
_URL = re.compile(r"^cloudtasks://projects/(?P<project>[^/]+)/locations/(?P<location>[^/?#]+)/?$")

_KNOWN = {
    "push_url",
    "push_urls",
    "oidc_service_account_email",
    "oidc_audience",
    "retry",
    "apply_queue_retry_config",
    "queue_map",
    "queue_name_prefix",
    "priority_queues",
    "dead_letter_queue",
    "retry_on_failure",
    "emulator_host",
    "queue_factory",
    "dispatch_deadline_seconds",
    "max_task_bytes",
    "create_timeout_seconds",
    "create_retry_deadline_seconds",
    "queue_depth_max_pages",
    "metrics",
    "max_concurrent_dispatches",
    "endpoint_accept_content",
    "endpoint_allow_compression",
    "project",
    "location",
    # kombu's own virtual-transport options, accepted and ignored here
    "polling_interval",
    "body_encoding",
    "visibility_timeout",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "confirm_publish",
}


def parse_broker_url(url: str) -> tuple[str, str]:
    """``cloudtasks://projects/P/locations/L`` -> ``(P, L)``.

    Parsed by hand: kombu's URL parser breaks on domain-scoped project IDs
    such as ``example.com:my-project``.
    """
    match = _URL.match(url.strip())
    if not match:
        raise ConfigurationError(
            f"broker URL {url!r} is not of the form cloudtasks://projects/PROJECT/locations/LOCATION"
        )
    return match["project"], match["location"]


def _opt_str(options: Mapping[str, Any], key: str) -> str | None:
    value = options.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"broker_transport_options[{key!r}] must be a string")
    return value


def _str_map(options: Mapping[str, Any], key: str) -> dict[str, str]:
    value = options.get(key) or {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigurationError(f"broker_transport_options[{key!r}] must map strings to strings")
    return dict(value)


def _positive(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"broker_transport_options[{key!r}] must be a positive number")
    return float(value)


@dataclass(frozen=True)
class TransportSettings:
    """Everything configurable about dispatch and delivery."""

    project: str
    location: str
    push_url: str | None = None
    push_urls: Mapping[str, str] = field(default_factory=dict)
    oidc_service_account_email: str | None = None
    oidc_audience: str | None = None
    retry: RetryConfig = field(default_factory=RetryConfig)
    apply_queue_retry_config: bool = True
    queue_map: Mapping[str, str] = field(default_factory=dict)
    queue_name_prefix: str = ""
    priority_queues: Mapping[int, str] = field(default_factory=dict)
    dead_letter_queue: str | None = None
    retry_on_failure: bool = True
    emulator_host: str | None = None
    queue_factory: Callable[[str], Any] | None = None
    dispatch_deadline: timedelta | None = None
    max_task_bytes: int = MAX_TASK_BYTES
    create_timeout_seconds: float = 20.0
    create_retry_deadline_seconds: float = 30.0
    queue_depth_max_pages: int = 10
    metrics: Any = None
    max_concurrent_dispatches: int = 32
    endpoint_accept_content: tuple[str, ...] = ("json",)
    endpoint_allow_compression: bool = False

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    def queue_path(self, queue_id: str) -> str:
        return f"{self.parent}/queues/{queue_id}"

    def url_for(self, queue_id: str) -> str:
        url = self.push_urls.get(queue_id) or self.push_url
        if not url:
            raise ConfigurationError(
                "broker_transport_options['push_url'] is not set: Cloud Tasks needs the URL of "
                "the push endpoint (e.g. https://worker-abc.run.app/_cloudtasks)"
            )
        return url

    def oidc_for(self, queue_id: str) -> OidcToken | None:
        if not self.oidc_service_account_email:
            return None
        return OidcToken(self.oidc_service_account_email, self.audience_for(queue_id))

    def audience_for(self, queue_id: str | None = None) -> str:
        """The OIDC audience: the explicit setting, else the push URL without its query."""
        if self.oidc_audience:
            return self.oidc_audience
        url = self.push_urls.get(queue_id or "") or self.push_url
        if not url:
            raise ConfigurationError("set broker_transport_options['oidc_audience']")
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any] | None,
        *,
        broker_url: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TransportSettings:
        """Validate ``broker_transport_options`` (and the broker URL, if given)."""
        options = dict(options or {})
        environ = os.environ if environ is None else environ
        unknown = set(options) - _KNOWN
        if unknown:
            raise ConfigurationError(
                f"unknown broker_transport_options: {sorted(unknown)} "
                "(see celery_cloudtasks.transport for the list)"
            )
        if broker_url and broker_url.startswith("cloudtasks://"):
            project, location = parse_broker_url(broker_url)
        else:
            project = _opt_str(options, "project") or "local-project"
            location = _opt_str(options, "location") or "local"
        for key in ("push_url",):
            url = _opt_str(options, key)
            if url and urlsplit(url).scheme not in ("http", "https"):
                raise ConfigurationError(f"{key} must be an http(s) URL, got {url!r}")
        priority_queues = options.get("priority_queues") or {}
        if not isinstance(priority_queues, Mapping) or not all(
            isinstance(v, str) for v in priority_queues.values()
        ):
            raise ConfigurationError("priority_queues must map priorities (0-255) to queue names")
        try:
            priorities = {int(k): v for k, v in priority_queues.items()}
        except (TypeError, ValueError):
            raise ConfigurationError("priority_queues keys must be integers") from None
        deadline = options.get("dispatch_deadline_seconds")
        accept = options.get("endpoint_accept_content", ("json",))
        if isinstance(accept, str) or not all(isinstance(a, str) for a in accept):
            raise ConfigurationError("endpoint_accept_content must be a list of serializer names")
        factory = options.get("queue_factory")
        if factory is not None and not callable(factory):
            raise ConfigurationError("queue_factory must be callable: queue_id -> TaskQueue")
        max_bytes = options.get("max_task_bytes", MAX_TASK_BYTES)
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigurationError("max_task_bytes must be a positive integer")
        return cls(
            project=project,
            location=location,
            push_url=_opt_str(options, "push_url"),
            push_urls=_str_map(options, "push_urls"),
            oidc_service_account_email=_opt_str(options, "oidc_service_account_email"),
            oidc_audience=_opt_str(options, "oidc_audience"),
            retry=RetryConfig.from_value(options.get("retry")),
            apply_queue_retry_config=bool(options.get("apply_queue_retry_config", True)),
            queue_map=_str_map(options, "queue_map"),
            queue_name_prefix=_opt_str(options, "queue_name_prefix") or "",
            priority_queues=priorities,
            dead_letter_queue=_opt_str(options, "dead_letter_queue"),
            retry_on_failure=bool(options.get("retry_on_failure", True)),
            emulator_host=_opt_str(options, "emulator_host") or environ.get(EMULATOR_HOST_ENV),
            queue_factory=factory,
            dispatch_deadline=None
            if deadline is None
            else timedelta(seconds=_positive(options, "dispatch_deadline_seconds", 1)),
            max_task_bytes=max_bytes,
            create_timeout_seconds=_positive(options, "create_timeout_seconds", 20.0),
            create_retry_deadline_seconds=_positive(options, "create_retry_deadline_seconds", 30.0),
            queue_depth_max_pages=int(_positive(options, "queue_depth_max_pages", 10)),
            metrics=options.get("metrics"),
            max_concurrent_dispatches=int(_positive(options, "max_concurrent_dispatches", 32)),
            endpoint_accept_content=tuple(accept),
            endpoint_allow_compression=bool(options.get("endpoint_allow_compression", False)),
        )

    @classmethod
    def from_celery(cls, app: Any) -> TransportSettings:
        """Settings of a Celery app (its broker URL and ``broker_transport_options``)."""
        conf = app.conf
        url = conf.broker_url if isinstance(conf.broker_url, str) else None
        return cls.from_options(conf.broker_transport_options, broker_url=url)
