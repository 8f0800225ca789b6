"""Fault injection for tests: a process SIGKILLs itself at a named point.

``COLA_FAULT_SIGKILL=<point>:<n>`` kills the process the ``n``-th time it reaches ``point`` (counted per process).
Unset (always, outside tests) every call is a dictionary lookup. Points:

- ``save_written``: a save's shard files are written (or handed to the async writer), nothing committed yet.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "COLA_FAULT_SIGKILL"
_reached: Counter = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
