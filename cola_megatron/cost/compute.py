"""Compute time of one micro-batch through a layer, the output layer, and the optimizer step, from a kernel model.

A layer's time is its GEMMs (``cost/gemms.py``: forward, input and weight gradient, and the forwards its recompute
mode repeats), the causal flash-attention core on this rank's heads, and the memory-bound elementwise work, counted
as bytes read and written per token:

- forward: two RMSNorms (read and write d), two residual adds (3d), RoPE on q and k, the copies around SDPA (v made
  contiguous, the output's re-layout), the GLU (SiLU and product: 5 f-wide passes), and for CoLA each SiLU of a
  bottleneck (read z, write σ(z));
- backward: the norms (3d each), the residual joins (3d each), RoPE and the SDPA copies again, the GLU (7 f-wide
  passes, σ rebuilt), each bottleneck SiLU's gradient (read z and the gradient, write one) and the σ(z) its B GEMM
  rebuilds (2), the concatenated column-slot gradients;
- recomputation repeats the forward's elementwise work (``cola_m``: all of it but the residual adds).

Under sequence parallelism the norms, residual adds and the TP-replicated CoLA weights see 1/TP of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from cola_megatron.config import ModelConfig
from cola_megatron.cost.gemms import layer_gemms, output_layer_gemm
from cola_megatron.cost.kernels import KernelModel
from cola_megatron.models.accounting import kv_width

MS = 1e-3


@dataclass
class ComputeTime:
    """Seconds of one micro-batch's forward and backward (recomputation included)."""

    gemms: Dict[str, float] = field(default_factory=dict)
    """By slot: qkv, proj, fc1, fc2, output."""
    attention: float = 0.0
    elementwise: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.gemms.values()) + self.attention + self.elementwise

    def add(self, other: "ComputeTime", times: float = 1.0) -> "ComputeTime":
        gemms = dict(self.gemms)
        for slot, t in other.gemms.items():
            gemms[slot] = gemms.get(slot, 0.0) + times * t
        return ComputeTime(gemms, self.attention + times * other.attention,
                           self.elementwise + times * other.elementwise)


def gemm_seconds(kernels: KernelModel, m: ModelConfig, tokens: int, tp: int, sequence_parallel: bool,
                 scheme: str, recompute: str) -> Dict[str, float]:
    """One layer's GEMM time by slot: forward, both backward GEMMs, and the repeated forwards."""
    out: Dict[str, float] = {}
    for g in layer_gemms(m, tokens, tp, sequence_parallel, scheme):
        forward, grad_input, grad_weight = kernels.linear_us(g.m, g.k, g.n)
        repeats = 1 if recompute in g.recomputed_by else 0
        out[g.slot] = out.get(g.slot, 0.0) + (forward * (1 + repeats) + grad_input + grad_weight) * 1e-6
    return out


def _elementwise_elements(m: ModelConfig, tp: int, sequence_parallel: bool, scheme: str) -> Dict[str, float]:
    """Elements read plus written per token of the micro-batch: forward, backward, and the forward's share that
    ``cola_m`` repeats (it rebuilds all but the residual adds)."""
    d, f, r, kv = m.hidden_size, m.padded_ffn_hidden_size, m.rank, kv_width(m)
    sp = tp if sequence_parallel else 1
    q = d
    norms_fwd, norms_bwd, residual = 2 * 2 * d / sp, 2 * 3 * d / sp, 2 * 3 * d / sp
    rope = 2 * (q + kv) / tp
    sdpa = 2 * (kv + q) / tp
    glu_fwd, glu_bwd = 5 * f / tp, 7 * f / tp
    sigma_fwd = sigma_bwd = 0.0
    if m.arch == "cola":
        if scheme == "pair":
            widths = 7 * r / tp  # every σ on r/TP of every token
            column = 5 * r / tp
        else:
            widths = 5 * r + 2 * r / sp  # column σ's on the gathered tokens, row σ's on this rank's
            column = 5 * r
        sigma_fwd = 2 * widths
        sigma_bwd = 5 * widths + 2 * column  # gradient, σ(z) rebuilt for B, the concatenated column gradients
    forward = norms_fwd + residual + rope + sdpa + glu_fwd + sigma_fwd
    backward = norms_bwd + residual + rope + sdpa + glu_bwd + sigma_bwd
    return {"forward": forward, "backward": backward, "cola_m": forward - residual}


def layer_seconds(kernels: KernelModel, m: ModelConfig, micro_batch: int, tp: int = 1,
                  sequence_parallel: bool = False, scheme: str = "bottleneck", recompute: str = "none",
                  act_bytes: int = 2) -> ComputeTime:
    """Forward and backward of one layer for one micro-batch of ``micro_batch`` sequences."""
    s = m.seq_length
    tokens = micro_batch * s
    heads = m.num_attention_heads // tp
    head_dim = m.hidden_size // m.num_attention_heads
    attention = kernels.attention_us(micro_batch, s, heads, head_dim) * 1e-6
    if recompute in ("full", "cola_m"):  # the core's forward runs again
        attention += kernels.attention_us(micro_batch, s, heads, head_dim, backward=False) * 1e-6
    e = _elementwise_elements(m, tp, sequence_parallel, scheme)
    elements = e["forward"] + e["backward"] + {"full": e["forward"], "cola_m": e["cola_m"]}.get(recompute, 0.0)
    # About 40 kernels a layer (forward and backward) for dense, 70 for CoLA: their launch floor.
    kernels_launched = 70 if m.arch == "cola" else 40
    elementwise = kernels.elementwise_us(elements * act_bytes * tokens, kernels_launched) * 1e-6
    return ComputeTime(gemm_seconds(kernels, m, tokens, tp, sequence_parallel, scheme, recompute), attention,
                       elementwise)


def head_seconds(kernels: KernelModel, m: ModelConfig, micro_batch: int, tp: int = 1,
                 sequence_parallel: bool = False, act_bytes: int = 2) -> ComputeTime:
    """The last stage's extra work per micro-batch: final norm, output layer, vocab-parallel cross entropy (fp32
    logits: cast, max, exp, sum, softmax gradient, about 10 fp32 passes over V/TP per token)."""
    tokens = micro_batch * m.seq_length
    g = output_layer_gemm(m, tokens, tp)
    gemm = sum(kernels.linear_us(g.m, g.k, g.n)) * 1e-6
    sp = tp if sequence_parallel else 1
    bytes_moved = tokens * (5 * m.hidden_size / sp * act_bytes + 10 * 4 * m.vocab_size / tp)
    return ComputeTime({"output": gemm}, 0.0, kernels.elementwise_us(bytes_moved, 12) * 1e-6)


def embedding_seconds(kernels: KernelModel, m: ModelConfig, micro_batch: int, act_bytes: int = 2) -> float:
    """The first stage's embedding lookup and its gradient's scatter-add (memory-bound)."""
    tokens = micro_batch * m.seq_length
    return kernels.elementwise_us(tokens * 3 * m.hidden_size * act_bytes, 2) * 1e-6


def gradient_accumulation_seconds(kernels: KernelModel, parameters: int, mixed_precision: bool) -> float:
    """megatron's DDP adds each micro-batch's gradient into its main-gradient buffer (without Transformer
    Engine's fused accumulation): read bf16 gradient and fp32 buffer, write the buffer."""
    bytes_per_parameter = 2 + 4 + 4 if mixed_precision else 2 + 2 + 2
    return kernels.elementwise_us(parameters * bytes_per_parameter, 2) * 1e-6


def optimizer_seconds(kernels: KernelModel, parameters: int, pure_bf16: bool, fp32: bool = False) -> float:
    """AdamW over the ``parameters`` this rank updates, multi-tensor kernels (memory-bound): mixed precision reads
    the fp32 gradient, master weight and both moments and writes them back with the bf16 copy (about 34 bytes per
    parameter with clipping's norm and zeroing the buffer); pure bf16 touches bf16 copies only (about 18)."""
    per_parameter = 18 if pure_bf16 else (32 if fp32 else 34)
    return kernels.elementwise_us(parameters * per_parameter, 20) * 1e-6
