"""Google Cloud Tasks transport for kombu (send-only).

Every task message Celery publishes becomes one named Cloud Tasks HTTP task,
delivered by Cloud Tasks to the push endpoint (:mod:`celery_cloudtasks.flask`),
which runs it through Celery's worker machinery.

Features
========
* Type: Virtual, send-only (no consumers: tasks run in the push endpoint)
* Supports Direct: Yes (Celery's default routing, ``task_routes``, ``queue=``)
* Supports Topic: publish only, to bound queues; Celery events are discarded with a warning
* Supports Fanout: No (remote control and broadcast raise ``UnsupportedOperation``)
* Supports Priority: through ``priority_queues`` (one Cloud Tasks queue per level)
* Supports TTL: ``expires`` is honoured by the endpoint (REVOKED)
* Idempotent publish: task name from ``{root_id}/{task_id}/{retries}``

Connection String
=================
::

    cloudtasks://projects/PROJECT/locations/LOCATION

or ``broker_transport="celery_cloudtasks.transport:Transport"`` with
``project``/``location`` in the options. Domain-scoped project IDs
(``example.com:proj``) are accepted.

Transport Options
=================
``broker_transport_options`` (read by the producer and the push endpoint):

* ``push_url`` (str, required): URL of the push endpoint, e.g.
  ``https://worker-abc.run.app/_cloudtasks``.
* ``push_urls`` (dict[str, str], ``{}``): per Cloud Tasks queue ID URL override.
* ``oidc_service_account_email`` (str, None): sign deliveries with this account.
* ``oidc_audience`` (str, push URL without query): audience of the OIDC token;
  set it explicitly, the endpoint checks it.
* ``retry`` (dict, ``{"max_attempts": 5, "min_backoff": 10, "max_backoff": 300,
  "max_retry_duration": 3600, "max_doublings": 16}``): queue retry policy,
  seconds; the endpoint uses it to recognise the final attempt.
* ``apply_queue_retry_config`` (bool, True): apply ``retry`` to each queue once
  per process with ``update_queue`` (needs ``cloudtasks.queues.update``; a
  missing permission logs a warning and publishing continues).
* ``queue_map`` (dict[str, str], ``{}``): Celery queue name -> Cloud Tasks queue ID.
* ``queue_name_prefix`` (str, ``""``): prefix for unmapped queue IDs.
* ``priority_queues`` (dict[int, str], ``{}``): priority threshold -> queue suffix.
* ``dead_letter_queue`` (str, None): Cloud Tasks queue ID receiving failed tasks.
* ``retry_on_failure`` (bool, True): False makes an unhandled exception final.
* ``emulator_host`` (str, ``$CLOUD_TASKS_EMULATOR_HOST``): ``host:port`` of an
  emulator, reached over an insecure channel.
* ``queue_factory`` (callable, None): ``queue_id -> TaskQueue``; e.g.
  :class:`~celery_cloudtasks.memory.InMemoryCloudTasks` for tests.
* ``dispatch_deadline_seconds`` (float, None): default dispatch deadline; a
  task's ``time_limit`` wins; clamped to 15 s .. 30 min.
* ``max_task_bytes`` (int, 1000000): refuse larger tasks before any RPC.
* ``create_timeout_seconds`` (float, 20): timeout of one ``create_task`` RPC.
* ``create_retry_deadline_seconds`` (float, 30): total budget for retrying
  UNAVAILABLE / DEADLINE_EXCEEDED.
* ``queue_depth_max_pages`` (int, 10): cap of ``list_tasks`` pages counted for
  the depth estimate when queue stats are unavailable.
* ``metrics`` (None | ``"prometheus"`` | object): dispatch/delivery metrics hook.
* ``max_concurrent_dispatches`` (int, 32): RPCs in flight in a dispatch batch.
* ``endpoint_accept_content`` (list[str], ``["json"]``): serializers the
  endpoint decodes.
* ``endpoint_allow_compression`` (bool, False): let the endpoint decompress.

Per call: ``apply_async(cloudtasks_queue=..., cloudtasks_url=...,
cloudtasks_dispatch_deadline=..., cloudtasks_idempotency_key=...)``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from amqp.protocol import queue_declare_ok_t
from kombu.transport import virtual

from .errors import RoutingError, UnsupportedOperation
from .publisher import Publisher
from .settings import TransportSettings, parse_broker_url

__all__ = ["SEND_ONLY", "Channel", "Transport"]

logger = logging.getLogger(__name__)

SEND_ONLY = (
    "the cloudtasks transport is send-only: Cloud Tasks pushes each task to the HTTP endpoint "
    "(celery -A proj cloudtasks serve, or celery_cloudtasks.flask.create_app under gunicorn), "
    "so `celery worker`, rpc:// results and other consumers cannot run on it; use a result "
    "backend such as redis:// or db+postgresql://"
)


class Channel(virtual.Channel):
    """Publishes each message as a Cloud Tasks task; refuses to consume."""

    do_restore = False
    supports_fanout = False

    @property
    def publisher(self) -> Publisher:
        publisher: Publisher = self.connection.publisher
        return publisher

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        self._inplace_augment_message(message, exchange, routing_key)  # type: ignore[no-untyped-call]
        if not exchange:
            return self._put(routing_key, message)
        exchange_type = self.typeof(exchange).type  # type: ignore[no-untyped-call]
        if exchange_type == "fanout" or exchange.endswith(".pidbox"):
            raise UnsupportedOperation(
                f"fanout exchange {exchange!r}: remote control (app.control: revoke, inspect, "
                "broadcast) needs a broker with fanout; Cloud Tasks has none. Use expires= "
                "instead of revoke, and Cloud Tasks queue operations (celery cloudtasks queues)"
            )
        queues = self._lookup(exchange, routing_key)  # type: ignore[no-untyped-call]
        if not queues:
            headers = message.get("headers") or {}
            if "task" not in headers and "id" not in headers:
                self._warn_event_dropped(exchange)
                return None
            raise RoutingError(
                f"task message sent to exchange {exchange!r} with routing key {routing_key!r} "
                "matches no queue and would be dropped; route it to a queue (queue=...)"
            )
        for queue in queues:
            self._put(queue, message)
        return None

    def _warn_event_dropped(self, exchange: str) -> None:
        if not getattr(self, "_event_warning_given", False):
            self._event_warning_given = True
            logger.warning(
                "Celery events (exchange %r) cannot travel over Cloud Tasks and are discarded; "
                "disable task_send_sent_event and worker_send_task_events. Task messages are "
                "never discarded.",
                exchange,
            )

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        self.publisher.publish(queue, message)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        raise UnsupportedOperation(SEND_ONLY)

    def basic_consume(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedOperation(SEND_ONLY)

    def basic_get(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedOperation(SEND_ONLY)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        """Declaring is free; only a passive declare asks Cloud Tasks for the depth.

        (kombu's base class would count the queue on every declaration, and Celery
        declares on a connection's first publish: a list_tasks RPC each time.)
        """
        name = queue or f"amq.gen-{uuid.uuid4()}"
        return queue_declare_ok_t(name, self._size(name) if passive else 0, 0)

    def _size(self, queue: str) -> int:
        return self.publisher.queue_for_celery(queue).queue_depth()

    def _purge(self, queue: str) -> int:
        return self.publisher.queue_for_celery(queue).purge()

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        return None

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        return None

    def _queue_bind(self, *args: Any) -> None:
        return None


class Transport(virtual.Transport):
    """kombu transport: ``cloudtasks://projects/P/locations/L``."""

    Channel = Channel
    can_parse_url = True
    driver_type = "cloudtasks"
    driver_name = "google-cloud-tasks"
    polling_interval = 3600.0

    #: An enqueue that failed for good is not a lost connection: nothing to reconnect.
    connection_errors = virtual.Transport.connection_errors
    channel_errors = virtual.Transport.channel_errors

    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic"]), heartbeats=False
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]
        url = self._broker_url(client)
        self.settings = TransportSettings.from_options(client.transport_options, broker_url=url)
        self.publisher = Publisher(self.settings)

    @staticmethod
    def _broker_url(client: Any) -> str | None:
        hostname = getattr(client, "hostname", None)
        if isinstance(hostname, str) and hostname.startswith("cloudtasks://"):
            parse_broker_url(hostname)
            return hostname
        return None

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> Any:
        raise UnsupportedOperation(SEND_ONLY)

    def driver_version(self) -> str:
        try:
            from importlib.metadata import version

            return version("google-cloud-tasks")
        except Exception:
            return "not installed"
