"""A SIGTERM that reaches a training process while it starts up, before the loop installs its stop handler.

Without this the process would die of it and the stop would fail the job; remembered, the run trains one iteration,
checkpoints and stops like any stop. Importing this module is cheap, so the handler goes in before torch loads.
"""

from __future__ import annotations

import signal
from typing import Optional

_received: Optional[int] = None


def _remember(signum, frame):
    global _received
    _received = signum


def catch_early_sigterm() -> None:
    try:
        signal.signal(signal.SIGTERM, _remember)
    except ValueError:  # not the main thread: signals stay as they are
        pass


def early_signal() -> Optional[int]:
    """The SIGTERM received during start-up, if any."""
    return _received
