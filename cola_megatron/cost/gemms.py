"""The GEMMs of one transformer layer on one tensor-parallel rank, as this project's layers run them.

Each entry is one forward GEMM ``(M, K) @ (K, N)``: M the tokens it sees (the whole micro-batch, or this rank's
1/TP of it where a weight is TP-replicated and sequence parallelism splits the tokens), K the input width, N the
output width. Its backward runs two more (input gradient M×N·N×K, weight gradient N×M·M×K); the recompute modes
that run its forward again are listed with it (docs/design.md §4: CoLA-M re-runs the B projections that feed the
attention core and the GLU; ``full`` re-runs the whole layer).

Widths come from the config: q is ``hidden_size`` wide, k and v ``kv_width`` (``num_query_groups`` × head_dim,
the heads' width when null), so grouped-query attention changes the k/v entries only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List

from cola_megatron.config import ModelConfig
from cola_megatron.models.accounting import kv_width

SLOTS = ("qkv", "proj", "fc1", "fc2")
ALL_RECOMPUTE = frozenset({"full"})
COLA_M_AND_FULL = frozenset({"cola_m", "full"})


@dataclass(frozen=True)
class Gemm:
    slot: str
    """megatron's linear slot (qkv, proj, fc1, fc2) or ``output`` (the output layer)."""
    part: str
    """What it computes, e.g. ``q B`` or ``gate|up`` (dense fused)."""
    m: int
    k: int
    n: int
    recomputed_by: FrozenSet[str] = ALL_RECOMPUTE


def layer_gemms(m: ModelConfig, tokens: int, tp: int = 1, sequence_parallel: bool = False,
                scheme: str = "bottleneck") -> List[Gemm]:
    """One layer's forward GEMMs for a micro-batch of ``tokens`` tokens (``scheme``: the CoLA TP scheme)."""
    d, f, r, kv = m.hidden_size, m.padded_ffn_hidden_size, m.rank, kv_width(m)
    local = tokens // (tp if sequence_parallel else 1)  # tokens a TP-replicated weight sees
    q = d  # attention width (heads × head_dim)
    if m.arch == "dense":
        return [
            Gemm("qkv", "q|k|v", tokens, d, (q + 2 * kv) // tp),
            Gemm("proj", "o", tokens, q // tp, d),
            Gemm("fc1", "gate|up", tokens, d, 2 * f // tp),
            Gemm("fc2", "down", tokens, f // tp, d),
        ]
    branches = {"qkv": (("q", q), ("k", kv), ("v", kv)), "fc1": (("gate", f), ("up", f))}
    out: List[Gemm] = []
    if scheme == "bottleneck":
        for slot, outs in branches.items():
            # A: TP-replicated, the branches' A's fused along N; B: column-parallel on the gathered tokens.
            out.append(Gemm(slot, "|".join(name for name, _ in outs) + " A", local, d, len(outs) * r))
            out += [Gemm(slot, f"{name} B", tokens, r, width // tp, COLA_M_AND_FULL) for name, width in outs]
        for slot, name, width_in in (("proj", "o", q), ("fc2", "down", f)):
            # A: row-parallel on this rank's input columns; B: TP-replicated on this rank's tokens.
            out.append(Gemm(slot, f"{name} A", tokens, width_in // tp, r))
            out.append(Gemm(slot, f"{name} B", local, r, d))
        return _ordered(out)
    if scheme == "pair":
        # A column-parallel along r, B row-parallel: every rank sees every token at full input/output width.
        for slot, outs in branches.items():
            out.append(Gemm(slot, "|".join(name for name, _ in outs) + " A", tokens, d, len(outs) * r // tp))
            out += [Gemm(slot, f"{name} B", tokens, r // tp, width, COLA_M_AND_FULL) for name, width in outs]
        for slot, name, width_in in (("proj", "o", q), ("fc2", "down", f)):
            out.append(Gemm(slot, f"{name} A", tokens, width_in, r // tp))
            out.append(Gemm(slot, f"{name} B", tokens, r // tp, d))
        return _ordered(out)
    raise ValueError(f"unknown CoLA TP scheme {scheme!r}")


def output_layer_gemm(m: ModelConfig, tokens: int, tp: int = 1) -> Gemm:
    return Gemm("output", "logits", tokens, m.hidden_size, m.vocab_size // tp, frozenset())


def _ordered(gemms: List[Gemm]) -> List[Gemm]:
    return sorted(gemms, key=lambda g: SLOTS.index(g.slot))
