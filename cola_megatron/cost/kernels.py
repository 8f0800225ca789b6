"""Kernel times on one GPU, from measured kernel data: GEMMs by shape, flash attention, memory-bound elementwise work.

The data are JSON lines (``kernel_data/h100.jsonl`` ships with the package; ``cola-plan --kernel-data FILE`` reads
another measurement): an ``env`` row naming the GPU and its dense bf16 peak, and ``gemm`` rows (``m``, ``k``, ``n``,
``us``: one bf16 ``(m, k) @ (k, n)``). Other rows (whole blocks) are not read: they check the model.

GEMM time is fitted to the ``gemm`` rows by least squares on relative error, one linear model per alignment class:

    t = t0 + (2·M·N·K + 2·M·N·k0) / P

t0 a launch/tail cost, P the class's throughput and k0 the prologue/epilogue work of every output tile, counted in
units of K (a short reduction, K = 512, runs slower per FLOP than K = 4096 at the same FLOPs). Classes: *aligned*
(every dimension a multiple of 8, i.e. 16-byte rows for bf16: tensor-core kernels) with M and N counted rounded up to
the 128-wide output tile, and *misaligned* (some dimension not a multiple of 8: the slow kernels the H100 rows show
at 114-137 TFLOP/s). Where the data hold no misaligned row, misaligned GEMMs keep the shipped H100 data's ratio to
aligned ones.

Attention (flash, causal) and elementwise work are not in the data: they use the GPU's peak and memory bandwidth
with the two fractions below. They are not fitted to the data: they were set, with the data's whole-block rows in
view, to typical values of eager PyTorch kernels (half the HBM bandwidth) and FlashAttention-2 (about 35 % of peak);
tests/test_step_time.py checks the whole model against every block row.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cola_megatron.errors import ConfigError
from cola_megatron.resources import package_dir

SHIPPED = ("cost", "kernel_data", "h100.jsonl")
ALIGNMENT = 8
"""bf16 elements in 16 bytes: GEMM dimensions that are not multiples of this fall off the tensor-core kernels."""
TILE = 128
"""Output tile edge of the large-GEMM kernels: widths are computed in whole tiles."""
H100_MEMORY_GBS = 3350.0
"""HBM3 bandwidth of an H100 SXM (GB/s)."""

# Not in the kernel data (see the module docstring).
ELEMENTWISE_BANDWIDTH_FRACTION = 0.5
"""Of the memory bandwidth, what eager elementwise kernels (norms, SiLU, GLU, RoPE, adds, casts) reach."""
ATTENTION_FRACTION = 0.35
"""Of the dense peak, what causal flash attention (forward and backward) reaches at long sequences
(FlashAttention-2 on an H100: about 350 TFLOP/s)."""
ATTENTION_HALF_SEQUENCE = 256
"""Sequence length at which flash attention reaches half of ATTENTION_FRACTION (short rows underuse it)."""
KERNEL_LAUNCH_US = 4.0
"""Time floor of one elementwise kernel."""


def shipped_kernel_data() -> str:
    return package_dir(*SHIPPED)


def is_aligned(*dims: int) -> bool:
    return all(d % ALIGNMENT == 0 for d in dims)


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def _features(m: int, k: int, n: int) -> Tuple[float, float]:
    """(FLOPs, output-tile work 2·M·N), both / 1e6 so that divided by TFLOP/s they give µs; aligned GEMMs count
    M and N in whole tiles."""
    if is_aligned(m, k, n):
        m, n = _round_up(m, TILE), _round_up(n, TILE)
    return 2.0 * m * n * k / 1e6, 2.0 * m * n / 1e6


@dataclass(frozen=True)
class GemmFit:
    """t_us = launch_us + (flops + tile_work · k0) / (tflops · 1e6), per alignment class."""

    launch_us: float
    aligned_tflops: float
    aligned_k0: float
    misaligned_tflops: float
    misaligned_k0: float

    def time_us(self, m: int, k: int, n: int) -> float:
        flops, tiles = _features(m, k, n)
        if is_aligned(m, k, n):
            return self.launch_us + (flops + tiles * self.aligned_k0) / self.aligned_tflops
        return self.launch_us + (flops + tiles * self.misaligned_k0) / self.misaligned_tflops


@dataclass(frozen=True)
class KernelModel:
    """Kernel times of one GPU."""

    gpu: str
    peak_tflops: float
    memory_gbs: float
    gemm: GemmFit
    source: str
    """Where the GEMM fit comes from (a file name)."""
    calibrated: bool = True
    """False when the data describe another GPU than the one planned for (times scaled by peak)."""
    gemm_rows: int = 0
    misaligned_measured: bool = True

    def gemm_us(self, m: int, k: int, n: int) -> float:
        """One bf16 GEMM (m, k) @ (k, n); zero-sized GEMMs cost nothing."""
        if min(m, k, n) <= 0:
            return 0.0
        return self.gemm.time_us(m, k, n)

    def gemm_tflops(self, m: int, k: int, n: int) -> float:
        return 2.0 * m * k * n / self.gemm_us(m, k, n) / 1e6

    def linear_us(self, tokens: int, d_in: int, d_out: int) -> Tuple[float, float, float]:
        """(forward, input gradient, weight gradient) of y = x·Wᵀ, x: tokens × d_in, W: d_out × d_in."""
        return (self.gemm_us(tokens, d_in, d_out), self.gemm_us(tokens, d_out, d_in),
                self.gemm_us(d_out, tokens, d_in))

    def attention_us(self, batch: int, seq: int, heads: int, head_dim: int, backward: bool = True) -> float:
        """Causal flash attention on ``heads`` heads: forward 2·b·s²·h·hd FLOPs (half of the full 4·b·s²·h·hd),
        backward 2.5× that (its five matmuls, the scores recomputed)."""
        flops = 2.0 * batch * seq * seq * heads * head_dim * (3.5 if backward else 1.0)
        rate = ATTENTION_FRACTION * self.peak_tflops * seq / (seq + ATTENTION_HALF_SEQUENCE)
        return flops / rate / 1e6 + (2 if backward else 1) * KERNEL_LAUNCH_US

    def elementwise_us(self, bytes_moved: float, kernels: int = 1) -> float:
        """Memory-bound work: bytes read plus written at the achievable bandwidth, and a floor per kernel."""
        return bytes_moved / (ELEMENTWISE_BANDWIDTH_FRACTION * self.memory_gbs * 1e3) + kernels * KERNEL_LAUNCH_US

    def for_gpu(self, peak_tflops: float) -> "KernelModel":
        """This model for a GPU of another peak: uncalibrated, every time scaled by the peaks' ratio."""
        if math.isclose(peak_tflops, self.peak_tflops, rel_tol=1e-3):
            return self
        s = peak_tflops / self.peak_tflops
        g = self.gemm
        fit = GemmFit(g.launch_us, g.aligned_tflops * s, g.aligned_k0, g.misaligned_tflops * s, g.misaligned_k0)
        return KernelModel(f"a {peak_tflops:g} TFLOP/s GPU (scaled from {self.gpu})", peak_tflops,
                           self.memory_gbs * s, fit, self.source, False, self.gemm_rows, self.misaligned_measured)

    def describe(self) -> str:
        g = self.gemm
        text = (f"kernel data {self.source}: {self.gpu}, {self.gemm_rows} GEMM rows; aligned GEMMs up to "
                f"{g.aligned_tflops:.0f} TFLOP/s, misaligned {g.misaligned_tflops:.0f}"
                + ("" if self.misaligned_measured else " (not measured: the shipped H100 data's ratio)"))
        if not self.calibrated:
            text += ("; UNCALIBRATED for this GPU: times scaled by peak. Measure it (docs/launching.md) and pass "
                     "--kernel-data FILE")
        return text


def read_rows(path: str) -> List[Dict]:
    """The JSON objects of a kernel-data file; a bad file is one ConfigError naming it."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"--kernel-data {path} {what}. Fix: give a JSON-lines file of measured kernels "
                          "(docs/launching.md says how to make one)")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"--kernel-data {path}: line {number} is not JSON. Fix: one JSON object per "
                                  "line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"--kernel-data {path}: line {number} is not a JSON object. Fix: one JSON "
                                  "object per line")
            rows.append(row)
    return rows


def _gemm_rows(rows: Sequence[Dict], path: str) -> List[Tuple[int, int, int, float]]:
    out = []
    for row in rows:
        if row.get("probe") != "gemm":
            continue
        try:
            m, k, n, us = int(row["m"]), int(row["k"]), int(row["n"]), float(row["us"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"--kernel-data {path}: a gemm row lacks m, k, n or us: {json.dumps(row)[:120]}. "
                              "Fix: give each gemm row its shape and time") from None
        if min(m, k, n) <= 0 or not (us > 0 and math.isfinite(us)):
            raise ConfigError(f"--kernel-data {path}: gemm row {json.dumps(row)[:120]} has a non-positive shape "
                              "or time. Fix: correct that row")
        out.append((m, k, n, us))
    return out


def _fit_class(points: Sequence[Tuple[int, int, int, float]], launch_us: Optional[float]):
    """Least squares on relative error: (launch_us, tflops, k0) of one alignment class."""
    X, y = [], []
    for m, k, n, us in points:
        flops, tiles = _features(m, k, n)
        X.append([1.0, flops, tiles] if launch_us is None else [flops, tiles])
        y.append(us if launch_us is None else us - launch_us)
    X, y = np.array(X), np.array(y)
    w = 1.0 / np.array([p[3] for p in points])
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    if launch_us is None:
        t0, per_flop, per_tile = coef
    else:
        t0, (per_flop, per_tile) = launch_us, coef
    return max(float(t0), 0.0), 1.0 / float(per_flop), max(float(per_tile), 0.0) / float(per_flop)


def fit_gemms(points: Sequence[Tuple[int, int, int, float]], path: str,
              fallback: Optional[GemmFit] = None) -> Tuple[GemmFit, bool]:
    """The GEMM fit of measured rows, and whether misaligned rows were measured."""
    aligned = [p for p in points if is_aligned(*p[:3])]
    misaligned = [p for p in points if not is_aligned(*p[:3])]
    if len(aligned) < 3:
        raise ConfigError(f"--kernel-data {path}: {len(aligned)} gemm rows with aligned shapes (multiples of "
                          f"{ALIGNMENT}); the fit needs at least 3 of different shapes. Fix: measure more GEMMs")
    t0, tflops, k0 = _fit_class(aligned, None)
    if not (tflops > 0 and math.isfinite(tflops)):
        raise ConfigError(f"--kernel-data {path}: the gemm rows give no positive throughput. Fix: check their times")
    if len(misaligned) >= 2:
        _, mis_tflops, mis_k0 = _fit_class(misaligned, t0)
    elif len(misaligned) == 1:  # one point: the aligned tile overhead, throughput from that row
        m, k, n, us = misaligned[0]
        flops, tiles = _features(m, k, n)
        mis_k0 = k0
        mis_tflops = (flops + tiles * mis_k0) / max(us - t0, 1e-9)
    else:
        ref = fallback or shipped_model().gemm
        mis_k0 = ref.misaligned_k0
        mis_tflops = tflops * ref.misaligned_tflops / ref.aligned_tflops
    if not (mis_tflops > 0 and math.isfinite(mis_tflops)):
        raise ConfigError(f"--kernel-data {path}: the misaligned gemm rows give no positive throughput. Fix: check "
                          "their times")
    return GemmFit(t0, tflops, k0, mis_tflops, mis_k0), bool(misaligned)


def _env(rows: Sequence[Dict]) -> Dict:
    return next((r for r in rows if r.get("probe") == "env"), {})


def _peak_from_env(env: Dict, default: float) -> float:
    """The dense bf16 peak the env row states ("... 989 dense bf16 TFLOP/s ..."), or ``default``."""
    if isinstance(env.get("peak_tflops"), (int, float)):
        return float(env["peak_tflops"])
    found = re.search(r"([\d.]+)\s*dense bf16 TFLOP/s", str(env.get("gpu", "")))
    return float(found.group(1)) if found else default


def load_kernel_model(path: Optional[str] = None, peak_tflops: Optional[float] = None,
                      memory_gbs: Optional[float] = None) -> KernelModel:
    """The kernel model fitted to ``path`` (default: the shipped H100 data). ``peak_tflops``: the GPU planned for;
    a peak other than the data's marks the model uncalibrated and scales it."""
    source = path or shipped_kernel_data()
    rows = read_rows(source)
    env = _env(rows)
    data_peak = _peak_from_env(env, 989.0 if path is None else (peak_tflops or 989.0))
    fit, measured = fit_gemms(_gemm_rows(rows, source), source, None if path is None else shipped_model().gemm)
    gpu = str(env.get("gpu", "an unnamed GPU")).split(" (")[0]
    bandwidth = float(env.get("memory_gbs", memory_gbs or H100_MEMORY_GBS))
    model = KernelModel(gpu, data_peak, bandwidth, fit, os.path.basename(source), True,
                        len(_gemm_rows(rows, source)), measured)
    return model if peak_tflops is None else model.for_gpu(peak_tflops)


_SHIPPED: Optional[KernelModel] = None


def shipped_model() -> KernelModel:
    """The model of the shipped H100 data (fitted once per process)."""
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = load_kernel_model(None)
    return _SHIPPED
