"""Parameter and FLOP accounting from the config's shapes alone (no allocation; works for 7B on any machine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cola_megatron.config import ModelConfig


@dataclass
class ParameterCount:
    embedding: int
    output_layer: int
    per_layer: int
    layers: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.layers + self.final_norm

    @property
    def non_embedding(self) -> int:
        """Parameters that cost matmul FLOPs per token: the blocks and the output layer."""
        return self.total - self.embedding


def kv_width(m: ModelConfig) -> int:
    """Output width of the k (and of the v) projection: ``groups · head_dim`` (d without grouped-query attention)."""
    return (m.hidden_size // m.num_attention_heads) * (m.num_query_groups or m.num_attention_heads)


def kv_cache_elements_per_token(m: ModelConfig) -> int:
    """Elements an inference KV cache holds per token: k and v of every layer's k/v heads (CoLA and dense alike:
    the bottleneck changes the projections, not the attention's k and v)."""
    return 2 * kv_width(m) * m.num_layers


@dataclass(frozen=True)
class LayerParameters:
    """One transformer layer's parameters on one tensor-parallel rank."""

    replicated: int
    """Weights every TP rank holds and applies to its own tokens (CoLA ``bottleneck``: column-type A, row-type B)."""
    sharded: int
    """This rank's shard of the TP-split weights."""
    norms: int

    @property
    def total(self) -> int:
        return self.replicated + self.sharded + self.norms


def layer_parameters(m: ModelConfig, tp: int = 1) -> LayerParameters:
    d, f, r, kv = m.hidden_size, m.padded_ffn_hidden_size, m.rank, kv_width(m)
    qkv_out = d + 2 * kv
    if m.arch == "dense":
        return LayerParameters(0, (d * qkv_out + d * d + 2 * d * f + f * d) // tp, 2 * d)
    replicated = 3 * r * d + 2 * r * d + d * r + d * r  # A of q|k|v and gate|up, B of o and down
    sharded = r * qkv_out + 2 * r * f + r * d + r * f  # B of q|k|v and gate|up, A of o and down
    return LayerParameters(replicated, sharded // tp, 2 * d)


def count_parameters(m: ModelConfig) -> ParameterCount:
    """Exact parameter count of the whole model (untied embedding and output layer)."""
    per_layer = layer_parameters(m).total
    return ParameterCount(
        embedding=m.vocab_size * m.hidden_size,
        output_layer=m.vocab_size * m.hidden_size,
        per_layer=per_layer,
        layers=per_layer * m.num_layers,
        final_norm=m.hidden_size,
    )


def training_flops_per_token(m: ModelConfig, seq_length: Optional[int] = None) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation), torchtitan/PaLM convention:

        6 · N + 12 · L · s · d

    N: parameters of the blocks and the output layer (every weight is used in one multiply-add forward and two
    backward; a CoLA projection of r·(d_in + d_out) weights costs exactly that), L layers, s sequence length,
    d hidden size (attention scores and weighted sum, causal masking not discounted). Recomputation is not model
    FLOPs, so MFU is comparable across recompute modes.
    """
    s = seq_length or m.seq_length
    return 6.0 * count_parameters(m).non_embedding + 12.0 * m.num_layers * s * m.hidden_size


def recompute_flops_per_token(m: ModelConfig, recompute: Optional[str] = None,
                              seq_length: Optional[int] = None) -> float:
    """Forward FLOPs that a recompute mode runs again in backward, per training token (GEMMs and the attention
    core; elementwise work, and the score recomputation inside flash attention's own backward, not counted).

    ``full`` (megatron's per-layer recompute) re-runs every layer's forward: 2 FLOPs per layer GEMM weight plus the
    attention core's 4·s·d. ``cola_m`` re-runs only the B projections that feed the attention core and the GLU
    (q|k|v: r·(d + 2·kv) weights, gate|up: 2·r·f) and the attention core; the A projections and the B of o and
    down are not re-run (docs/design.md §4). ``none``: 0.
    """
    mode = recompute or m.recompute
    s = seq_length or m.seq_length
    d, f, r, kv = m.hidden_size, m.padded_ffn_hidden_size, m.rank, kv_width(m)
    attention = 4.0 * s * d
    if mode == "full":
        gemm_weights = layer_parameters(m).total - layer_parameters(m).norms
        return m.num_layers * (2.0 * gemm_weights + attention)
    if mode == "cola_m":
        return m.num_layers * (2.0 * r * (d + 2 * kv + 2 * f) + attention)
    return 0.0


def hardware_flops_per_token(m: ModelConfig, seq_length: Optional[int] = None) -> float:
    """Hardware FLOPs of one training token: the model FLOPs plus what ``m.recompute`` re-runs. MFU divides model
    FLOPs by the step time, HFU these (Megatron, PaLM): they differ by exactly the recomputation."""
    return training_flops_per_token(m, seq_length) + recompute_flops_per_token(m, m.recompute, seq_length)
