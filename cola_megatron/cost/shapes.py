"""GEMM widths that run slowly, named before a run pays for them (cola-train --dry-run, a run's start-up, cola-plan).

A width (ffn, r, hidden/TP, ffn/TP, vocab/TP) that is not a multiple of 128 (of 64 below 512) is computed in whole
128-wide tiles, and one that is not even a multiple of 8 falls off the tensor-core kernels (the H100 data: a
5461-wide GEMM at about a fifth of an aligned one's throughput). Each such width is reported with its predicted
cost, from the kernel model: the time the GEMMs of that width (in a layer and the output layer) lose against the
same FLOPs at the padded width's speed, at the run's micro-batch. Widths whose GEMMs are too small for tiles to matter (their
time is kernel launches) cost nothing and are not reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from cola_megatron.config import Config
from cola_megatron.cost.gemms import layer_gemms, output_layer_gemm
from cola_megatron.cost.kernels import KernelModel, is_aligned, shipped_model

MULTIPLE, SMALL_MULTIPLE, SMALL = 128, 64, 512
REPORT_FRACTION = 0.01
"""Report a width when its GEMMs lose at least this share of their time."""


@dataclass(frozen=True)
class SlowShape:
    key: str
    """What sets the width, e.g. ``model.ffn_hidden_size`` or ``model.vocab_size / tensor_parallel``."""
    width: int
    padded: int
    fix: str
    seconds: float
    """Predicted time per micro-batch of the GEMMs (of one layer and the output layer) that have this width."""
    ideal_seconds: float
    """The same FLOPs at the padded width's speed."""
    misaligned: bool
    flops: float = 0.0
    """FLOPs of those GEMMs."""

    @property
    def cost(self) -> float:
        return self.seconds / self.ideal_seconds - 1.0

    def message(self, kernels: KernelModel) -> str:
        why = "nor of 8, which tensor-core GEMM kernels need" if self.misaligned else \
            f"computed in whole tiles as {self.padded}"
        return (f"{self.key}={self.width} is not a multiple of {required_multiple(self.width)} ({why}): its GEMMs "
                f"are predicted to run at {self.flops / self.seconds / 1e12:.0f} TFLOP/s, "
                f"{self.seconds * 1e3:.3g} ms per layer and micro-batch, where width {self.padded} would run them "
                f"at {self.flops / self.ideal_seconds / 1e12:.0f} TFLOP/s, {self.ideal_seconds * 1e3:.3g} ms "
                f"(+{self.cost:.0%}; {kernels.gpu} kernel data{'' if kernels.calibrated else ', uncalibrated'}). "
                f"Fix: {self.fix}")


def required_multiple(width: int) -> int:
    return SMALL_MULTIPLE if width < SMALL else MULTIPLE


def _padded(width: int) -> int:
    step = required_multiple(width)
    return int(math.ceil(width / step) * step)


def _widths(cfg: Config) -> List[Tuple[str, int, str]]:
    """(what, width, fix) of each GEMM width the config sets, at its TP."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    f = m.padded_ffn_hidden_size
    ffn_fix = (f"model.ffn_multiple_of={MULTIPLE * tp} (ffn {_padded_to(f, MULTIPLE * tp)}; the paper's configs "
               "keep its shapes for parity)")
    out = [("model.ffn_hidden_size" + (f" (padded to {f})" if f != m.ffn_hidden_size else ""), f, ffn_fix)]
    if tp > 1:
        out += [(f"model.ffn_hidden_size / {tp} (parallel.tensor_parallel)", f // tp, ffn_fix),
                (f"model.hidden_size / {tp} (parallel.tensor_parallel)", m.hidden_size // tp,
                 "choose parallel.tensor_parallel so that hidden_size / TP is a multiple of 128")]
    if m.arch == "cola":
        out.append(("model.rank", m.rank, f"model.rank={_padded(m.rank)}"))
    out.append((f"model.vocab_size / {tp} (parallel.tensor_parallel)" if tp > 1 else "model.vocab_size", m.vocab_size // tp,
                f"model.vocab_size={_padded_to(m.vocab_size, MULTIPLE * tp)} (a multiple of {MULTIPLE * tp}; the "
                "tokenizer uses the first ids)"))
    return out


def _padded_to(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def _gemm_times(cfg: Config, kernels: KernelModel, width: int, padded: int) -> Tuple[float, float, float]:
    """(seconds as configured, seconds of the same FLOPs at the padded width's speed, FLOPs) of the GEMMs of a
    layer and the output layer that have the width as a dimension, forward and backward, per micro-batch."""
    m, p = cfg.model, cfg.parallel
    tokens = cfg.train.micro_batch_size * m.seq_length
    scheme = p.cola_tp_scheme if m.arch == "cola" else "bottleneck"
    gemms = layer_gemms(m, tokens, p.tensor_parallel, p.sequence_parallel, scheme)
    gemms.append(output_layer_gemm(m, tokens, p.tensor_parallel))
    now = ideal = flops = 0.0
    launch = kernels.gemm.launch_us
    for g in gemms:
        for shape in ((g.m, g.k, g.n), (g.m, g.n, g.k), (g.n, g.m, g.k)):  # forward, input and weight gradients
            # The width itself, or fused twice or thrice (gate|up, q|k|v).
            wide = tuple(x // width * padded if x % width == 0 and x // width <= 3 else x for x in shape)
            if wide == shape:
                continue
            now += kernels.gemm_us(*shape)
            flops += 2.0 * math.prod(shape)
            flops_ratio = math.prod(shape) / math.prod(wide)
            ideal += launch + (kernels.gemm_us(*wide) - launch) * flops_ratio
    return now * 1e-6, ideal * 1e-6, flops


def slow_shapes(cfg: Config, kernels: Optional[KernelModel] = None) -> List[SlowShape]:
    """The config's GEMM widths whose GEMMs lose at least REPORT_FRACTION of their time."""
    kernels = kernels or shipped_model()
    out, seen = [], set()
    for key, width, fix in _widths(cfg):
        if width <= 0 or width % required_multiple(width) == 0 or width in seen:
            continue
        seen.add(width)
        padded = _padded(width)
        now, ideal, flops = _gemm_times(cfg, kernels, width, padded)
        if ideal > 0 and now / ideal - 1 >= REPORT_FRACTION:
            out.append(SlowShape(key, width, padded, fix, now, ideal, not is_aligned(width), flops))
    return out


def slow_shape_warnings(cfg: Config, kernels: Optional[KernelModel] = None) -> List[str]:
    kernels = kernels or shipped_model()
    return [s.message(kernels) for s in slow_shapes(cfg, kernels)]
