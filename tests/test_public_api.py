"""The public names: an explicit __all__, every name importable, the error tree rooted."""

from __future__ import annotations

import inspect

import celery_cloudtasks
from celery_cloudtasks import errors


def test_every_public_name_resolves() -> None:
    assert sorted(celery_cloudtasks.__all__) == celery_cloudtasks.__all__
    for name in celery_cloudtasks.__all__:
        assert getattr(celery_cloudtasks, name) is not None, name


def test_dispatcher_is_exported_lazily() -> None:
    from celery_cloudtasks.dispatcher import CloudTasksDispatcher

    assert celery_cloudtasks.CloudTasksDispatcher is CloudTasksDispatcher


def test_every_error_derives_from_the_root_and_is_drawn_in_the_docstring() -> None:
    classes = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == errors.__name__
    ]
    assert len(classes) == len(errors.__all__)
    for cls in classes:
        assert issubclass(cls, errors.CloudTasksError), cls
        assert cls.__name__ in (errors.__doc__ or ""), cls
