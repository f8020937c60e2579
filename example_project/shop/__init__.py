"""An order pipeline for two tenants, run on Cloud Tasks with celery-cloudtasks."""

from .celery import app

__all__ = ["app"]
