"""Paths as the filesystem has them: shared by the up-front output checks and the writers that clean up."""

from __future__ import annotations

import os


def existing_ancestor(path: str) -> str:
    """``path`` itself when it exists, else its nearest ancestor that does (what ``os.makedirs`` would build on)."""
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe
