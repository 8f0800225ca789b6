"""CoLA-M: activation recomputation that keeps only what is expensive to recompute (docs/design.md §4).

A CoLA layer is a chain of bottleneck auto-encoders ``y = B · σ(z)``, ``z = A · x``. Per token, CoLA-M keeps for
backward only the layer input ``x``, the residual ``h`` after attention (2·d) and the seven pre-activations z
(3r for q|k|v, r for o, 2r for gate|up, r for down: 7·r). In backward, each residual branch is recomputed once
from these: the norms, σ, the B projections that feed the attention core and the GLU, and the attention core.
The A projections are never recomputed — their outputs are the stored z's — and neither are the B projections of
o and down, whose outputs only feed the residual stream.

How: the layer's forward runs as one autograd function without a graph, saving x, h and the z's. Its backward
rebuilds each branch's graph with the A GEMMs (and the row-type B GEMMs) replaced by :class:`_KnownLinear` nodes —
their forward returns the stored value instead of multiplying, their backward is the GEMM's — and back-propagates
through it in one pass. Weight gradients are returned to autograd, so megatron's DDP hooks see them as usual.

Under tensor parallelism the z's are stored as the slots compute them (``encode``): with the ``bottleneck`` scheme
and sequence parallelism, column-type z's are this rank's tokens r-wide and row-type z's the reduced r-wide
tensor; with ``pair``, r/tp-wide shards over the full sequence. Communication that lies on a recomputed path (the
r-wide all-gather before a column B; with ``pair``, the gathers of the A inputs) runs again in backward, as in
megatron's own recomputation.

Stored per token and layer: ``2·d + 7·r`` elements in the compute dtype, plus per layer (not per token) the
rotary table and the attention mask when one is passed (both shared by every layer). Dropout must be 0 (the
recomputed attention core would need the forward's random state; the paper's configs use none).

Standalone use (benchmarks): build a layer from ``cola_megatron.models.spec.layer_spec(recompute='cola_m')`` and call it
like megatron's ``TransformerLayer``: ``out, _ = layer(hidden_states, attention_mask=None, rotary_pos_emb=emb)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from cola_megatron.models.layers import ops
from cola_megatron.models.layers.cola import CoLAFC1, CoLAFC2, CoLAProj, CoLAQKV

# Layer arguments CoLA-M cannot honour while training; they select paths (cross attention, packed sequences,
# inference caches, fused RoPE tables, attention bias) that GPT pre-training does not use.
_UNSUPPORTED_ARGUMENTS = (
    "context",
    "context_mask",
    "rotary_pos_cos",
    "rotary_pos_sin",
    "rotary_pos_cos_sin",
    "attention_bias",
    "inference_context",
    "packed_seq_params",
)


class CoLAMTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer (same submodules, parameters and checkpoint keys) with CoLA-M storage.

    Without autograd (evaluation, inference) it runs megatron's forward unchanged.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        check_cola_m_layer(self)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(hidden_states, attention_mask=attention_mask, context=context,
                                   context_mask=context_mask, rotary_pos_emb=rotary_pos_emb, **kwargs)
        given = dict(kwargs, context=context, context_mask=context_mask)
        unsupported = sorted(name for name in _UNSUPPORTED_ARGUMENTS if given.get(name) is not None)
        if unsupported:
            raise ValueError(f"model.recompute=cola_m does not support the layer arguments {unsupported}; "
                             "use model.recompute=full or none")
        q_pos_emb, k_pos_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        attention_params, mlp_params = _branch_parameters(self)
        output = _CoLAMLayer.apply(
            self, len(attention_params), hidden_states, attention_mask, q_pos_emb, k_pos_emb, *attention_params,
            *mlp_params,
        )
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
        return output, context


def check_cola_m_layer(layer: TransformerLayer) -> None:
    """Refuse, with the fix, any layer whose forward CoLA-M would not reproduce exactly."""
    config = layer.config

    def refuse(problem: str, fix: str):
        raise ValueError(f"model.recompute=cola_m: {problem}. Fix: {fix}")

    if config.hidden_dropout > 0 or config.attention_dropout > 0:
        refuse("dropout is not supported (the recomputed attention would need the forward's random state)",
               "set model.hidden_dropout=0 and model.attention_dropout=0, or use model.recompute=full")
    if config.recompute_granularity is not None:
        refuse(f"megatron's recompute_granularity={config.recompute_granularity!r} is also set",
               "use one recomputation: model.recompute=cola_m without megatron's recompute options")
    if config.fp8 or getattr(config, "fp4", None):
        refuse("FP8/FP4 training is not supported", "train in bf16 or use model.recompute=full")
    attention, mlp = layer.self_attention, layer.mlp
    slots = (
        (getattr(attention, "linear_qkv", None), CoLAQKV),
        (getattr(attention, "linear_proj", None), CoLAProj),
        (getattr(mlp, "linear_fc1", None), CoLAFC1),
        (getattr(mlp, "linear_fc2", None), CoLAFC2),
    )
    if not all(isinstance(slot, kind) for slot, kind in slots):
        refuse("it needs CoLA projections in all four linear slots", "set model.arch=cola or another recompute")
    if not isinstance(layer.cross_attention, IdentityOp):
        refuse("cross attention is not supported", "use model.recompute=full")
    for norm in ("q_layernorm", "k_layernorm"):
        if not isinstance(getattr(attention, norm, None), (IdentityOp, type(None))):
            refuse(f"{norm} is not supported", "use model.recompute=full")
    if getattr(config, "attention_output_gate", False) or getattr(config, "no_rope_freq", None):
        refuse("attention output gates and per-layer RoPE skipping are not supported", "use model.recompute=full")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        refuse("clamped GLU activations are not supported", "use model.recompute=full")
    if {id(p) for p in layer.parameters()} != {id(p) for branch in _branch_parameters(layer) for p in branch}:
        refuse("the layer has parameters outside its norms, attention and MLP", "use model.recompute=full")


def _branch_parameters(layer: TransformerLayer):
    """The layer's parameters split by residual branch (each branch's backward returns only its own)."""
    attention = (*layer.input_layernorm.parameters(), *layer.self_attention.parameters())
    return attention, (*layer.pre_mlp_layernorm.parameters(), *layer.mlp.parameters())


# --------------------------------------------------------------------------------------------------------------
# The layer's math, written once for the forward (z = slot.encode(·)) and for the recompute (z = stored)


def _attention_codes(layer, x, q_pos_emb, k_pos_emb, mask, code: Callable):
    """input norm → q|k|v (A, σ, B) → RoPE → core attention → o's A: returns (z_qkv, z_o)."""
    attention = layer.self_attention
    qkv, proj = attention.linear_qkv, attention.linear_proj
    z_qkv = code(qkv, layer.input_layernorm(x))
    head_dim = attention.hidden_size_per_attention_head
    # This rank's heads, [s, b, heads, head_dim] each; megatron's per-head interleaving is skipped (no copy).
    q, k, v = (t.view(*t.shape[:-1], -1, head_dim) for t in qkv.decode_branches(z_qkv))
    if q_pos_emb is not None:
        q = apply_rotary_pos_emb(q, q_pos_emb, config=attention.config, cp_group=attention.pg_collection.cp)
    if k_pos_emb is not None:
        k = apply_rotary_pos_emb(k, k_pos_emb, config=attention.config, cp_group=attention.pg_collection.cp)
    core = attention.core_attention(
        q, k, v, mask, attn_mask_type=attention.attn_mask_type, attention_bias=None, packed_seq_params=None
    )
    return z_qkv, code(proj, core)


def _mlp_codes(layer, h, code: Callable):
    """pre-MLP norm → gate|up (A, σ, B) → GLU → down's A: returns (z_fc1, z_down)."""
    mlp = layer.mlp
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    z_fc1 = code(fc1, layer.pre_mlp_layernorm(h))
    gate, up = fc1.decode_branches(z_fc1)
    offset = getattr(mlp.config, "glu_linear_offset", 0.0)
    return z_fc1, code(fc2, ops.glu(mlp.activation_func, gate, up + offset if offset else up))


def _encode(slot, x):
    return slot.encode(x)


class _StoredCodes:
    """``code`` for the recompute: the A GEMM is a _KnownLinear node returning the stored z."""

    def __init__(self, *codes: torch.Tensor):
        self._codes = iter(codes)

    def __call__(self, slot, x):
        return _KnownLinear.apply(slot.encoder_input(x), slot._fused_a(), next(self._codes), slot.code_reduction,
                                  slot.tp_group, None)


def _residual_output_node(residual, slot, z):
    """The graph root of a residual branch: ``residual + B·σ(z)`` of the row slot, value not computed."""
    return _KnownLinear.apply(F.silu(z), slot.b_weight[0], None, slot.output_reduction, slot.tp_group, residual)


class _KnownLinear(torch.autograd.Function):
    """``residual + reduce(x · Wᵀ)`` whose value is known already (a stored z) or not needed (a graph root).

    The forward skips the GEMM and returns ``value`` (or, for None, a zero-memory stand-in of the right shape);
    the backward is the GEMM's. ``reduction`` is how the forward summed the product over TP ('all_reduce' or
    'reduce_scatter' along the sequence, see the CoLA slots); its gradient is the identity or an all-gather.
    A ``residual`` (skip connection) receives the incoming gradient first, in the order megatron's layer sums it.
    """

    @staticmethod
    def forward(ctx, x, weight, value, reduction, group, residual):
        ctx.save_for_backward(x, weight)
        ctx.reduction, ctx.group = reduction, group
        if value is not None:
            return value.detach()
        shape = [*x.shape[:-1], weight.shape[0]]
        if reduction == "reduce_scatter":
            shape[0] //= group.size()
        return x.new_zeros(()).expand(shape)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_residual = grad if ctx.needs_input_grad[5] else None
        if ctx.reduction == "reduce_scatter":
            grad = gather_from_sequence_parallel_region(grad, group=ctx.group)
        grad_x = torch.matmul(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_weight, None, None, None, grad_residual


class _CoLAMLayer(torch.autograd.Function):
    """One transformer layer; saves x, h and the seven z's and recomputes the rest in backward."""

    @staticmethod
    def forward(ctx, layer, num_attention_params, x, mask, q_pos_emb, k_pos_emb, *params):
        z_qkv, z_o = _attention_codes(layer, x, q_pos_emb, k_pos_emb, mask, _encode)
        h = x + layer.self_attention.linear_proj.decode(z_o)
        z_fc1, z_down = _mlp_codes(layer, h, _encode)
        out = h + layer.mlp.linear_fc2.decode(z_down)
        ctx.layer = layer
        ctx.attention_params, ctx.mlp_params = params[:num_attention_params], params[num_attention_params:]
        ctx.save_for_backward(x, h, z_qkv, z_o, z_fc1, z_down, mask, q_pos_emb, k_pos_emb)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h, z_qkv, z_o, z_fc1, z_down, mask, q_pos_emb, k_pos_emb = ctx.saved_tensors
        layer, attention_params, mlp_params = ctx.layer, ctx.attention_params, ctx.mlp_params
        needs = ctx.needs_input_grad[6:]

        def mlp_branch(h_leaf):
            _, z = _mlp_codes(layer, h_leaf, _StoredCodes(z_fc1, z_down))
            return _residual_output_node(h_leaf, layer.mlp.linear_fc2, z)

        def attention_branch(x_leaf):
            _, z = _attention_codes(layer, x_leaf, q_pos_emb, k_pos_emb, mask, _StoredCodes(z_qkv, z_o))
            return _residual_output_node(x_leaf, layer.self_attention.linear_proj, z)

        grad_h, mlp_grads = _residual_branch_backward(mlp_branch, h, grad_out, mlp_params,
                                                      needs[len(attention_params):])
        grad_x, attention_grads = _residual_branch_backward(attention_branch, x, grad_h, attention_params,
                                                            needs[: len(attention_params)])
        return (None, None, grad_x, None, None, None, *attention_grads, *mlp_grads)


def _residual_branch_backward(branch: Callable, residual: torch.Tensor, grad_out: torch.Tensor,
                              params: Sequence[torch.nn.Parameter], needs: Sequence[bool]):
    """Recompute ``out = residual + branch(residual)`` from the stored tensors and back-propagate grad_out.

    Returns the gradient w.r.t. the residual and one gradient (or None) per parameter.
    """
    wanted = [p for p, need in zip(params, needs) if need]
    with torch.enable_grad():
        leaf = residual.detach().requires_grad_()
        # The branch reads a view of the leaf, not the leaf: module hooks that watch their inputs' gradients
        # (torch's ModuleTracker, so FlopCounterMode) cannot be registered on a leaf inside autograd.grad.
        root = branch(leaf.view_as(leaf))
        grads = torch.autograd.grad(root, [leaf, *wanted], grad_out, allow_unused=True)
    by_param = iter(grads[1:])
    return grads[0], [next(by_param) if need else None for need in needs]
