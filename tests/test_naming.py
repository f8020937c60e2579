"""Task names: valid charset and length, deterministic, injective, hash first."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_cloudtasks.errors import ConfigurationError
from celery_cloudtasks.naming import (
    MAX_TASK_ID_LENGTH,
    idempotency_key,
    is_valid_task_id,
    queue_id_for,
    task_id_for,
)

VALID = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
keys = st.text(min_size=0, max_size=700)


@given(keys)
def test_task_id_is_valid_for_any_key(key: str) -> None:
    task_id = task_id_for(key)
    assert VALID.match(task_id)
    assert len(task_id) <= MAX_TASK_ID_LENGTH
    assert is_valid_task_id(task_id)


@given(keys)
def test_task_id_is_deterministic_and_starts_with_hash(key: str) -> None:
    first = task_id_for(key)
    assert first == task_id_for(key)
    assert re.match(r"^[0-9a-f]{8}[_-]", first)


@settings(max_examples=500)
@given(keys, keys)
def test_different_keys_never_share_an_id(a: str, b: str) -> None:
    if a != b:
        assert task_id_for(a) != task_id_for(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("a/b/0", "a_b/0"),  # the escape character itself
        ("a_2fb", "a/b"),  # an escape sequence spelled out
        ("x" * 600, "x" * 601),  # both hashed
        ("x" * 490, "x" * 491),  # one escaped, one hashed
        ("é", "_c3_a9"),
        ("", "_"),
    ],
)
def test_tricky_pairs_stay_distinct(a: str, b: str) -> None:
    assert task_id_for(a) != task_id_for(b)


def test_names_of_sequential_keys_do_not_share_prefixes() -> None:
    prefixes = {task_id_for(idempotency_key("run", f"task-{i}", 0))[:2] for i in range(200)}
    assert len(prefixes) > 100  # 256 possible two-hex prefixes: spread, not sequential


def test_celery_ids_stay_readable() -> None:
    key = idempotency_key(
        "5f2b8f0e-0c1d-4c8e-9a0a-2e6c1d7e9b10", "0f6c2a7e-3b7d-4f2e-8f7b-1f1c2d3e4f50", 2
    )
    assert task_id_for(key).endswith(
        "_5f2b8f0e-0c1d-4c8e-9a0a-2e6c1d7e9b10_2f0f6c2a7e-3b7d-4f2e-8f7b-1f1c2d3e4f50_2f2"
    )


def test_idempotency_key_format_and_validation() -> None:
    assert idempotency_key("r", "t", 3) == "r/t/3"
    with pytest.raises(ValueError, match="attempt"):
        idempotency_key("r", "t", -1)


def test_queue_ids() -> None:
    assert queue_id_for("celery") == "celery"
    assert queue_id_for("hi_prio.v2", prefix="shop-") == "shop-hi-prio-v2"
    for bad in ["", "a/b", "ü", "x" * 101]:
        with pytest.raises(ConfigurationError, match="queue_map"):
            queue_id_for(bad)


def test_replaced_task_gets_its_own_key() -> None:
    from celery_cloudtasks.naming import key_for_headers

    headers = {"id": "t", "root_id": "r", "retries": 1}
    assert key_for_headers(headers) == "r/t/1"
    assert key_for_headers({**headers, "replaced_task_nesting": 2}) == "r/t/1/replaced-2"
    assert key_for_headers({"id": "t", "retries": "bogus"}) == "t/t/0"
