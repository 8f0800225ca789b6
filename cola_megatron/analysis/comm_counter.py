"""Count torch.distributed collectives: calls and bytes per operation, tagged forward / backward.

    with CommCounter() as comm:
        loss = model(...); loss.backward()
    comm.bytes(phase="forward", kind="all_gather")

What is counted as ``bytes`` is the size of the *full* tensor the collective works on, whatever the group size:
the gathered output of an all-gather, the unreduced input of a reduce-scatter, the tensor of an all-reduce or a
broadcast, the sent / received tensor of a point-to-point op. :func:`ring_bytes_per_rank` turns that into what one
rank sends with ring algorithms.

Phases: a collective issued while autograd runs a backward node is tagged ``backward``, any other ``forward``;
``with comm.phase("optimizer"):`` tags explicitly.

How calls are seen: the wrappers replace the functions on ``torch.distributed`` *and* every module-level alias of
them in loaded modules (megatron-core binds ``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` at
import time, so patching the ``torch.distributed`` attribute alone misses its sequence-parallel collectives). A
collective that calls another one internally (``all_gather_into_tensor`` → ``all_gather_single`` in torch ≥ 2.13)
counts once, under the name it was called by.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.distributed.distributed_c10d as c10d

# op name → (collective kind, which argument holds the full tensor: a position, and its keyword name)
_OPS: Dict[str, Tuple[str, int, str]] = {
    "all_reduce": ("all_reduce", 0, "tensor"),
    "broadcast": ("broadcast", 0, "tensor"),
    "reduce": ("reduce", 0, "tensor"),
    "all_gather_single": ("all_gather", 0, "output_tensor"),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "_all_gather_base": ("all_gather", 0, "output_tensor"),
    "all_gather": ("all_gather", 0, "tensor_list"),
    "reduce_scatter_single": ("reduce_scatter", 1, "input"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "_reduce_scatter_base": ("reduce_scatter", 1, "input"),
    "reduce_scatter": ("reduce_scatter", 1, "input_list"),
    "all_to_all_single": ("all_to_all", 1, "input"),
    "all_to_all": ("all_to_all", 1, "input_tensor_list"),
    "send": ("send", 0, "tensor"),
    "isend": ("send", 0, "tensor"),
    "recv": ("recv", 0, "tensor"),
    "irecv": ("recv", 0, "tensor"),
}

KINDS = tuple(sorted({kind for kind, _, _ in _OPS.values()}))


def ring_bytes_per_rank(kind: str, full_bytes: float, group_size: int) -> float:
    """Bytes one rank sends for a collective on a tensor of ``full_bytes`` with ring algorithms."""
    if group_size <= 1:
        return 0.0
    share = (group_size - 1) / group_size
    if kind == "all_reduce":  # reduce-scatter + all-gather
        return 2 * share * full_bytes
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return share * full_bytes
    return float(full_bytes)


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _argument(args, kwargs, position: int, keyword: str):
    if keyword in kwargs:
        return kwargs[keyword]
    return args[position] if len(args) > position else None


class CommCounter(contextlib.ContextDecorator):
    """Counts collectives issued by this process while active. Not re-entrant; one active counter at a time."""

    _active: Optional["CommCounter"] = None

    def __init__(self, ops: Iterable[str] = tuple(_OPS) + ("batch_isend_irecv",)):
        unknown = set(ops) - set(_OPS) - {"batch_isend_irecv"}
        if unknown:
            raise ValueError(f"cannot count {sorted(unknown)}: known ops are {sorted(_OPS)} and batch_isend_irecv")
        self.ops = tuple(op for op in ops if hasattr(c10d, op))
        self.stats: Dict[Tuple[str, str], OpStats] = defaultdict(OpStats)  # (phase, op) → stats
        self._explicit_phase: Optional[str] = None
        self._local = threading.local()
        self._patched: list = []  # (namespace, attribute, original)

    # ---------------------------------------------------------------------------------------------------------
    # Reading

    def bytes(self, phase: Optional[str] = None, kind: Optional[str] = None, op: Optional[str] = None) -> int:
        return sum(s.bytes for key, s in self.stats.items() if self._matches(key, phase, kind, op))

    def calls(self, phase: Optional[str] = None, kind: Optional[str] = None, op: Optional[str] = None) -> int:
        return sum(s.calls for key, s in self.stats.items() if self._matches(key, phase, kind, op))

    def by_kind(self) -> Dict[Tuple[str, str], OpStats]:
        """(phase, kind) → stats, merging the aliases of one collective (``_all_gather_base`` and
        ``all_gather_into_tensor`` are both ``all_gather``)."""
        merged: Dict[Tuple[str, str], OpStats] = defaultdict(OpStats)
        for (phase, op), s in self.stats.items():
            m = merged[(phase, _OPS[op][0])]
            m.calls += s.calls
            m.bytes += s.bytes
        return dict(merged)

    def summary(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Plain nested dict ``{phase: {op: {"calls": n, "bytes": b}}}`` (picklable, for multi-process tests)."""
        out: Dict[str, Dict[str, Dict[str, int]]] = {}
        for (phase, op), s in sorted(self.stats.items()):
            out.setdefault(phase, {})[op] = {"calls": s.calls, "bytes": s.bytes}
        return out

    def reset(self) -> None:
        self.stats.clear()

    @staticmethod
    def _matches(key, phase, kind, op) -> bool:
        p, o = key
        return (phase is None or p == phase) and (op is None or o == op) and (kind is None or _OPS[o][0] == kind)

    # ---------------------------------------------------------------------------------------------------------
    # Tagging

    @contextlib.contextmanager
    def phase(self, name: str):
        """Tag collectives issued inside the block as ``name`` (overrides forward/backward detection)."""
        previous, self._explicit_phase = self._explicit_phase, name
        try:
            yield self
        finally:
            self._explicit_phase = previous

    def _current_phase(self) -> str:
        if self._explicit_phase is not None:
            return self._explicit_phase
        return "backward" if torch._C._current_autograd_node() is not None else "forward"

    def _record(self, op: str, nbytes: int) -> None:
        s = self.stats[(self._current_phase(), op)]
        s.calls += 1
        s.bytes += nbytes

    # ---------------------------------------------------------------------------------------------------------
    # Patching

    def _wrap(self, op: str, original: Callable) -> Callable:
        counter = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            local = counter._local
            outermost = not getattr(local, "inside", False)
            if outermost:
                if op == "batch_isend_irecv":
                    for p2p in _argument(args, kwargs, 0, "p2p_op_list") or ():
                        name = getattr(p2p.op, "__name__", "isend")
                        counter._record("irecv" if "recv" in name else "isend", _nbytes(p2p.tensor))
                else:
                    _, position, keyword = _OPS[op]
                    counter._record(op, _nbytes(_argument(args, kwargs, position, keyword)))
                local.inside = True
            try:
                return original(*args, **kwargs)
            finally:
                if outermost:
                    local.inside = False

        wrapper.__wrapped_collective__ = original
        return wrapper

    def __enter__(self) -> "CommCounter":
        if CommCounter._active is not None:
            raise RuntimeError("a CommCounter is already active in this process; nest phases with counter.phase()")
        originals = {op: getattr(c10d, op) for op in self.ops}
        wrappers = {op: self._wrap(op, fn) for op, fn in originals.items()}
        by_identity = {id(fn): op for op, fn in originals.items()}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                op = by_identity.get(id(value))
                if op is not None and value is originals[op]:
                    namespace[attr] = wrappers[op]
                    self._patched.append((namespace, attr, value))
        CommCounter._active = self
        return self

    def __exit__(self, *exc) -> None:
        for namespace, attr, original in reversed(self._patched):
            namespace[attr] = original
        self._patched.clear()
        CommCounter._active = None
