"""Run a function on N gloo processes on this machine and collect each rank's return value.

Used by the tests and by tools that measure multi-process behaviour on a CPU (``comm_report``). Start-up (importing
megatron-core, creating process groups) dominates on a small CPU, so callers run several cases inside one launched
group rather than one launch per case. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

from cola_megatron.training.distributed import free_port



def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException:  # report the failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from cola_megatron.training.distributed import destroy_distributed

        try:
            destroy_distributed()
        except Exception:
            pass


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> List[Any]:
    """``fn(*args)`` on ``world_size`` processes (RANK/WORLD_SIZE set as torchrun would); returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = _get(queue, procs, timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _get(queue, procs, timeout: float):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not queue.empty():
            return queue.get()
        if any(p.exitcode not in (None, 0) for p in procs):
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if queue.empty():
                return dead[0], "error", f"process exited with code {procs[dead[0]].exitcode}"
        time.sleep(0.05)
    return -1, "error", f"timed out after {timeout:.0f}s"
