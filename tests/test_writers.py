"""The results manager megatron's checkpoint writers report through outlives a scheduler's SIGTERM (Slurm signals
every process of a job step while the trainer is saving through it, or still starting) and dies with the trainer."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent("""
    import multiprocessing, sys, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from cola_megatron.training.checkpoint import writers

    writers.install()
    queue = filesystem_async._results_queue
    (manager,) = multiprocessing.active_children()
    print(manager.pid, flush=True)
    sys.stdin.readline()  # the test has sent SIGTERM to the manager
    queue.put("saved")
    print(queue.get(), flush=True)
    sys.stdin.readline()  # the test kills this process next
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_results_manager_survives_sigterm_and_dies_with_trainer():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        manager = int(proc.stdout.readline())
        os.kill(manager, signal.SIGTERM)
        os.kill(manager, signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "saved"  # the queue still answers after the signals
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(manager) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(manager), "the results manager outlived the trainer"
    finally:
        proc.kill()


STARTING = textwrap.dedent("""
    import os, signal, sys, threading, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from cola_megatron.training.checkpoint import writers

    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # as the trainer's stop handler
    starting = threading.Event()

    def scheduler():  # SIGTERM to every process of the group, as Slurm's time limit, while the manager starts
        while not starting.is_set():
            os.killpg(os.getpgrp(), signal.SIGTERM)
            time.sleep(0.02)

    thread = threading.Thread(target=scheduler)
    thread.start()
    try:
        writers.install()
    finally:
        starting.set()
        thread.join()
    time.sleep(0.2)  # the signals held back during the start reach the handler
    queue = filesystem_async._results_queue
    queue.put("saved")
    print(queue.get(), len(seen) > 0, flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signal masks across exec are POSIX; Linux's here")
def test_sigterm_while_the_results_manager_starts_neither_kills_it_nor_is_lost():
    proc = subprocess.run([sys.executable, "-c", STARTING], capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # its own process group, which it signals
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["saved", "True"], proc.stdout
