"""Retry policy arithmetic, settings validation and envelope parsing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.errors import ConfigurationError, EnvelopeError, PayloadTooLarge
from celery_cloudtasks.limits import (
    MAX_SCHEDULE_AHEAD,
    check_task_size,
    clamp_dispatch_deadline,
    split_schedule_time,
)
from celery_cloudtasks.settings import TransportSettings, parse_broker_url
from celery_cloudtasks.types import RetryConfig


def test_backoff_doubles_then_grows_linearly_and_caps() -> None:
    retry = RetryConfig(
        min_backoff=timedelta(seconds=10), max_backoff=timedelta(seconds=300), max_doublings=3
    )
    got = [retry.backoff(n).total_seconds() for n in range(1, 9)]
    assert got == [10, 20, 40, 80, 160, 240, 300, 300]


def test_final_attempt_needs_both_limits() -> None:
    retry = RetryConfig(max_attempts=3, max_retry_duration=timedelta(seconds=100))
    assert not retry.is_final_attempt(1, timedelta(seconds=500))  # attempts left
    assert not retry.is_final_attempt(2, timedelta(seconds=0))  # time left
    assert retry.is_final_attempt(2, timedelta(seconds=95))  # next backoff crosses the limit
    no_duration = RetryConfig(max_attempts=2, max_retry_duration=timedelta(0))
    assert no_duration.is_final_attempt(1, timedelta(0))
    unlimited = RetryConfig(max_attempts=-1, max_retry_duration=timedelta(0))
    assert not unlimited.is_final_attempt(10_000, timedelta(days=30))


@pytest.mark.parametrize(
    "value",
    [
        {"max_attempts": 0},
        {"min_backoff": 10, "max_backoff": 5},
        {"max_backoff": "300"},
        {"max_retry_duration": -1},
        {"maximum_attempts": 3},
        {"max_attempts": True},
        "5",
    ],
)
def test_bad_retry_settings_are_refused(value: object) -> None:
    with pytest.raises(ConfigurationError):
        RetryConfig.from_value(value)  # type: ignore[arg-type]


def test_retry_from_seconds() -> None:
    retry = RetryConfig.from_value({"max_attempts": 7, "min_backoff": 1.5})
    assert retry.max_attempts == 7 and retry.min_backoff == timedelta(seconds=1.5)


def test_broker_url_accepts_domain_scoped_projects() -> None:
    assert parse_broker_url("cloudtasks://projects/example.com:proj/locations/europe-west1") == (
        "example.com:proj",
        "europe-west1",
    )
    for bad in ["cloudtasks://proj", "redis://x", "cloudtasks://projects/p/locations/"]:
        with pytest.raises(ConfigurationError, match="cloudtasks://projects"):
            parse_broker_url(bad)


def test_settings_validation_names_the_problem() -> None:
    with pytest.raises(ConfigurationError, match="push_ur"):
        TransportSettings.from_options({"push_ur": "x"}, environ={})
    with pytest.raises(ConfigurationError, match="http"):
        TransportSettings.from_options({"push_url": "ftp://x"}, environ={})
    with pytest.raises(ConfigurationError, match="push_url"):
        TransportSettings.from_options({}, environ={}).url_for("q")
    with pytest.raises(ConfigurationError, match="queue_factory"):
        TransportSettings.from_options({"queue_factory": 3}, environ={})


def test_audience_defaults_to_push_url_without_query() -> None:
    settings = TransportSettings.from_options(
        {"push_url": "https://w.run.app/_cloudtasks?x=1", "oidc_service_account_email": "a@b"},
        environ={},
    )
    oidc = settings.oidc_for("q")
    assert oidc is not None and oidc.audience == "https://w.run.app/_cloudtasks"


def test_emulator_host_from_environment() -> None:
    settings = TransportSettings.from_options({}, environ={"CLOUD_TASKS_EMULATOR_HOST": "h:1"})
    assert settings.emulator_host == "h:1"


def test_limits() -> None:
    with pytest.raises(PayloadTooLarge, match="over the Cloud Tasks limit"):
        check_task_size(b"x" * 1_000_000, "http://u", {}, task_name="t")
    check_task_size(b"x" * 900_000, "http://u", {}, task_name="t")
    assert clamp_dispatch_deadline(timedelta(seconds=1)) == timedelta(seconds=15)
    assert clamp_dispatch_deadline(timedelta(hours=2)) == timedelta(minutes=30)
    assert clamp_dispatch_deadline(None) is None
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    near = now + timedelta(days=1)
    assert split_schedule_time(near, now) == (near, False)
    far, beyond = split_schedule_time(now + timedelta(days=90), now)
    assert beyond and far is not None and far < now + MAX_SCHEDULE_AHEAD
    naive, _ = split_schedule_time(datetime(2030, 1, 2), now)
    assert naive is not None and naive.tzinfo is timezone.utc


def _message() -> dict[str, object]:
    return {
        "body": "W1tdLHt9LHt9XQ==",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"id": "i", "task": "t", "retries": 2, "root_id": "r"},
        "properties": {},
    }


def test_envelope_round_trip() -> None:
    envelope = TaskEnvelope(message=_message(), queue="celery", published_at=5.0, scheduled_at=9)
    back = TaskEnvelope.from_json(envelope.to_json())
    assert back == TaskEnvelope(
        message=_message(), queue="celery", published_at=5.0, scheduled_at=9
    )
    assert (back.task_id, back.task_name, back.root_id, back.retries) == ("i", "t", "r", 2)
    assert back.first_dispatch_at == 9


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"v": 2}',
        b'{"v": 1, "queue": "q", "published_at": 1}',
        b'{"v": 1, "queue": "q", "published_at": 1, "message": {"body": 1}}',
        b'{"v":1,"queue":"q","published_at":"x","message":{"body":"","content-type":null,'
        b'"content-encoding":null,"headers":{"id":"i","task":"t"},"properties":{}}}',
        b'{"v":1,"queue":"q","published_at":1,"message":{"body":"","content-type":null,'
        b'"content-encoding":null,"headers":{},"properties":{}}}',
        b"[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_bad_envelopes_are_refused_with_envelope_error(body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        TaskEnvelope.from_json(body)
