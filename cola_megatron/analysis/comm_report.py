"""Tensor-parallel communication of one transformer block: dense megatron vs CoLA ``pair`` vs CoLA ``bottleneck``.

Analytic model (docs/design.md §3). What is counted: for every collective the block issues on the TP group, the size of
the *full* tensor handed to it — the gathered output of an all-gather, the unreduced input of a reduce-scatter,
the tensor of an all-reduce — i.e. ``T · width · bytes_per_element`` with ``T = seq · micro_batch`` tokens of the
whole sequence. This is independent of TP; what one rank actually sends with ring algorithms is
``(tp-1)/tp`` of it for all-gather / reduce-scatter and ``2 (tp-1)/tp`` for all-reduce (printed as "ring bytes
sent per rank"). Widths per token (d hidden, r rank, f ffn, q = d query width, w = q + 2·kv qkv width):

=============  =========================================  ===============================================
scheme         forward                                    backward
=============  =========================================  ===============================================
dense, SP      AG d (qkv) + RS d (proj)                   qkv, fc1: AG d (megatron re-gathers the input for
               + AG d (fc1) + RS d (fc2)          = 4d    the weight gradient) + RS d; proj, fc2: AG d = 6d
dense          AR d (proj) + AR d (fc2)           = 2d    AR d (qkv) + AR d (fc1)                    = 2d
bottleneck,SP  AG 3r + RS r + AG 2r + RS r        = 7r    RS 3r + AG r + RS 2r + AG r                = 7r
bottleneck     AR r (proj) + AR r (fc2)           = 2r    AR 3r (qkv) + AR 2r (fc1)                  = 5r
pair, SP       qkv: AG d + RS w;  proj: AG q + RS d       the transposes: RS d + AG w; RS q + AG d;
               fc1: AG d + RS 2f; fc2:  AG f + RS d       RS d + AG 2f; RS f + AG d
               = 4d + w + q + 3f                          = 4d + w + q + 3f
pair           qkv: RS w; proj: AG q + AR d;              qkv: AR d + AG w; proj: RS q;
               fc1: RS 2f; fc2: AG f + AR d               fc1: AR d + AG 2f; fc2: RS f
=============  =========================================  ===============================================

(AG all-gather, RS reduce-scatter, AR all-reduce; in ``pair`` the w / 2f / q / f collectives act on the last
dimension, the d ones on the sequence.) With SP, TP=4 and the 1B shapes (d=2048, r=512): bottleneck 14r = 7168
vs dense 10d = 20480 elements per token and block, 0.35×.

Measured: ``main()`` spawns TP gloo processes on the CPU, builds one transformer layer from the project's spec and
runs forward + backward on a (sequence-sharded, under SP) input inside a :class:`CommCounter`; embedding, output
layer and loss are not part of it, nor is activation recomputation (which repeats forward collectives). The
sequence is reduced (the volume is linear in it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from cola_megatron.analysis.comm_counter import CommCounter, ring_bytes_per_rank
from cola_megatron.config import Config, ConfigError, config_from_dict, load_config

ARCHS = ("dense", "pair", "bottleneck")
FP32_BYTES = 4


@dataclass(frozen=True)
class Collective:
    phase: str  # 'forward' | 'backward'
    kind: str  # 'all_gather' | 'reduce_scatter' | 'all_reduce'
    width: int  # elements per token of the full tensor
    where: str


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    ffn: int
    rank: int
    heads: int
    query_groups: Optional[int] = None

    @property
    def q_width(self) -> int:
        return self.hidden

    @property
    def qkv_width(self) -> int:
        head_dim = self.hidden // self.heads
        return self.hidden + 2 * head_dim * (self.query_groups or self.heads)


def block_collectives(arch: str, shape: BlockShape, tp: int, sp: bool) -> List[Collective]:
    """The TP collectives of one block's forward and backward (see the module docstring's table)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {ARCHS}")
    if tp == 1:
        return []
    d, f, r, w, q = shape.hidden, shape.ffn, shape.rank, shape.qkv_width, shape.q_width
    out: List[Collective] = []

    def add(phase, kind, width, where):
        out.append(Collective(phase, kind, width, where))

    # (slot, column-type?, input width, output width, CoLA branches)
    slots = (("qkv", True, d, w, 3), ("proj", False, q, d, 1), ("fc1", True, d, 2 * f, 2), ("fc2", False, f, d, 1))
    for name, column, width_in, width_out, branches in slots:
        if arch == "dense":
            if column and sp:
                add("forward", "all_gather", d, f"{name} input")
                add("backward", "all_gather", d, f"{name} input, re-gathered for the weight gradient")
                add("backward", "reduce_scatter", d, f"{name} input gradient")
            elif column:
                add("backward", "all_reduce", d, f"{name} input gradient")
            elif sp:
                add("forward", "reduce_scatter", d, f"{name} output")
                add("backward", "all_gather", d, f"{name} output gradient")
            else:
                add("forward", "all_reduce", d, f"{name} output")
        elif arch == "bottleneck":
            z = branches * r
            if column and sp:
                add("forward", "all_gather", z, f"{name} σ(A·x)")
                add("backward", "reduce_scatter", z, f"{name} σ(A·x) gradient")
            elif column:
                add("backward", "all_reduce", z, f"{name} σ(A·x) gradient")
            elif sp:
                add("forward", "reduce_scatter", z, f"{name} A·x")
                add("backward", "all_gather", z, f"{name} A·x gradient")
            else:
                add("forward", "all_reduce", z, f"{name} A·x")
        else:  # pair
            if column:
                if sp:
                    add("forward", "all_gather", d, f"{name} input")
                    add("backward", "reduce_scatter", d, f"{name} input gradient")
                else:
                    add("backward", "all_reduce", d, f"{name} input gradient")
                add("forward", "reduce_scatter", width_out, f"{name} output, last dim")
                add("backward", "all_gather", width_out, f"{name} output gradient, last dim")
            else:
                add("forward", "all_gather", width_in, f"{name} input, last dim")
                add("backward", "reduce_scatter", width_in, f"{name} input gradient, last dim")
                if sp:
                    add("forward", "reduce_scatter", d, f"{name} output")
                    add("backward", "all_gather", d, f"{name} output gradient")
                else:
                    add("forward", "all_reduce", d, f"{name} output")
    return out


def analytic_bytes(
    collectives: Sequence[Collective], tokens: int, bytes_per_element: int = FP32_BYTES
) -> Dict[Tuple[str, str], int]:
    """(phase, kind) → full-tensor bytes for ``tokens`` tokens (the whole sequence × micro-batch)."""
    total: Dict[Tuple[str, str], int] = defaultdict(int)
    for c in collectives:
        total[(c.phase, c.kind)] += c.width * tokens * bytes_per_element
    return dict(total)


def ring_bytes(by_kind: Dict[Tuple[str, str], int], tp: int, phase: Optional[str] = None) -> float:
    return sum(ring_bytes_per_rank(kind, b, tp) for (p, kind), b in by_kind.items() if phase in (None, p))


def phase_total(by_kind: Dict[Tuple[str, str], int], phase: Optional[str] = None) -> int:
    return sum(b for (p, _), b in by_kind.items() if phase in (None, p))


# --------------------------------------------------------------------------------------------------------------
# Configurations


def arch_config(cfg: Config, arch: str, seq: int, micro_batch: int) -> Config:
    """The run config as a 1-layer fp32 model of ``arch`` ('dense', or a CoLA scheme) at ``seq`` tokens."""
    values = cfg.to_dict()
    # No recomputation: re-running a forward in backward repeats its collectives, which the table leaves out.
    values["model"].update(num_layers=1, seq_length=seq, max_position_embeddings=None, recompute="none",
                           arch="dense" if arch == "dense" else "cola")
    values["parallel"].update(pipeline_parallel=1, virtual_pipeline=None,
                              cola_tp_scheme=arch if arch != "dense" else cfg.parallel.cola_tp_scheme)
    values["train"].update(precision="fp32", pure_bf16=False, micro_batch_size=micro_batch,
                           global_batch_size=micro_batch)
    values["checkpoint"].update(save_interval=0, async_save=False)
    values["data"] = {"mock": True}
    return config_from_dict(values)


def block_shape(cfg: Config) -> BlockShape:
    m = cfg.model
    return BlockShape(m.hidden_size, m.padded_ffn_hidden_size, m.rank, m.num_attention_heads, m.num_query_groups)


# --------------------------------------------------------------------------------------------------------------
# Measurement (inside an initialised TP group)


def measure_block(cfg: Config, seed: int = 0) -> Dict[Tuple[str, str], int]:
    """Forward + backward of one transformer layer built from ``cfg``; returns (phase, kind) → bytes counted on
    this rank. Needs torch.distributed and megatron's parallel state initialised at ``cfg.parallel``."""
    from megatron.core.transformer.spec_utils import build_module

    from cola_megatron.models.build import transformer_config
    from cola_megatron.models.spec import layer_spec

    tp, sp = cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel
    # Initialise only this rank's shards (megatron's CPU init draws every full matrix on every rank first).
    tconfig = transformer_config(cfg, use_cpu_initialization=False)
    layer = build_module(layer_spec(cfg.model.arch, cfg.model.attention), config=tconfig, layer_number=1)
    seq = cfg.model.seq_length // tp if sp else cfg.model.seq_length
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq, cfg.train.micro_batch_size, cfg.model.hidden_size, generator=gen, requires_grad=True)
    with CommCounter() as comm:
        output, _ = layer(hidden, attention_mask=None)
        output.backward(torch.randn(output.shape, generator=gen))
    return {key: stats.bytes for key, stats in comm.by_kind().items()}


def _quiet_known_warnings() -> None:
    """Keep the report readable: megatron's notices about absent TE/apex and GPU tuning, and torch's renamed
    collectives (the CPU bridge already silences the RNG tracker's CPU-meaningless note)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _measure_worker(configs: Dict[str, Config]) -> Dict[str, Dict[Tuple[str, str], int]]:
    from cola_megatron.training.distributed import initialize_distributed

    _quiet_known_warnings()
    initialize_distributed(tensor_parallel=int(os.environ["WORLD_SIZE"]), device="cpu")
    return {arch: measure_block(cfg) for arch, cfg in configs.items()}


def measure(configs: Dict[str, Config], tp: int) -> Dict[str, Dict[Tuple[str, str], int]]:
    """Run :func:`measure_block` for each config on ``tp`` spawned gloo processes; rank 0's counts."""
    from cola_megatron.analysis.local_launch import run_distributed

    return run_distributed(_measure_worker, tp, configs)[0]


# --------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Bytes of tensor-parallel communication per transformer block, forward and backward: dense "
        "megatron vs CoLA 'pair' vs CoLA 'bottleneck', measured on CPU gloo processes and analytic.")
    p.add_argument("--config", help="YAML run config (model shapes); the flags below override it")
    p.add_argument("--d", type=int, help="hidden size")
    p.add_argument("--r", type=int, help="CoLA rank (default d/4)")
    p.add_argument("--ffn", type=int, help="ffn hidden size")
    p.add_argument("--heads", type=int, help="attention heads (default d/64)")
    p.add_argument("--seq", type=int, help="sequence length of the analytic figures (default: the config's)")
    p.add_argument("--micro-batch", type=int, help="micro-batch of the analytic figures (default: the config's)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--sp", action="store_true", help="sequence parallelism")
    p.add_argument("--measure-seq", type=int, default=None,
                   help="reduced sequence length of the measured run (default 8 * tp)")
    p.add_argument("--measure-batch", type=int, default=1, help="micro-batch of the measured run")
    p.add_argument("--no-measure", action="store_true", help="analytic figures only")
    return p


def _base_config(args) -> Config:
    if args.config:
        cfg = load_config(args.config)
        values = cfg.to_dict()
    else:
        if not (args.d and args.ffn):
            raise ConfigError("comm_report: give --config FILE, or the shapes --d and --ffn (and optionally --r, "
                              "--heads, --seq, --micro-batch)")
        values = {"model": {"hidden_size": args.d, "ffn_hidden_size": args.ffn, "rank": args.d // 4,
                            "num_attention_heads": max(1, args.d // 64)}, "train": {}, "parallel": {}}
    m = values["model"]
    for flag, key in (("d", "hidden_size"), ("r", "rank"), ("ffn", "ffn_hidden_size"), ("heads", "num_attention_heads"),
                      ("seq", "seq_length")):
        if getattr(args, flag) is not None:
            m[key] = getattr(args, flag)
    if args.micro_batch is not None:
        values["train"]["micro_batch_size"] = args.micro_batch
    values["train"]["global_batch_size"] = values["train"].get("micro_batch_size", 1)
    values["parallel"].update(tensor_parallel=args.tp, sequence_parallel=args.sp, pipeline_parallel=1,
                              virtual_pipeline=None)
    values["data"] = {"mock": True}
    values.setdefault("checkpoint", {}).update(save_interval=0, async_save=False)
    return config_from_dict(_pad_ffn(values, args.tp))


def _pad_ffn(values: dict, tp: int) -> dict:
    """ffn must split over TP; pad it (as model.ffn_multiple_of would) and say so."""
    m = values["model"]
    multiple = m.get("ffn_multiple_of", 1)
    padded = -(-m["ffn_hidden_size"] // multiple) * multiple
    if padded % tp:
        m["ffn_multiple_of"] = multiple * tp // _gcd(multiple, tp)
        new = -(-m["ffn_hidden_size"] // m["ffn_multiple_of"]) * m["ffn_multiple_of"]
        print(f"note: ffn_hidden_size {m['ffn_hidden_size']} is not divisible by tp={tp}; padded to {new} "
              f"(model.ffn_multiple_of={m['ffn_multiple_of']})")
    return values


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _mb(b: float) -> str:
    return f"{b / 2**20:10.3f}"


def report(cfg: Config, measured: Optional[Dict[str, Dict[Tuple[str, str], int]]], measure_tokens: int) -> List[str]:
    m, p = cfg.model, cfg.parallel
    tp, sp = p.tensor_parallel, p.sequence_parallel
    tokens = m.seq_length * cfg.train.micro_batch_size
    shape = block_shape(cfg)
    lines = [
        f"TP communication per transformer block: d={m.hidden_size} r={m.rank} ffn={shape.ffn} heads={m.num_attention_heads} "
        f"tp={tp} sp={'on' if sp else 'off'}",
        "bytes = size of the full tensor handed to each collective, fp32 activations (bf16 training moves half); "
        "ring = bytes one rank sends with ring algorithms",
    ]
    if measured is not None:
        lines += ["", f"measured (CPU gloo, 1 layer) vs analytic at seq x micro-batch = {measure_tokens} tokens, bytes:",
                  f"{'arch':<11}{'fwd measured':>14}{'fwd analytic':>14}{'bwd measured':>14}{'bwd analytic':>14}  match"]
        for arch in ARCHS:
            analytic = analytic_bytes(block_collectives(arch, shape, tp, sp), measure_tokens)
            got = measured[arch]
            match = "yes" if got == analytic else "NO"
            lines.append(f"{arch:<11}{phase_total(got, 'forward'):>14}{phase_total(analytic, 'forward'):>14}"
                         f"{phase_total(got, 'backward'):>14}{phase_total(analytic, 'backward'):>14}  {match}")
    lines += ["", f"analytic at seq {m.seq_length} x micro-batch {cfg.train.micro_batch_size} = {tokens} tokens, MiB:",
              f"{'arch':<11}{'elem/token':>11}{'forward':>11}{'backward':>11}{'total':>11}{'ring/rank':>11}"]
    totals = {}
    for arch in ARCHS:
        collectives = block_collectives(arch, shape, tp, sp)
        b = analytic_bytes(collectives, tokens)
        totals[arch] = phase_total(b)
        per_token = sum(c.width for c in collectives)
        lines.append(f"{arch:<11}{per_token:>11}{_mb(phase_total(b, 'forward'))} {_mb(phase_total(b, 'backward'))} "
                     f"{_mb(totals[arch])} {_mb(ring_bytes(b, tp))}")
    source = measured if measured is not None else {a: {("all", "all"): totals[a]} for a in ARCHS}
    dense = phase_total(source["dense"])
    lines.append("")
    if dense == 0:
        lines.append("no tensor-parallel communication at tp=1")
        return lines
    lines.append(f"forward + backward bytes per block, {'measured' if measured is not None else 'analytic'}:")
    lines.append(f"ratio pair/dense: {phase_total(source['pair']) / dense:.2f}")
    lines.append(f"ratio bottleneck/dense: {phase_total(source['bottleneck']) / dense:.2f}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _base_config(args)
        measure_seq = args.measure_seq or 8 * args.tp
        configs = {arch: arch_config(cfg, arch, measure_seq, args.measure_batch) for arch in ARCHS}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    measured = None if args.no_measure else measure(configs, args.tp)
    print("\n".join(report(cfg, measured, measure_seq * args.measure_batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
