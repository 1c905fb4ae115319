"""`orlhf launch` and `orlhf pipeline`: the launcher (a package of its own that imports
neither torch nor offline_rlhf) behind the same entry point as every stage."""

from __future__ import annotations

from launcher.cli import main

__all__ = ["main"]
