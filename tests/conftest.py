"""Test tiers by folder: `distributed/` and `integration/` are `slow` (so `pytest -m "not
slow"` is the fast inner loop), `gpu/` is `gpu` and skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = Path(__file__).resolve().parent
SLOW = ("distributed", "integration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(item.fspath).resolve().relative_to(TIERS).parts[0]
        if tier in SLOW:
            item.add_marker(pytest.mark.slow)
        if tier == "gpu":
            item.add_marker(pytest.mark.gpu)
            item.add_marker(pytest.mark.skipif(not _cuda(), reason="needs a CUDA device"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
