"""The ``celery_cloudtasks.testing`` pytest plugin, used as a user would use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def _plugin_args() -> list[str]:
    """Load the plugin by hand only if the package's pytest11 entry point is not installed."""
    from importlib.metadata import entry_points

    installed = any(
        ep.value == "celery_cloudtasks.testing" for ep in entry_points(group="pytest11")
    )
    return ["-q"] if installed else ["-q", "-p", "celery_cloudtasks.testing"]


USER_TESTS = """
from celery import states


def test_retries_and_countdowns(cloudtasks, cloudtasks_app):
    attempts = []

    @cloudtasks_app.task(shared=False, bind=True)
    def fetch(self, url):
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=300)
        return "ok " + url

    result = fetch.delay("https://example.com")
    assert cloudtasks.run_until_idle() == 3
    assert result.get(timeout=0) == "ok https://example.com"
    assert attempts == [0, 1, 2]
    waited = cloudtasks.clock() - cloudtasks.queues.queue("celery").completed[0].created_at
    assert waited >= 600 - 1e-6  # epoch floats: 600 s added, not always exactly 600.0 back


def test_failures_are_redelivered_then_dead_lettered(cloudtasks, cloudtasks_app):
    @cloudtasks_app.task(shared=False)
    def broken():
        raise RuntimeError("always")

    result = broken.delay()
    cloudtasks.run_until_idle()
    assert result.state == states.FAILURE
    [dead] = cloudtasks.dead_letters
    assert dead.dead_letter["attempts"] >= 5  # both max_attempts and max_retry_duration


def test_run_until_idle_can_stop_at_a_horizon(cloudtasks, cloudtasks_app):
    @cloudtasks_app.task(shared=False)
    def later():
        return 1

    result = later.apply_async(countdown=3600)
    assert cloudtasks.run_until_idle(max_seconds=60) == 0
    assert result.state == states.PENDING and len(cloudtasks.pending) == 1
    cloudtasks.run_until_idle()
    assert result.get(timeout=0) == 1


def test_celery_fixtures_still_work(celery_app, celery_worker):
    @celery_app.task(shared=False)
    def mul(x, y):
        return x * y

    celery_worker.reload()
    assert mul.delay(3, 4).get(timeout=10) == 12
"""


def test_plugin_fixtures_in_a_user_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    pytester.makeconftest(
        "import pytest\n"
        "pytest_plugins = ['celery.contrib.pytest']\n"
        "@pytest.fixture(scope='session')\n"
        "def celery_config():\n"
        "    return {'broker_url': 'memory://', 'result_backend': 'cache+memory://'}\n"
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=4)


def test_overriding_the_app_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        proj="""
from celery import Celery
app = Celery("proj", set_as_current=False, backend="cache+memory://")

@app.task(shared=False, name="proj.hello")
def hello(name):
    return "hello " + name
"""
    )
    pytester.makeconftest(
        "import pytest, proj\n@pytest.fixture\ndef cloudtasks_app():\n    return proj.app\n"
    )
    pytester.makepyfile(
        test_proj="""
import proj

def test_hello(cloudtasks):
    result = proj.hello.delay("world")
    cloudtasks.run_until_idle()
    assert result.get(timeout=0) == "hello world"

def test_app_restored_after_the_harness(cloudtasks_app):
    assert "cloudtasks" not in str(cloudtasks_app.conf.broker_url)
"""
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=2)


def test_importing_the_plugin_is_cheap() -> None:
    code = (
        "import sys, celery_cloudtasks.testing\n"
        "heavy = [m for m in ('flask', 'google.cloud.tasks_v2', 'google.auth', 'werkzeug')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "[]"
