"""A CoLA model from a dense LLaMA checkpoint by truncated SVD, for warm starts (beyond the paper).

Each projection ``W`` (d_out × d_in) becomes the rank-r truncated SVD ``W ≈ U_r S_r V_rᵀ`` with the singular values
split symmetrically, ``A = sqrt(S_r) V_rᵀ`` and ``B = U_r sqrt(S_r)``, so ``B·A`` is the best rank-r approximation of
``W`` and A, B have matching scales. This is an approximation twice over: truncation drops the tail of the spectrum
(the reported relative error), and CoLA computes ``B·silu(A·x)``, not ``B·A·x``, so even an exact factorisation
would not reproduce the dense layer. The result is a starting point for training, not a converted model.

Grouped k/v heads are repeated to one per query head (exactly what LLaMA's attention does with them), tied
embeddings are copied into an untied output layer.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from cola_megatron.errors import ConversionError

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def svd_factors(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, relative_error)`` with ``B @ A`` the rank-r truncated SVD of ``weight`` (d_out × d_in).

    The error ``‖W − B·A‖_F / ‖W‖_F`` comes from the discarded singular values.
    """
    w = weight.detach().to(torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    total = s.square().sum()
    error = float((s[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return a.contiguous(), b.contiguous(), error


def expand_kv_heads(weight: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """(kv_heads·head_dim, d) → (heads·head_dim, d): query head h reads kv head h // (heads / kv_heads)."""
    if kv_heads == heads:
        return weight
    rows, d = weight.shape
    head_dim = rows // kv_heads
    grouped = weight.reshape(kv_heads, head_dim, d)
    return grouped.repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, d)


class CoLAFactors:
    """Reference-named CoLA tensors of a dense LLaMA, computed on demand (``.get(name)``) one layer at a time: the
    SVDs of the layer asked for are kept until another layer is asked for, so memory holds one layer's factors.
    ``errors`` collects each projection's relative approximation error, per layer."""

    def __init__(self, raw: Mapping, weights, rank: int):
        from cola_megatron.convert.hf_io import check_shapes
        from cola_megatron.convert.names import llama_shapes

        check_shapes(weights.shapes, llama_shapes(raw), "dense LLaMA")
        self.raw, self.weights, self.rank = raw, weights, rank
        self.heads = raw["num_attention_heads"]
        self.kv_heads = raw.get("num_key_value_heads") or self.heads
        self.dtype = weights.dtype()
        self.errors: List[Dict[str, float]] = []
        self._layer, self._factors = None, {}

    def get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and self.raw.get("tie_word_embeddings"):
            return self.weights.get("model.embed_tokens.weight").clone()
        if not name.endswith((".cola_a", ".cola_b")):
            return self.weights.get(name)
        projection, factor = name.rsplit(".", 1)
        layer = int(projection.split(".")[2])
        if layer != self._layer:
            self._layer, self._factors = layer, {}
            self.errors.append({})
        if projection not in self._factors:
            w = self.weights.get(projection + ".weight")
            if projection.endswith(("self_attn.k_proj", "self_attn.v_proj")):
                w = expand_kv_heads(w, self.heads, self.kv_heads)
            if self.rank > min(w.shape):
                raise ConversionError(f"rank {self.rank} exceeds the smaller side of {projection} {tuple(w.shape)}")
            a, b, error = svd_factors(w, self.rank)
            self._factors[projection] = (a.t().to(self.dtype).contiguous(), b.t().to(self.dtype).contiguous())
            self.errors[-1][projection.split(".")[-1]] = error
        return self._factors[projection][0 if factor == "cola_a" else 1]


def cola_from_dense(raw: Mapping, weights, rank: int) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, float]]]:
    """Every reference-named CoLA tensor in memory (small models) and, per layer, each projection's relative
    approximation error. ``weights`` needs ``.shapes``, ``.dtype()`` and ``.get(name)`` (see
    :class:`hf_io.WeightReader`)."""
    factors = CoLAFactors(raw, weights, rank)
    state = {"model.embed_tokens.weight": factors.get("model.embed_tokens.weight"),
             "model.norm.weight": factors.get("model.norm.weight"),
             "lm_head.weight": factors.get("lm_head.weight")}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            state[p + norm] = factors.get(p + norm)
        for name in PROJECTIONS:
            for factor in ("cola_a", "cola_b"):
                state[f"{p}{name}.{factor}"] = factors.get(f"{p}{name}.{factor}")
    return state, factors.errors


def format_errors(errors: List[Dict[str, float]]) -> List[str]:
    """One line per layer: the relative Frobenius error of each projection."""
    names = list(errors[0]) if errors else []
    lines = ["layer  " + "  ".join(f"{n:>9}" for n in names)]
    for i, layer in enumerate(errors):
        lines.append(f"{i:>5}  " + "  ".join(f"{layer[n]:9.4f}" for n in names))
    return lines
