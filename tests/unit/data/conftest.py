"""Shared fixtures: the real public data beside the repo, and small malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    # Fail, not skip: without the data these tests would silently check nothing.
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data directory not found: {SHARED_DATA.resolve()}")
    return SHARED_DATA
