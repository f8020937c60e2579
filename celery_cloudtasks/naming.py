"""Idempotent Cloud Tasks task names and valid queue IDs.

A Celery publish maps to the idempotency key ``{run_id}/{task_id}/{attempt}``
(run_id = ``root_id`` or the task id, attempt = the ``retries`` header; a
``Task.replace()`` adds ``/replaced-N``), and
the key to a task ID with :func:`task_id_for`:

* deterministic, only ``[A-Za-z0-9_-]``, at most 500 characters;
* starts with 8 hex digits of a SHA-256 of the key, so names spread evenly
  over Cloud Tasks' key space (sequential names create hot spots);
* injective: keys that fit are escaped reversibly (``<hash>_<escaped key>``,
  every byte outside ``[A-Za-z0-9-]`` written as ``_xx``); longer keys become
  ``<hash>-<full sha256>-<readable head>``, distinct from the first form by the
  ninth character and unique up to a SHA-256 collision.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "MAX_QUEUE_ID_LENGTH",
    "MAX_TASK_ID_LENGTH",
    "idempotency_key",
    "key_for_headers",
    "queue_id_for",
    "task_id_for",
]

MAX_TASK_ID_LENGTH = 500
MAX_QUEUE_ID_LENGTH = 100
_HASH_PREFIX = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")
_QUEUE_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,500}$")


def idempotency_key(run_id: str, task_id: str, attempt: int) -> str:
    """The key that names one attempt of one task: ``{run_id}/{task_id}/{attempt}``."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return f"{run_id}/{task_id}/{attempt}"


def key_for_headers(headers: Mapping[str, Any]) -> str:
    """The idempotency key of a Celery message (protocol 2 headers).

    ``Task.replace()`` republishes the same id and ``retries`` with a higher
    ``replaced_task_nesting``; that nesting becomes a key suffix, otherwise the
    replacement would be deduplicated against the task it replaces.
    """
    task_id = str(headers.get("id") or "")
    retries = headers.get("retries") or 0
    key = idempotency_key(
        str(headers.get("root_id") or task_id),
        task_id,
        retries if isinstance(retries, int) and retries >= 0 else 0,
    )
    nesting = headers.get("replaced_task_nesting") or 0
    if isinstance(nesting, int) and nesting > 0:
        key += f"/replaced-{nesting}"
    return key


def _escape_char(match: re.Match[str]) -> str:
    return "".join(f"_{b:02x}" for b in match[0].encode("utf-8", "surrogatepass"))


def _escape(key: str) -> str:
    """Every UTF-8 byte outside ``[A-Za-z0-9-]`` as ``_xx`` (reversible, prefix-free)."""
    return _UNSAFE.sub(_escape_char, key)


def task_id_for(key: str) -> str:
    """A valid, deterministic, collision-free Cloud Tasks task ID for ``key``."""
    data = key.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(data).hexdigest()
    escaped = _escape(key)
    if _HASH_PREFIX + 1 + len(escaped) <= MAX_TASK_ID_LENGTH:
        return f"{digest[:_HASH_PREFIX]}_{escaped}"
    head = escaped[: MAX_TASK_ID_LENGTH - _HASH_PREFIX - len(digest) - 2]
    return f"{digest[:_HASH_PREFIX]}-{digest}-{head}"


def is_valid_task_id(task_id: str) -> bool:
    """Whether ``task_id`` satisfies Cloud Tasks' task ID rules."""
    return bool(_TASK_ID.match(task_id))


def queue_id_for(name: str, *, prefix: str = "") -> str:
    """Map a Celery queue name to a Cloud Tasks queue ID (``[A-Za-z0-9-]``, <= 100).

    Underscores and dots become hyphens; any other character is an error, as
    is a result that is empty or too long: a silently mangled queue name would
    send tasks somewhere nobody looks.
    """
    candidate = (prefix + name).replace("_", "-").replace(".", "-")
    if not _QUEUE_ID.match(candidate):
        raise ConfigurationError(
            f"cannot map Celery queue {name!r} (prefix {prefix!r}) to a Cloud Tasks queue ID: "
            f"{candidate!r} must be 1-{MAX_QUEUE_ID_LENGTH} characters of [A-Za-z0-9-]; "
            "use queue_map to name it explicitly"
        )
    return candidate
