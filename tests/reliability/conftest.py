"""Fixtures of the reliability tests that share the module's private instance (``serve_instance``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shoal import serve


@pytest.fixture(scope="module")
def url(serve_instance: Any) -> str:
    """The instance's HTTP address."""
    base = serve.get_http_url()
    assert base is not None
    return base


@pytest.fixture
def http_app(serve_instance: Any) -> Iterator[Callable[..., Any]]:
    """``http_app(app, name)``: run ``app`` at ``/name`` (returns its handle); deleted after the test."""
    names: list[str] = []

    def deploy(app: Any, name: str) -> Any:
        if name not in names:
            names.append(name)
        return serve.run(app, name=name, route_prefix=f"/{name}")

    yield deploy
    for name in reversed(names):
        serve.delete(name)
