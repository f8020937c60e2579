"""The Celery app, configured from the environment (12-factor, as on Cloud Run).

=============================  ================================================
variable                       meaning (local default)
=============================  ================================================
``SHOP_BROKER_URL``            ``cloudtasks://projects/P/locations/L``
                               (local-project / local)
``SHOP_PUSH_URL``              push endpoint URL (http://127.0.0.1:8080/_cloudtasks)
``SHOP_OIDC_SERVICE_ACCOUNT``  account Cloud Tasks signs deliveries with (no OIDC)
``SHOP_OIDC_AUDIENCE``         audience of those tokens (the push URL)
``SHOP_VERIFY_OIDC``           ``0`` turns verification off, local only (``1``)
``SHOP_RESULT_BACKEND``        Celery result backend (SQLite file)
``SHOP_MAX_ATTEMPTS``          Cloud Tasks attempts per task (``5``)
``SHOP_METRICS``               ``1``: Prometheus metrics and ``/metrics`` (``1``)
``CLOUD_TASKS_EMULATOR_HOST``  ``host:port`` of a local emulator (unset: Google)
=============================  ================================================
"""

from __future__ import annotations

import os

from celery import Celery

import celery_cloudtasks  # noqa: F401  (registers the cloudtasks:// transport)
from celery_cloudtasks import TenantRouter

env = os.environ.get

app = Celery(
    "shop",
    broker=env("SHOP_BROKER_URL", "cloudtasks://projects/local-project/locations/local"),
    backend=env("SHOP_RESULT_BACKEND", "db+sqlite:///shop-results.sqlite"),
    include=["shop.tasks"],
)
app.conf.update(
    broker_transport_options={
        "push_url": env("SHOP_PUSH_URL", "http://127.0.0.1:8080/_cloudtasks"),
        "oidc_service_account_email": env("SHOP_OIDC_SERVICE_ACCOUNT"),
        "oidc_audience": env("SHOP_OIDC_AUDIENCE"),
        "queue_name_prefix": env("SHOP_QUEUE_PREFIX", "shop-"),
        "priority_queues": {8: "high"},
        "dead_letter_queue": "shop-dead-letters",
        "retry": {
            "max_attempts": int(env("SHOP_MAX_ATTEMPTS", "5")),
            "min_backoff": 1,
            "max_backoff": 60,
            "max_retry_duration": 0,  # attempts alone decide
        },
        "metrics": "prometheus" if env("SHOP_METRICS", "1") == "1" else None,
    },
    task_routes=(
        {
            "shop.tasks.line_total": {"queue": "reports"},
            "shop.tasks.compile_report": {"queue": "reports"},
        },
        TenantRouter(allowed={"acme", "globex"}),
    ),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_extended=True,
    database_engine_options={"connect_args": {"timeout": 30}},
    task_acks_late=True,
)
