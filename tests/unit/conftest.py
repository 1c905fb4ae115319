"""Fixtures shared by the unit tests of several packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic_preferences import synthetic_tokenizer


@pytest.fixture
def write_file(tmp_path):
    """write_file(name, *lines) -> path; str lines are UTF-8 encoded, bytes written as they are."""

    def write(name: str, *lines: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
        return path

    return write


@pytest.fixture(scope="session")
def rm_tokenizer_dir(tmp_path_factory):
    """A small tokenizer for the synthetic preference data (tests/synthetic_preferences.py)."""
    out = tmp_path_factory.mktemp("rm_tokenizer") / "tokenizer"
    synthetic_tokenizer(out)
    return out
