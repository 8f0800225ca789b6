"""``train.profile``: a torch.profiler trace of a window of iterations on chosen ranks, and on CUDA a memory snapshot.

Each traced rank writes into the profile directory:

- ``rank<R>.<id>.pt.trace.json``: the Chrome trace (chrome://tracing, ui.perfetto.dev), named the way TensorBoard's
  profiler plugin finds it (``tensorboard --logdir <dir>``); written by ``torch.profiler.tensorboard_trace_handler``.
- ``rank<R>.ops.txt``: the operators of the window by self time (``key_averages``), readable without a viewer.
- ``rank<R>.memory_snapshot.pickle`` (CUDA only): ``torch.cuda.memory._dump_snapshot`` of the window's
  allocations, for pytorch.org/memory_viz.

Every traced iteration is labelled ``iteration N`` in the trace, N numbered as on the metric line.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from cola_megatron.config import Config

MEMORY_HISTORY_ENTRIES = 100_000


def profile_dir(cfg: Config) -> str:
    p = cfg.train.profile
    if p.dir:
        return p.dir
    return os.path.join(cfg.logging.log_dir, "profile") if cfg.logging.log_dir else "profile"


def describe(cfg: Config) -> str:
    """What the window writes and where, for the logging rank (which may not trace itself)."""
    p = cfg.train.profile
    ranks = ",".join(str(r) for r in p.ranks)
    return f"{profile_dir(cfg)} (iterations {p.start_step}-{p.end_step}, rank{'s' if len(p.ranks) > 1 else ''} {ranks})"


class StepProfiler:
    """Call :meth:`before_step` and :meth:`after_step` around every training iteration (numbered from 1)."""

    def __init__(self, cfg: Config, rank: int, device: torch.device):
        p = cfg.train.profile
        self.start, self.end = p.start_step, p.end_step
        self.active = p.enabled and rank in p.ranks
        self.rank = rank
        self.dir = profile_dir(cfg)
        # By the work's device, not by whether the machine has a GPU.
        cuda = device.type == "cuda"
        self.cuda_activity = cuda
        self.sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        self.memory = p.memory_snapshot and cuda
        self._prof = None
        self._label = None
        self.done = False

    def before_step(self, iteration: int) -> None:
        if not self.active or self.done or not self.start <= iteration <= self.end:
            return
        if self._prof is None:
            self._begin()
        self._label = torch.profiler.record_function(f"iteration {iteration}")
        self._label.__enter__()

    def after_step(self, iteration: int) -> None:
        if self._prof is None:
            return
        self._label.__exit__(None, None, None)
        self._label = None
        if iteration >= self.end:
            self._finish()

    def close(self) -> None:
        """A run that stops inside the window still writes what it traced."""
        if self._prof is not None:
            if self._label is not None:
                self._label.__exit__(None, None, None)
                self._label = None
            self._finish()

    def _begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        os.makedirs(self.dir, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.cuda_activity:
            activities.append(ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                             on_trace_ready=tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}"))
        self._prof.start()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        prof.stop()  # writes the trace through on_trace_ready
        with open(os.path.join(self.dir, f"rank{self.rank}.ops.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=self.sort_by, row_limit=40) + "\n")
        if self.memory:
            torch.cuda.memory._dump_snapshot(os.path.join(self.dir, f"rank{self.rank}.memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.done = True


def window_finished(cfg: Config, iteration: int, started_at: int) -> Optional[str]:
    """The description to show on the metric line once the window ended (None before, or when nothing was
    traced because the run started past the window)."""
    p = cfg.train.profile
    if not p.enabled or started_at >= p.end_step or iteration < min(p.end_step, cfg.train.train_iters):
        return None
    return describe(cfg)
