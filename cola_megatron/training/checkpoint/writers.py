"""Checkpoint writer processes die with the trainer.

megatron-core 0.16.1 writes shards from processes forked by the trainer (and, with ``async_save``, forked again by
a background process), and collects their results through a ``multiprocessing`` manager process it spawns. A
trainer killed with SIGKILL (OOM killer, ``scancel``, a node health check) leaves them running as orphans that hold
hundreds of MB and the run's open files. Linux's parent-death signal ends each of them with its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
from multiprocessing.context import SpawnProcess

_PR_SET_PDEATHSIG = 1
_installed = False
_forking_parent = 0


def die_with_parent(parent_pid: int) -> None:
    """In a child: SIGKILL this process when its parent exits (and now, if the parent is already gone)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to arm
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def _serve_results(parent_pid: int) -> None:
    """Initializer of the results manager: it ignores SIGTERM and SIGINT, which a scheduler sends to every process
    of a job step (Slurm's scancel and time limit) while the trainer is still saving through it, and dies with the
    trainer instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)


def _remember_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_forking_parent)


def install() -> None:
    """Arm every process this process forks from now on (and their forks), and the manager process megatron's
    writers report through. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    os.register_at_fork(before=_remember_parent, after_in_child=_after_fork_in_child)
    _start_results_manager()


def _start_results_manager() -> None:
    """megatron spawns (fork + exec: no fork hooks) a manager for its writers' results queue on first use; start
    it here instead, with the parent-death signal as its initializer. Found on megatron-core 0.16.1, where the
    queue lives in ``filesystem_async._results_queue``."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already started, or a megatron-core without this global
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=_SpawnsImmune())
    manager.start(_serve_results, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


_STOPPING = (signal.SIGTERM, signal.SIGINT)


class _ImmuneProcess(SpawnProcess):
    """A spawned process that ignores SIGTERM and SIGINT from its first instruction.

    A new interpreter takes about a second to reach the manager's initializer. A scheduler's SIGTERM in that second
    (a time limit or scancel while the trainer starts up) killed the manager, and the trainer with it (EOFError).
    An ignored disposition is the one thing that survives exec, so the parent ignores the two signals for the few
    milliseconds of fork and exec and then restores its own handlers."""

    def start(self):
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOPPING}
        try:
            super().start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _SpawnsImmune:
    """The multiprocessing context SyncManager takes (it uses only ``Process``)."""

    Process = _ImmuneProcess
