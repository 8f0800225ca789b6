"""Predicted memory per GPU of a layout, from the config's shapes alone (cola-plan ranks layouts by it; the training
side's preflight refuses a micro-batch no accelerator holds). docs/launching.md has the derivation:

- weights + gradients + optimizer per parameter this rank holds: bf16/fp16 mixed precision 2 + 4 + 12 (bf16
  weights, fp32 gradient buffer, fp32 master weights and two Adam moments); fp32 4 + 4 + 8; pure bf16 2 + 2 + 4.
  The distributed optimizer divides the optimizer part by DP.
- activations: what autograd saves for backward (unique storages) at the step's peak. Per layer and token of a
  micro-batch, with SDPA flash attention and a fused RMSNorm (GPU): the layer input, both norm outputs, h, the
  attention's q, k (after RoPE), v, the attention output, the GLU's gate, up and product and for CoLA each slot's
  z = A·x (σ(z) is rebuilt in backward): 8d + 7r + 3f elements at TP1. ``cola_m`` keeps 2d + 7r and
  recomputes one residual branch at a time; ``full`` keeps the layer input d and recomputes one layer. The first
  pipeline stage holds up to PP micro-batches in flight (interleaved: ``2(PP-1) + (VP-1)·PP + 1`` chunk passes).
- pipeline buffers (each in-flight micro-batch's stage output) and a workspace estimate (logits and gradient
  temporaries) complete the prediction; a per-GPU reserve covers the CUDA context, NCCL and fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from cola_megatron.config import Config, ConfigError, ModelConfig
from cola_megatron.cost.layout import Layout
from cola_megatron.models.accounting import kv_width, layer_parameters

GIB = 1024**3
FP32 = 4
INT64 = 8


# --------------------------------------------------------------------------------------------------------------
# Parameters


def stage_parameters(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters one GPU of pipeline stage ``stage`` holds (layers split evenly; embedding on the first stage,
    output layer and final norm on the last)."""
    n = layer_parameters(m, tp).total * (m.num_layers // pp)
    if stage == 0:
        n += m.vocab_size * m.hidden_size // tp
    if stage == pp - 1:
        n += m.vocab_size * m.hidden_size // tp + m.hidden_size
    return n


def state_bytes_per_parameter(cfg: Config) -> Tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter."""
    t = cfg.train
    if t.pure_bf16:
        return 2, 2, 4
    if t.precision == "fp32":
        return 4, 4, 8
    return 2, 4, 12


def activation_bytes(cfg: Config) -> int:
    return 4 if cfg.train.precision == "fp32" else 2


# --------------------------------------------------------------------------------------------------------------
# Activations: bytes autograd saves for backward. "Per token" means per token of the micro-batch's whole sequence
# (b·s tokens); tensors sharded along the sequence (sequence parallelism) count 1/TP of it.


def _rms_norm(d: int, seq_shards: int, act: int, device: str) -> Tuple[float, bool]:
    """(bytes per token, whether the input tensor itself is saved) of torch's rms_norm on a d-wide input.

    GPU: the fused kernel saves the input and the fp32 reciprocal RMS. CPU: the composite kernel computes in fp32
    and saves the (upcast) input, the reciprocal RMS and the normalised input.
    """
    if device == "cuda":
        return (act * d + FP32) / seq_shards, True
    return (2 * FP32 * d + FP32) / seq_shards, act == FP32


@dataclass(frozen=True)
class LayerActivations:
    """Saved bytes of one transformer layer: per token, plus per micro-batch terms that do not scale with b."""

    full: float
    """Everything one layer saves without recomputation, per token."""
    rope_tables: float
    """RoPE cos/sin tables each layer computes and saves, per micro-batch (4 tensors of s × head_dim)."""
    layer_input: float
    """The layer input, per token (what ``full`` recomputation keeps)."""
    cola_m_kept: float
    """x, h and the seven z's, per token (what CoLA-M keeps): (2d + 7r) elements."""
    cola_m_mlp_branch: float
    """What rebuilding the MLP branch saves while CoLA-M back-propagates through it, per token."""
    cola_m_attention_branch: float
    """Same for the attention branch (plus the RoPE tables), per token."""
    norm_shares_input: float
    """Bytes per token of a kept x or h that the rebuilt norm saves again (the same storage, counted once)."""

    def kept(self, mode: str, tokens: int) -> float:
        """Bytes a layer keeps until its backward."""
        if mode == "none":
            return self.full * tokens + self.rope_tables
        if mode == "full":
            return self.layer_input * tokens
        return self.cola_m_kept * tokens

    def rebuilt(self, mode: str, tokens: int) -> float:
        """Extra bytes while one layer is recomputed and back-propagated (one at a time)."""
        if mode == "none":
            return 0.0
        if mode == "full":
            return (self.full - self.norm_shares_input) * tokens + self.rope_tables
        return max(self.cola_m_mlp_branch * tokens,
                   self.cola_m_attention_branch * tokens + self.rope_tables)


def layer_activations(cfg: Config, tp: int, sequence_parallel: bool, device: str = "cuda") -> LayerActivations:
    """Per-layer saved activations of the LLaMA/CoLA layer this project builds (megatron TransformerLayer, SDPA
    flash attention, torch rms_norm, the project's GLU in ``models/layers/ops.py``, B GEMMs that save z and rebuild
    σ(z)), for the ``bottleneck`` CoLA scheme. ``device="cpu"`` models torch's composite rms_norm, which also saves
    the normalised input (``tests/test_saved_tensors.py`` checks that case exactly)."""
    m = cfg.model
    if m.arch == "cola" and cfg.parallel.cola_tp_scheme != "bottleneck":
        raise ConfigError("parallel.cola_tp_scheme: cola-plan models the 'bottleneck' scheme only. "
                          "Fix: set parallel.cola_tp_scheme=bottleneck (the default)")
    act = activation_bytes(cfg)
    d, f, r, kv = m.hidden_size, m.padded_ffn_hidden_size, m.rank, kv_width(m)
    heads, head_dim, s = m.num_attention_heads, m.hidden_size // m.num_attention_heads, m.seq_length
    sp = tp if sequence_parallel else 1
    norm, shares = _rms_norm(d, sp, act, device)
    # Attention core on this rank's heads over the whole sequence: q and k after RoPE, v (a tensor of its own:
    # the CoLA branch output, or the dense q|k|v output's copy), the output (its reshape is a view, the proj
    # input); the fp32 log-sum-exp per head. The q|k|v GEMM output itself is freed after RoPE.
    core = act * (d + kv + kv + d) / tp + FP32 * heads / tp
    # The GLU (models/layers/ops.glu): gate and up (σ(gate) is rebuilt in backward), the product (fc2's input).
    glu = act * 3 * f / tp
    norm_outputs = act * 2 * d / sp  # inputs of the q|k|v and gate|up projections
    cola = 0.0
    if m.arch == "cola":
        # Each B GEMM saves its z (σ(z) is rebuilt in backward): the column slots' (q|k|v: 3r, gate|up: 2r) z
        # gathered over the whole sequence, the row slots' (o, down) z on this rank's tokens.
        cola = act * (5 * r + 2 * r / sp)
    full = 2 * norm + norm_outputs + core + glu + cola
    shared = act * d / sp if shares else 0.0
    # While CoLA-M rebuilds a branch, the column z it reads is the kept one, except under sequence parallelism
    # (then its gather over the whole sequence is new); the row slot's rebuilt σ(z) feeds its weight gradient.
    gathered = 1.0 if sp > 1 else 0.0
    mlp_branch = norm - shared + act * (d / sp + gathered * 2 * r + 3 * f / tp + r / sp)
    # The rebuilt q, k, v are separate tensors; q and k are saved after RoPE, v and the output by SDPA.
    attention_branch = (norm - shared + act * (d / sp + gathered * 3 * r + (2 * d + 2 * kv) / tp + r / sp)
                        + FP32 * heads / tp)
    return LayerActivations(
        full=full,
        rope_tables=4.0 * s * head_dim * act,
        layer_input=act * d / sp,
        cola_m_kept=act * (2 * d + 7 * r) / sp,
        cola_m_mlp_branch=mlp_branch,
        cola_m_attention_branch=attention_branch,
        norm_shares_input=shared,
    )


def embedding_activations(tp: int) -> float:
    """Per token: the token ids the embedding's backward indexes with (int64), and the vocab-range mask with TP."""
    return INT64 + (1 if tp > 1 else 0)


def head_activations(cfg: Config, tp: int, sequence_parallel: bool, device: str = "cuda") -> float:
    """Per token: final norm, output-layer input, the fp32 softmax megatron's cross entropy keeps (V/TP wide), its
    target mask and indices, and the loss mask."""
    act, d = activation_bytes(cfg), cfg.model.hidden_size
    sp = tp if sequence_parallel else 1
    norm, _ = _rms_norm(d, sp, act, device)
    return norm + act * d / sp + FP32 * cfg.model.vocab_size / tp + 1 + INT64 + FP32


def in_flight_passes(layout: Layout, stage: int, micro_batches: int) -> int:
    """Forward passes (micro-batch × model chunk) a pipeline stage holds when its first backward starts (1F1B;
    megatron's interleaved warm-up with VP)."""
    p, v = layout.pipeline_parallel, layout.model_chunks
    if v == 1:
        return min(p - stage, micro_batches)
    return min(2 * (p - stage - 1) + (v - 1) * p + 1, micro_batches * v)


# --------------------------------------------------------------------------------------------------------------
# Memory per GPU


@dataclass
class Memory:
    """Predicted bytes on one GPU of one pipeline stage."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    """Peak of the bytes autograd saves for backward, over the step."""
    pipeline_buffers: float
    """Stage outputs the pipeline schedule keeps until their backward."""
    workspace: float
    """Temporaries not saved for backward: logits before the fp32 cast, activation gradients (estimate)."""
    reserve: float
    """CUDA context, NCCL buffers, allocator fragmentation (the cluster's reserve)."""

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.pipeline_buffers + self.workspace + self.reserve


def micro_batches_per_step(cfg: Config, layout: Layout) -> int:
    return cfg.train.global_batch_size // (layout.micro_batch_size * layout.data_parallel)


def stage_memory(cfg: Config, layout: Layout, stage: int, device: str = "cuda", reserve_gib: float = 0.0) -> Memory:
    """Predicted memory of one GPU of pipeline stage ``stage``; ``device='cpu'`` predicts CPU runs (tests)."""
    m = cfg.model
    tp, pp, sp_on = layout.tensor_parallel, layout.pipeline_parallel, layout.sequence_parallel
    sp = tp if sp_on else 1
    act = activation_bytes(cfg)
    w, g, o = state_bytes_per_parameter(cfg)
    n = stage_parameters(m, tp, pp, stage)
    optimizer_shards = layout.data_parallel if layout.distributed_optimizer else 1

    tokens = layout.micro_batch_size * m.seq_length
    micro_batches = micro_batches_per_step(cfg, layout)
    passes = in_flight_passes(layout, stage, micro_batches)
    layers_per_pass = m.num_layers // (pp * layout.model_chunks)
    per_layer = layer_activations(cfg, tp, sp_on, device)
    # With recomputation the layers also keep the model chunk's rotary frequencies (s × head_dim, fp32).
    head_dim = m.hidden_size // m.num_attention_heads
    pass_constant = 0.0 if layout.recompute == "none" else FP32 * m.seq_length * head_dim
    kept_per_pass = layers_per_pass * per_layer.kept(layout.recompute, tokens) + pass_constant
    first, last = stage == 0, stage == pp - 1
    embedding = embedding_activations(tp) * tokens * math.ceil(passes / layout.model_chunks) if first else 0.0
    head = head_activations(cfg, tp, sp_on, device) * tokens if last else 0.0
    # The head's tensors are freed before any layer's backward, and layers are rebuilt one at a time.
    activations = passes * kept_per_pass + embedding + max(head, per_layer.rebuilt(layout.recompute, tokens))

    outputs_kept = passes - (1 if last else 0)
    pipeline_buffers = outputs_kept * act * m.hidden_size / sp * tokens if pp > 1 else 0.0
    gradients_tmp = act * tokens * (2 * 2 * m.padded_ffn_hidden_size / tp + 2 * m.hidden_size / sp)
    logits_tmp = act * m.vocab_size / tp * tokens if (last and act < FP32) else 0.0
    return Memory(
        stage=stage,
        weights=float(w * n),
        gradients=float(g * n),
        optimizer=o * n / optimizer_shards,
        activations=activations,
        pipeline_buffers=pipeline_buffers,
        workspace=max(gradients_tmp, logits_tmp),
        reserve=reserve_gib * GIB,
    )


def peak_memory(cfg: Config, layout: Layout, device: str = "cuda", reserve_gib: float = 0.0) -> Memory:
    """The pipeline stage with the most memory."""
    stages = [stage_memory(cfg, layout, i, device, reserve_gib) for i in range(layout.pipeline_parallel)]
    return max(stages, key=lambda mem: mem.total)
