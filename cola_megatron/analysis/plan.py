"""``cola-plan``: choose a parallel layout for a config and a cluster from predicted memory and communication.

    cola-plan --config configs/cola/llama_7b.yaml --nodes 8 --gpus-per-node 8 --gpu-memory-gib 80
    cola-plan --config configs/demo.yaml --nodes 1 --gpus-per-node 2 --evaluate parallel.tensor_parallel=2

For every layout (TP, PP, DP, VP, SP, recompute, micro-batch) the config allows on the cluster, it predicts the
per-GPU memory of the fullest pipeline stage and the per-step communication, estimates the step time and ranks
the layouts that fit. ``--render-slurm`` / ``--render-k8s`` write launch files for the best one from the
templates in ``launch/``.

Memory (bytes per GPU, megatron-core with this project's layers; docs/launching.md has the derivation):

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

Communication per step and GPU: TP collectives per layer (cola_megatron.analysis.comm_report's table, plus the forward
collectives that recomputation repeats), pipeline sends of activations and gradients, data-parallel gradient
reduce-scatter + parameter all-gather (distributed optimizer) or all-reduce. Step time: model FLOPs at a GEMM
efficiency that grows with the micro-batch's tokens, the 1F1B bubble, TP and PP communication on the critical path,
and the part of the gradient reduction the last micro-batch's backward cannot hide. It is a ranking model, not a
benchmark: measure the top few layouts before a long run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.config import Config, ConfigError, ModelConfig, load_config, validate
from cola_megatron.models.accounting import kv_width, layer_parameters
from cola_megatron.resources import launch_template

GIB = 1024**3
RECOMPUTE_MODES = ("none", "cola_m", "full")
FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    nvlink_gbs: float = 450.0
    """GB/s per GPU and direction inside a node (H100 SXM: NVLink 4, 450)."""
    network_gbs: float = 50.0
    """GB/s per GPU between nodes (one 400 Gb/s NIC per GPU: 50)."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    reserve_gib: float = 6.0
    """Memory no estimate covers: CUDA context, NCCL buffers, allocator fragmentation."""
    gemm_efficiency: float = 0.6
    """Fraction of peak that large GEMMs reach."""
    gemm_half_tokens: int = 1024
    """Tokens per micro-batch at which GEMMs reach half of gemm_efficiency (small micro-batches run slowly)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    virtual_pipeline: Optional[int]
    sequence_parallel: bool
    recompute: str
    micro_batch_size: int
    distributed_optimizer: bool
    overlap_grad_reduce: bool = True
    """Reduce gradients while the last micro-batch's backward runs (only matters with DP > 1)."""

    @property
    def model_chunks(self) -> int:
        return self.virtual_pipeline or 1

    def overrides(self) -> List[str]:
        """The cola-train overrides that select this layout."""
        vp = "null" if self.virtual_pipeline is None else str(self.virtual_pipeline)
        reduce_overlap = self.overlap_grad_reduce and self.data_parallel > 1
        return [
            f"parallel.tensor_parallel={self.tensor_parallel}",
            f"parallel.pipeline_parallel={self.pipeline_parallel}",
            f"parallel.virtual_pipeline={vp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"parallel.use_distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"parallel.overlap_grad_reduce={str(reduce_overlap).lower()}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"model.recompute={self.recompute}",
        ]

    def label(self) -> str:
        return (f"TP{self.tensor_parallel} PP{self.pipeline_parallel} DP{self.data_parallel}"
                + (f" VP{self.virtual_pipeline}" if self.virtual_pipeline else "")
                + (" SP" if self.sequence_parallel else "") + f" {self.recompute} mb{self.micro_batch_size}")


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The layout a config selects at a world size."""
    p = cfg.parallel
    return Layout(
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        data_parallel=world_size // (p.tensor_parallel * p.pipeline_parallel),
        virtual_pipeline=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        recompute=cfg.model.recompute,
        micro_batch_size=cfg.train.micro_batch_size,
        distributed_optimizer=p.use_distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
    )


def apply_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of ``cfg`` running ``layout`` (not validated)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, recompute=layout.recompute),
        parallel=dataclasses.replace(
            cfg.parallel,
            tensor_parallel=layout.tensor_parallel,
            pipeline_parallel=layout.pipeline_parallel,
            virtual_pipeline=layout.virtual_pipeline,
            sequence_parallel=layout.sequence_parallel,
            use_distributed_optimizer=layout.distributed_optimizer,
            overlap_grad_reduce=layout.overlap_grad_reduce and layout.data_parallel > 1,
            overlap_param_gather=False,
        ),
        train=dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size),
    )


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


# --------------------------------------------------------------------------------------------------------------
# Communication and step time


@dataclass
class Estimate:
    layout: Layout
    memory: Memory
    fits: bool
    tp_bytes: float
    """Bytes one GPU sends per step in tensor-parallel collectives (ring algorithms)."""
    pp_bytes: float
    """Bytes one GPU sends per step to its pipeline neighbours."""
    dp_bytes: float
    """Bytes one GPU sends per step for gradient reduction and parameter gathering."""
    compute_s: float
    bubble_s: float
    tp_s: float
    pp_s: float
    dp_exposed_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_exposed_s

    def as_dict(self) -> Dict[str, object]:
        mem = self.memory
        return {
            "layout": dataclasses.asdict(self.layout),
            "overrides": self.layout.overrides(),
            "fits": self.fits,
            "memory_gib": {k: getattr(mem, k) / GIB for k in
                           ("weights", "gradients", "optimizer", "activations", "pipeline_buffers", "workspace",
                            "reserve", "total")},
            "memory_stage": mem.stage,
            "communication_gb_per_step": {"tensor_parallel": self.tp_bytes / 1e9, "pipeline": self.pp_bytes / 1e9,
                                          "data_parallel": self.dp_bytes / 1e9},
            "step_s": self.step_s,
            "time_s": {"compute": self.compute_s, "bubble": self.bubble_s, "tensor_parallel": self.tp_s,
                       "pipeline": self.pp_s, "data_parallel_exposed": self.dp_exposed_s},
        }


def _tp_bytes_per_layer(cfg: Config, layout: Layout, tokens: int) -> float:
    """Bytes one GPU sends in one layer's TP collectives for one micro-batch (forward, backward, recompute)."""
    tp = layout.tensor_parallel
    if tp == 1:
        return 0.0
    from cola_megatron.analysis.comm_counter import ring_bytes_per_rank
    from cola_megatron.analysis.comm_report import BlockShape, block_collectives

    m = cfg.model
    arch = "dense" if m.arch == "dense" else cfg.parallel.cola_tp_scheme
    shape = BlockShape(m.hidden_size, m.padded_ffn_hidden_size, m.rank, m.num_attention_heads, m.num_query_groups)
    collectives = list(block_collectives(arch, shape, tp, layout.sequence_parallel))
    if layout.recompute == "full":  # the layer's forward runs again
        collectives += [c for c in collectives if c.phase == "forward"]
    elif layout.recompute == "cola_m":  # the column slots gather σ(z) again before their B
        collectives += [c for c in collectives if c.phase == "forward" and c.kind == "all_gather"]
    act = activation_bytes(cfg)
    return sum(ring_bytes_per_rank(c.kind, c.width * tokens * act, tp) for c in collectives)


def _layer_flops_per_token(cfg: Config, layout: Layout) -> Tuple[float, float]:
    """Training FLOPs of one layer per token on one TP rank, with the redundant replicated GEMMs of CoLA without
    SP and with recomputation: (FLOPs at full width, FLOPs of the GEMMs TP narrows)."""
    m = cfg.model
    tp = layout.tensor_parallel
    sp = tp if layout.sequence_parallel else 1
    p = layer_parameters(m, tp)
    unsplit = p.replicated / sp + p.norms / sp
    attention = 4.0 * m.seq_length * m.hidden_size / tp  # forward: scores and weighted sum, this rank's heads
    wide, narrow = 6.0 * unsplit + 3 * attention, 6.0 * p.sharded
    if layout.recompute == "full":
        wide, narrow = wide + 2.0 * unsplit + attention, narrow + 2.0 * p.sharded
    elif layout.recompute == "cola_m":  # the B projections feeding attention and the GLU, and the core
        d, f, r, kv = m.hidden_size, m.padded_ffn_hidden_size, m.rank, kv_width(m)
        wide, narrow = wide + attention, narrow + 2.0 * r * (d + 2 * kv + 2 * f) / tp
    return wide, narrow


def _narrow_gemm_efficiency(cfg: Config, tp: int, half_width: int = 256) -> float:
    """Relative speed of GEMMs whose width TP divides (hidden/TP wide): thin GEMMs underuse the GPU."""
    width = cfg.model.hidden_size / tp
    full = cfg.model.hidden_size
    return (width / (width + half_width)) / (full / (full + half_width))


def estimate(cfg: Config, layout: Layout, cluster: Cluster, device: str = "cuda") -> Estimate:
    """Memory, communication and step time of ``layout`` for ``cfg`` on ``cluster``."""
    m, c = cfg.model, cluster
    tp, pp, dp, v = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel, layout.model_chunks
    sp = tp if layout.sequence_parallel else 1
    act = activation_bytes(cfg)
    mem = peak_memory(cfg, layout, device, c.reserve_gib)
    tokens = layout.micro_batch_size * m.seq_length
    micro_batches = micro_batches_per_step(cfg, layout)

    # Compute: the slowest stage (the last one carries the output layer) sets the pipeline's pace.
    layers = m.num_layers // pp
    wide, narrow = _layer_flops_per_token(cfg, layout)
    head_flops = 6.0 * (m.vocab_size * m.hidden_size / tp + m.hidden_size)
    last_stage_flops = tokens * (layers * (wide + narrow / _narrow_gemm_efficiency(cfg, tp)) + head_flops)
    efficiency = c.gemm_efficiency * tokens / (tokens + c.gemm_half_tokens)
    per_micro_batch_s = last_stage_flops / (c.gpu_tflops * 1e12 * efficiency)
    compute_s = micro_batches * per_micro_batch_s
    bubble_s = (pp - 1) / v * per_micro_batch_s

    # TP collectives stay inside a node; they are on the critical path.
    tp_bytes = micro_batches * layers * _tp_bytes_per_layer(cfg, layout, tokens)
    tp_s = tp_bytes / (c.nvlink_gbs * 1e9)
    # Pipeline: each micro-batch and model chunk sends its activations forward and their gradient back.
    pp_bytes = 2.0 * micro_batches * v * tokens * m.hidden_size / sp * act if pp > 1 else 0.0
    pp_link = c.nvlink_gbs if tp * dp * pp <= c.gpus_per_node else c.network_gbs
    pp_s = pp_bytes / (pp_link * 1e9)
    # Data parallel: megatron's rank order puts TP innermost, then DP; a DP group leaves the node when TP·DP does.
    _, grad_bytes, _ = state_bytes_per_parameter(cfg)
    n = stage_parameters(m, tp, pp, mem.stage)
    share = (dp - 1) / dp
    dp_link = (c.nvlink_gbs if tp * dp <= c.gpus_per_node else c.network_gbs) * 1e9
    if layout.distributed_optimizer:
        reduce_bytes, gather_bytes = share * n * grad_bytes, share * n * act
    else:
        reduce_bytes, gather_bytes = 2 * share * n * grad_bytes, 0.0
    # Gradient buckets reduce while the last micro-batch's backward (about 2/3 of its time) runs.
    hidden_s = 2.0 / 3.0 * per_micro_batch_s if layout.overlap_grad_reduce else 0.0
    dp_exposed_s = max(0.0, reduce_bytes / dp_link - hidden_s) + gather_bytes / dp_link
    return Estimate(
        layout=layout,
        memory=mem,
        fits=mem.total <= c.gpu_memory_gib * GIB,
        tp_bytes=tp_bytes,
        pp_bytes=pp_bytes,
        dp_bytes=reduce_bytes + gather_bytes,
        compute_s=compute_s,
        bubble_s=bubble_s,
        tp_s=tp_s,
        pp_s=pp_s,
        dp_exposed_s=dp_exposed_s,
    )


# --------------------------------------------------------------------------------------------------------------
# Enumerating and ranking


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: Config, cluster: Cluster, recompute_modes: Sequence[str] = RECOMPUTE_MODES,
                      distributed_optimizer: bool = True, max_virtual_pipeline: int = 8) -> Iterable[Layout]:
    """Every layout the config's validation accepts on the cluster (TP inside a node)."""
    m, t = cfg.model, cfg.train
    world = cluster.world_size
    modes = [mode for mode in recompute_modes if mode != "cola_m" or m.arch == "cola"]
    for tp in _divisors(cluster.gpus_per_node):
        for pp in _divisors(m.num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if t.global_batch_size % dp:
                continue
            vps = [None] + ([v for v in _divisors(m.num_layers // pp) if 1 < v <= max_virtual_pipeline]
                            if pp > 1 else [])
            for vp in vps:
                for sp in ([False, True] if tp > 1 else [False]):
                    for mode in modes:
                        for mb in _divisors(t.global_batch_size // dp):
                            layout = Layout(tp, pp, dp, vp, sp, mode, mb, distributed_optimizer and dp > 1)
                            try:
                                validate(apply_layout(cfg, layout), world)
                            except ConfigError:
                                continue
                            yield layout


def rank_layouts(cfg: Config, cluster: Cluster, device: str = "cuda", **candidates) -> List[Estimate]:
    """All candidate layouts: those that fit fastest first, then the others by memory (least first)."""
    estimates = [estimate(cfg, layout, cluster, device) for layout in candidate_layouts(cfg, cluster, **candidates)]

    def key(e: Estimate):
        if e.fits:
            return (0, round(e.step_s, 6), e.memory.total, e.layout.label())
        return (1, e.memory.total, e.step_s, e.layout.label())

    return sorted(estimates, key=key)


# --------------------------------------------------------------------------------------------------------------
# Launch files from the templates in launch/

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def render(template: str, values: Dict[str, object]) -> str:
    """Replace ``{{NAME}}`` placeholders. A list value repeats its line once per item (bash arrays, YAML lists)."""
    out = []
    for line in template.splitlines(keepends=True):
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise KeyError(f"template placeholder {{{{{unknown[0]}}}}} has no value")
        lists = [n for n in names if isinstance(values[n], (list, tuple))]
        if len(lists) > 1:
            raise ValueError(f"a template line may hold one list placeholder: {line.strip()}")
        items = values[lists[0]] if lists else [None]
        for item in items:
            rendered = line
            for n in names:
                rendered = rendered.replace("{{" + n + "}}", str(item if n in lists else values[n]))
            out.append(rendered)
    return "".join(out)


TEMPLATES = {"slurm": ("slurm", "template.sbatch"), "k8s": ("k8s", "pytorchjob.template.yaml")}


# Per-pod requests of the PyTorchJob: placeholders to adjust to the nodes (the plan predicts GPU memory only).
K8S_CPUS_PER_GPU, K8S_MEMORY_GIB_PER_GPU, K8S_SHM_GIB_PER_GPU = 8, 64, 8
K8S_MEMORY_GIB_PER_CPU_PROCESS, K8S_SHM_GIB_PER_CPU_PROCESS = 4, 1


def template_values(best: Estimate, config_path: str, cluster: Cluster, job_name: str,
                    command: str, device: str = "cuda") -> Dict[str, object]:
    """Placeholder values of the launch templates for the chosen layout; ``command`` re-renders the file.

    ``device="cpu"`` renders a job without GPUs: ``cluster.gpus_per_node`` is then the number of training
    processes per node (gloo on the CPU).
    """
    mem = best.memory
    procs = cluster.gpus_per_node
    cpu = device == "cpu"
    unit = "processes" if cpu else "GPUs"
    if cpu:
        resources = [f'cpu: "{procs}"', f"memory: {procs * K8S_MEMORY_GIB_PER_CPU_PROCESS}Gi"]
        shm = procs * K8S_SHM_GIB_PER_CPU_PROCESS
    else:
        resources = [f'cpu: "{procs * K8S_CPUS_PER_GPU}"', f"memory: {procs * K8S_MEMORY_GIB_PER_GPU}Gi",
                     f'nvidia.com/gpu: "{procs}"']
        shm = procs * K8S_SHM_GIB_PER_GPU
    workers = cluster.nodes - 1
    # A single-node job has no Worker replica type at all (the operator rejects replicas: 0).
    worker_spec = ["    Worker:", f"      replicas: {workers}", "      restartPolicy: ExitCode",
                   "      template: *pod"] if workers else []
    pods = "one master pod" + (f" and {workers} worker pod{'s' if workers > 1 else ''}" if workers else "")
    return {
        "JOB_NAME": job_name,
        "NODES": cluster.nodes,
        "WORKERS": workers,
        "GPUS_PER_NODE": procs,
        "PROCS_PER_POD": procs,
        "PODS": pods,
        "DEVICES": f"{procs} CPU training processes" if cpu else f"{procs} GPUs",
        "SBATCH_DEVICE": [] if cpu else [f"--gpus-per-node={procs}"],
        "RESOURCES": resources,
        "SHM_SIZE": f"{shm}Gi",
        "WORKER_SPEC": worker_spec,
        "CONFIG": config_path,
        "LAYOUT": best.layout.overrides(),
        "PLAN": [
            f"layout {best.layout.label()} on {cluster.nodes} x {procs} {unit}"
            + ("" if cpu else f" of {cluster.gpu_memory_gib:g} GiB")
            + f": predicted {mem.total / GIB:.1f} GiB per {'process' if cpu else 'GPU'}",
            f"(model states {mem.model_states / GIB:.1f}, activations {mem.activations / GIB:.1f}), "
            f"step {best.step_s:.2f} s; re-render with:",
            command,
        ],
    }


def render_launch_file(kind: str, out_path: str, values: Dict[str, object]) -> None:
    """Write launch/<kind>'s template rendered with ``values`` to ``out_path``."""
    with open(launch_template(*TEMPLATES[kind])) as f:
        text = render(f.read(), values)
    with open(out_path, "w") as f:
        f.write(text)
    if out_path.endswith((".sh", ".sbatch")):
        os.chmod(out_path, 0o755)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _number(low: float, high: float = math.inf, low_open: bool = True, integer: bool = False):
    """An argparse type: a finite number in (low, high] (or [low, high]); NaN, inf and zero-divisors are refused."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if integer else ''}number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be a {'whole' if integer else 'finite'} number {bound}, got {text}")
        return value
    return parse


POSITIVE, FRACTION, NON_NEGATIVE = _number(0), _number(0, 1), _number(0, low_open=False)
COUNT, NON_NEGATIVE_COUNT = _number(0, integer=True), _number(0, low_open=False, integer=True)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cola-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for cola-train")
    c = Cluster()
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=COUNT, default=c.nodes)
    g.add_argument("--gpus-per-node", type=COUNT, default=c.gpus_per_node)
    g.add_argument("--gpu-memory-gib", type=POSITIVE, default=c.gpu_memory_gib)
    g.add_argument("--nvlink-gbs", type=POSITIVE, default=c.nvlink_gbs, help="GB/s per GPU inside a node")
    g.add_argument("--network-gbs", type=POSITIVE, default=c.network_gbs, help="GB/s per GPU between nodes")
    g.add_argument("--gpu-tflops", type=POSITIVE, default=c.gpu_tflops, help="dense bf16 peak per GPU")
    g.add_argument("--reserve-gib", type=NON_NEGATIVE, default=c.reserve_gib,
                   help="per-GPU memory for the CUDA context, NCCL and fragmentation")
    g.add_argument("--gemm-efficiency", type=FRACTION, default=c.gemm_efficiency,
                   help="fraction of peak large GEMMs reach, in (0, 1]")
    g.add_argument("--gemm-half-tokens", type=NON_NEGATIVE_COUNT, default=c.gemm_half_tokens)
    s = p.add_argument_group("search")
    s.add_argument("--recompute", default=",".join(RECOMPUTE_MODES),
                   help="recompute modes to consider, comma-separated (default: all)")
    s.add_argument("--no-distributed-optimizer", action="store_true", help="replicate the optimizer over DP")
    s.add_argument("--evaluate", action="store_true", help="only the layout the config (and overrides) selects")
    s.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="kernels to predict activations for (cpu: torch's composite RMSNorm); with cpu, rendered "
                        "launch files run --gpus-per-node CPU processes per node and request no GPUs")
    o = p.add_argument_group("output")
    o.add_argument("--top", type=COUNT, default=15, help="layouts to print")
    o.add_argument("--json", action="store_true", help="print JSON instead of a table")
    o.add_argument("--render-slurm", metavar="PATH", help="write an sbatch script for the best layout")
    o.add_argument("--render-k8s", metavar="PATH", help="write a Kubeflow PyTorchJob for the best layout")
    o.add_argument("--job-name", help="job name in rendered files (default: from the config path)")
    o.add_argument("--overwrite", action="store_true", help="replace existing --render-slurm / --render-k8s files")
    return p


def format_table(estimates: Sequence[Estimate]) -> List[str]:
    unit, scale = ("GiB", GIB) if max(e.memory.total - e.memory.reserve for e in estimates) >= GIB else ("MiB", 1024**2)

    def mem(x: float) -> str:
        return f"{x / scale:7.1f}"

    lines = [
        f"{'#':>3} {'layout':<34} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'other':>7} "
        f"{'total':>7}  {'TP GB':>7} {'PP GB':>6} {'DP GB':>6}  {'step s':>8} {'bubble':>6}  fits",
        f"{'':>3} {'':<34} {f'({unit} per GPU, fullest pipeline stage)':^55}  {'(sent per GPU and step)':^21}",
    ]
    for i, e in enumerate(estimates, 1):
        m = e.memory
        other = m.pipeline_buffers + m.workspace + m.reserve
        bubble = e.bubble_s / e.step_s if e.step_s else 0.0
        lines.append(
            f"{i:>3} {e.layout.label():<34} {mem(m.weights)} {mem(m.gradients)} {mem(m.optimizer)} "
            f"{mem(m.activations)} {mem(other)} {mem(m.total)}  {e.tp_bytes / 1e9:7.3g} {e.pp_bytes / 1e9:6.3g} "
            f"{e.dp_bytes / 1e9:6.3g}  {e.step_s:8.3g} {bubble:6.1%}  {'yes' if e.fits else 'NO'}")
    return lines


def _job_name(config_path: str) -> str:
    parts = os.path.normpath(config_path).split(os.sep)
    stem = os.path.splitext(parts[-1])[0]
    name = f"{parts[-2]}-{stem}" if len(parts) > 1 and parts[-2] != "configs" else stem
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def _command(args, flag: str, out_path: str) -> str:
    """The cola-plan command that renders ``out_path`` again with these settings."""
    parts = ["cola-plan", "--config", args.config, "--nodes", str(args.nodes), "--gpus-per-node",
             str(args.gpus_per_node), "--gpu-memory-gib", f"{args.gpu_memory_gib:g}"]
    defaults = build_parser().parse_args(["--config", args.config])
    for name in ("nvlink_gbs", "network_gbs", "gpu_tflops", "reserve_gib", "gemm_efficiency", "gemm_half_tokens",
                 "recompute", "device", "job_name"):
        if getattr(args, name) != getattr(defaults, name):
            parts += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.no_distributed_optimizer:
        parts.append("--no-distributed-optimizer")
    return " ".join([*parts, *args.overrides, flag, out_path])


def check_launch_outputs(paths: Sequence[str], overwrite: bool) -> None:
    """Before any work: each launch file's directory exists, and an existing file is replaced only when asked."""
    if len(set(map(os.path.abspath, paths))) < len(paths):
        raise ConfigError("--render-slurm and --render-k8s name the same file. Fix: give each its own path")
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ConfigError(f"{path} is a directory. Fix: give the launch file's path, e.g. {path}/job.sbatch")
        if not os.path.isdir(folder):
            raise ConfigError(f"cannot write {path}: directory {folder} does not exist. Fix: create it or "
                              "choose another path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write {path}: {folder} is not writable. Fix: choose a writable location")
        if os.path.lexists(path) and not overwrite:
            raise ConfigError(f"{path} already exists. Fix: pass --overwrite to replace it, or choose another path")


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.nvlink_gbs, args.network_gbs,
                      args.gpu_tflops, args.reserve_gib, args.gemm_efficiency, args.gemm_half_tokens)
    modes = [mode.strip() for mode in args.recompute.split(",") if mode.strip()]
    bad = [mode for mode in modes if mode not in RECOMPUTE_MODES]
    if cluster.nodes < 1 or cluster.gpus_per_node < 1 or bad or not modes:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1 and --recompute a list of "
                          f"{', '.join(RECOMPUTE_MODES)}. Fix: correct those options")
    if cluster.reserve_gib >= cluster.gpu_memory_gib:
        raise ConfigError(f"--reserve-gib {cluster.reserve_gib:g} leaves nothing of --gpu-memory-gib "
                          f"{cluster.gpu_memory_gib:g}. Fix: lower --reserve-gib")
    check_launch_outputs([p for p in (args.render_slurm, args.render_k8s) if p], args.overwrite)
    cfg = load_config(args.config, args.overrides, world_size=cluster.world_size if args.evaluate else None)
    if args.evaluate:
        estimates = [estimate(cfg, layout_of(cfg, cluster.world_size), cluster, args.device)]
    else:
        estimates = rank_layouts(cfg, cluster, args.device, recompute_modes=modes,
                                 distributed_optimizer=not args.no_distributed_optimizer)
    if not estimates:
        print(f"cola-plan: no layout of this config runs on {cluster.world_size} GPUs; change train.global_batch_size "
              "or the cluster shape", file=sys.stderr)
        return 1
    best = estimates[0]
    if args.json:
        print(json.dumps([e.as_dict() for e in estimates[: args.top]], indent=1))
    else:
        m = cfg.model
        print(f"cola-plan: {m.arch} d={m.hidden_size} layers={m.num_layers} seq={m.seq_length} "
              f"global_batch={cfg.train.global_batch_size} precision={cfg.train.precision} on {cluster.nodes} x "
              f"{cluster.gpus_per_node} GPUs ({cluster.gpu_memory_gib:g} GiB); {len(estimates)} layouts")
        for line in format_table(estimates[: args.top]):
            print(line)
        verdict = "best" if best.fits else "none fits; least bad"
        print(f"\n{verdict}: {best.layout.label()}\n  " + " ".join(best.layout.overrides()))
    outputs = [(kind, path) for kind, path in (("slurm", args.render_slurm), ("k8s", args.render_k8s)) if path]
    if outputs and not best.fits:
        print("cola-plan: not rendering launch files: no layout fits in GPU memory", file=sys.stderr)
        return 1
    for kind, path in outputs:
        command = _command(args, f"--render-{kind}", path)
        values = template_values(best, args.config, cluster, args.job_name or _job_name(args.config), command,
                                 args.device)
        render_launch_file(kind, path, values)
        print(f"cola-plan: wrote {path}", file=sys.stderr)
    return 0 if best.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("cola-plan", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
