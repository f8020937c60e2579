"""WSGI entry point for gunicorn (Cloud Run): ``gunicorn -k gthread --threads 8 wsgi:app``."""

from __future__ import annotations

import os

from shop import app as celery_app

from celery_cloudtasks.flask import create_app

app = create_app(
    celery_app,
    CLOUDTASKS_VERIFY_OIDC=os.environ.get("SHOP_VERIFY_OIDC", "1") != "0",
    CLOUDTASKS_METRICS=os.environ.get("SHOP_METRICS", "1") == "1",
)
