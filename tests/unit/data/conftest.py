"""Shared fixtures: the real public data beside the repo, and small malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repo is cloned with `shared/` beside it; never hard-code an absolute path.
SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    # Fail, not skip: without the data these tests would silently check nothing.
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data directory not found: {SHARED_DATA.resolve()}")
    return SHARED_DATA


@pytest.fixture
def write_file(tmp_path):
    """write_file(name, *lines) -> path; str lines are UTF-8 encoded, bytes written as they are."""

    def write(name: str, *lines: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
        return path

    return write
