"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from streams.settings import Settings, get_settings

T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns a truthy value; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()
