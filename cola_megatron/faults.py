"""Fault injection for tests: a process SIGKILLs itself at a named point.

``COLA_FAULT_SIGKILL=<point>:<n>`` kills the process the ``n``-th time it reaches ``point`` (counted per process).
Unset (always, outside tests) every call is a dictionary lookup. The points of a checkpoint save, in order:

- ``save_start``: the ``iter_N`` directory exists, nothing is written into it yet.
- ``shard_write``: the ``n``-th save's first writer process finished its file while the others may still write
  (megatron writes shards from forked processes, in a background process too with ``async_save``); that writer
  SIGKILLs the trainer, then lingers as an orphan would unless it dies with its parent.
- ``save_written``: a save's shard files are written (or handed to the async writer), nothing committed yet.
- ``save_committing``: every rank's files and megatron's ``metadata.json`` are written; no manifest yet.
- ``save_before_latest``: manifest and ``cola_config.yaml`` written, the new ``latest`` in its temporary file,
  not yet renamed into place.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "COLA_FAULT_SIGKILL"
_reached: Counter = Counter()
_trainer_pid = None


def _target():
    spec = os.environ.get(ENV)
    if not spec:
        return None, 0
    target, _, count = spec.partition(":")
    return target, int(count or 1)


def point(name: str) -> None:
    target, count = _target()
    if target is None:
        return
    _reached[name] += 1
    if name == "save_start" and target == "shard_write":
        _arm_shard_write(_reached[name] == count)
    if target == name and _reached[name] == count:
        os.kill(os.getpid(), signal.SIGKILL)


def _arm_shard_write(armed: bool) -> None:
    """Wrap megatron's per-process shard writer so that, in the armed save, the first writer kills the trainer."""
    global _trainer_pid
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.__dict__["write_preloaded_data"]
    original = getattr(original, "__wrapped_writer__", original)
    if not armed:
        FileSystemWriterAsync.write_preloaded_data = original
        return
    _trainer_pid = os.getpid()
    function = original.__func__ if isinstance(original, staticmethod) else original

    def write_then_kill(*args, **kwargs):
        function(*args, **kwargs)
        if kwargs.get("local_proc_idx", 0) == 0:
            os.kill(_trainer_pid, signal.SIGKILL)
            time.sleep(60)  # an orphan would still be here long after the trainer's death

    wrapped = staticmethod(write_then_kill)
    wrapped.__wrapped_writer__ = original
    FileSystemWriterAsync.write_preloaded_data = wrapped
