"""Shared fixtures: one Cloud Tasks emulator per test session, fresh queue IDs, free ports.

Fixtures of other areas live in their own modules; add them here with ``pytest_plugins``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from emulator import Emulator, find_free_port


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    """The session's emulator; fails (never skips) when ``scripts/setup`` has not run."""
    with Emulator() as emu:
        yield emu


@pytest.fixture
def fresh_queue_id() -> str:
    """A queue ID never used before: the emulator breaks on reused queue names."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    return find_free_port()
