"""Megatron's global tensors ↔ the reference implementation's names, and the run config ↔ ``config.json``.

Megatron side: the state dict of the unsplit model (TP=1, PP=1), e.g. ``decoder.layers.3.mlp.linear_fc1.a_weight``.
A CoLA slot stores its ``n`` projections fused: A as ``(n, r, d_in)``, B as ``(n, d_out, r)``, branches in the order
q, k, v (``linear_qkv``) and gate, up (``linear_fc1``); B_q's rows are the query heads in head order, and megatron's
RoPE rotates non-interleaved halves like Hugging Face's ``rotate_half``, so no row permutation is needed.

Reference side: ``cola_a = A[i].T`` of shape (d_in, r) and ``cola_b = B[i].T`` of shape (r, d_out), so that
``y = silu(x @ cola_a) @ cola_b`` (see ``_CoLASlot.reference_layout``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from cola_megatron.config import ModelConfig
from cola_megatron.errors import ConversionError

# megatron slot (under decoder.layers.{i}.) → the reference projections it fuses, in branch order.
SLOTS = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
LAYER_TENSORS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}
MODEL_TENSORS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def _take(state: Mapping[str, torch.Tensor], name: str, side: str) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"{side} weights have no tensor {name!r}: the checkpoint and its config disagree on "
                              "the model's shape (layers?); convert with the config the weights were trained with")
    return state[name]


def _check_no_extra(state: Mapping[str, Any], used: set, side: str) -> None:
    extra = sorted(k for k in state if k not in used)
    if extra:
        raise ConversionError(f"{side} weights hold tensors a CoLA model does not have: {extra[:8]}"
                              f"{' …' if len(extra) > 8 else ''}; is this a CoLA checkpoint of the configured shape?")


def megatron_to_reference(state: Mapping[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Unsplit megatron state dict → reference-named tensors (fresh contiguous copies for the transposes)."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out, used = {}, set()
    for meg, ref in MODEL_TENSORS.items():
        out[ref] = _take(state, meg, "megatron")
        used.add(meg)
    for i in range(num_layers):
        prefix = f"decoder.layers.{i}."
        for meg, ref in LAYER_TENSORS.items():
            out[f"model.layers.{i}.{ref}"] = _take(state, prefix + meg, "megatron")
            used.add(prefix + meg)
        for slot, projections in SLOTS.items():
            a = _take(state, f"{prefix}{slot}.a_weight", "megatron")
            b = _take(state, f"{prefix}{slot}.b_weight", "megatron")
            used.update((f"{prefix}{slot}.a_weight", f"{prefix}{slot}.b_weight"))
            if a.shape[0] != len(projections) or b.shape[0] != len(projections):
                raise ConversionError(f"{prefix}{slot} holds {a.shape[0]} fused projections, expected "
                                      f"{len(projections)}: not a CoLA checkpoint of this code's layout")
            for branch, proj in enumerate(projections):
                out[f"model.layers.{i}.{proj}.cola_a"] = a[branch].t().contiguous()
                out[f"model.layers.{i}.{proj}.cola_b"] = b[branch].t().contiguous()
    _check_no_extra(state, used, "megatron")
    return out


def reference_to_megatron(state: Mapping[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Reference-named tensors → the unsplit megatron state dict (the inverse of :func:`megatron_to_reference`)."""
    out, used = {}, set()
    for meg, ref in MODEL_TENSORS.items():
        out[meg] = _take(state, ref, "Hugging Face")
        used.add(ref)
    for i in range(num_layers):
        prefix = f"decoder.layers.{i}."
        for meg, ref in LAYER_TENSORS.items():
            out[prefix + meg] = _take(state, f"model.layers.{i}.{ref}", "Hugging Face")
            used.add(f"model.layers.{i}.{ref}")
        for slot, projections in SLOTS.items():
            names = [f"model.layers.{i}.{proj}" for proj in projections]
            used.update(n + suffix for n in names for suffix in (".cola_a", ".cola_b"))
            out[f"{prefix}{slot}.a_weight"] = torch.stack([_take(state, n + ".cola_a", "Hugging Face").t() for n in names])
            out[f"{prefix}{slot}.b_weight"] = torch.stack([_take(state, n + ".cola_b", "Hugging Face").t() for n in names])
    _check_no_extra(state, used, "Hugging Face")
    return out


# --------------------------------------------------------------------------------------------------------------
# Configs


def hf_config_fields(m: ModelConfig, special_ids: Optional[Mapping[str, Optional[int]]] = None) -> Dict[str, Any]:
    """``ColaConfig`` keyword arguments for a run's model section."""
    if m.arch != "cola":
        raise ConversionError(f"model.arch is {m.arch!r}: only CoLA models export to the 'cola' Hugging Face format")
    if m.num_query_groups not in (None, m.num_attention_heads):
        raise ConversionError("CoLA exports are multi-head attention: model.num_query_groups must be null")
    ids = dict(special_ids or {})
    return dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.padded_ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads,
        rank=m.rank,
        lr_act_type=m.lr_act,
        only_lr_act=m.only_lr_act,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        initializer_range=m.init_std,
        tie_word_embeddings=False,
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"),
        architectures=["ColaForCausalLM"],
    )


REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def model_section_from_hf(raw: Mapping[str, Any], rank: Optional[int] = None, only_lr_act: Optional[bool] = None,
                          dense: bool = False, source: str = "config.json") -> Dict[str, Any]:
    """The ``model`` section of a run config for a Hugging Face config: a CoLA one, or (``dense=True``, ``rank``
    given) a dense LLaMA one, whose grouped k/v heads and tied embeddings the SVD initialisation expands.

    Accepts the reference implementation's spellings: ``max_sequence_length`` for the context length, missing
    ``lr_act_type``/``only_lr_act`` (their defaults, silu and false).
    """
    missing = [k for k in REQUIRED_HF_FIELDS if raw.get(k) is None]
    rank = rank if rank is not None else raw.get("rank")
    if rank is None:
        missing.append("rank")
    if missing:
        raise ConversionError(f"{source} lacks {missing}: it does not describe a complete model")
    heads = raw["num_attention_heads"]
    if raw.get("lr_act") is False:
        raise ConversionError(f"{source} sets lr_act=false (no bottleneck non-linearity), which this code does not "
                              "implement; only CoLA with SiLU bottlenecks converts")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported; the LLaMA MLP uses silu")
    kv_heads = raw.get("num_key_value_heads") or heads
    if not dense and kv_heads != heads:
        raise ConversionError(f"{source}: num_key_value_heads {kv_heads} != num_attention_heads {heads}; CoLA models "
                              "use multi-head attention")
    if not dense and raw.get("tie_word_embeddings"):
        raise ConversionError(f"{source} ties the output layer to the embeddings; CoLA models have an untied lm_head")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != raw["hidden_size"]:
        raise ConversionError(f"{source}: head_dim {head_dim} x {heads} heads != hidden_size {raw['hidden_size']}; "
                              "only head_dim = hidden_size / heads is supported")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConversionError(f"{source} has projection biases; LLaMA/CoLA projections here have none")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{source}: RoPE scaling {rope_type!r} is not supported; only plain RoPE (theta) is")
    theta = raw.get("rope_theta") or rope.get("rope_theta") or 10000.0
    context = raw.get("max_position_embeddings") or raw.get("max_sequence_length") or ModelConfig().seq_length
    only = raw.get("only_lr_act", False) if only_lr_act is None else only_lr_act
    return dict(
        arch="cola",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        ffn_hidden_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        rank=int(rank),
        only_lr_act=bool(only),
        lr_act=raw.get("lr_act_type") or "silu",
        max_position_embeddings=int(context),
        seq_length=min(int(context), ModelConfig().seq_length),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        init_std=float(raw.get("initializer_range", 0.02)),
    )
