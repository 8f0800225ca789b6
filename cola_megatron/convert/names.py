"""Megatron's global tensors ↔ the reference implementation's names, and the run config ↔ ``config.json``.

Megatron side: the state dict of the unsplit model (TP=1, PP=1), e.g. ``decoder.layers.3.mlp.linear_fc1.a_weight``.
A CoLA slot stores its ``n`` projections fused: A as ``(n, r, d_in)``, B as ``(n, d_out, r)``, branches in the order
q, k, v (``linear_qkv``) and gate, up (``linear_fc1``); under grouped-query attention B_q is ``b_weight`` (1, d, r)
and B_k, B_v are ``b_kv_weight`` (2, groups·head_dim, r). B_q's rows are the query heads in head order (B_k's and
B_v's the groups in order), and megatron's RoPE rotates non-interleaved halves like Hugging Face's ``rotate_half``,
so no row permutation is needed.

Reference side: ``cola_a = A[i].T`` of shape (d_in, r) and ``cola_b = B[i].T`` of shape (r, d_out), so that
``y = silu(x @ cola_a) @ cola_b`` (see ``_CoLASlot.reference_layout``).

The reference's CoLA-M model (``ColaMForCausalLM``, same ``model_type``) saves the same tensors under other names,
split where it recomputes activations (:data:`COLA_M_NAMES`); :func:`plain_reference_names` maps them back.

Embedding row 0: the reference embedding has ``padding_idx=0`` (row 0 starts at zero and never receives a
gradient). Conversion copies row 0 as stored, both ways, so converted logits are exact; megatron and the Hugging
Face code here train it like any other row, because the tokenizers this project trains give id 0 to a real token
(the end-of-document token), and a run continued from reference weights therefore updates it.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

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
            b = list(_take(state, f"{prefix}{slot}.b_weight", "megatron"))
            used.update((f"{prefix}{slot}.a_weight", f"{prefix}{slot}.b_weight"))
            if f"{prefix}{slot}.b_kv_weight" in state:  # grouped-query attention: k and v B's, narrower than q's
                b += list(state[f"{prefix}{slot}.b_kv_weight"])
                used.add(f"{prefix}{slot}.b_kv_weight")
            if a.shape[0] != len(projections) or len(b) != len(projections):
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
            b = [_take(state, n + ".cola_b", "Hugging Face").t() for n in names]
            if any(t.shape != b[0].shape for t in b):  # grouped-query attention: k and v stacked apart from q
                out[f"{prefix}{slot}.b_weight"], out[f"{prefix}{slot}.b_kv_weight"] = b[0][None], torch.stack(b[1:])
            else:
                out[f"{prefix}{slot}.b_weight"] = torch.stack(b)
    _check_no_extra(state, used, "Hugging Face")
    return out


# --------------------------------------------------------------------------------------------------------------
# The reference's two layouts

_LAYER = r"model\.layers\.(?P<layer>\d+)\."
PLAIN_NAMES = [re.compile(p) for p in (
    r"model\.(embed_tokens|norm)\.weight$",
    r"lm_head\.weight$",
    _LAYER + r"(input_layernorm|post_attention_layernorm)\.weight$",
    _LAYER + r"(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj\.cola_[ab]$",
)]
# CoLA-M name (under model.layers.{i}.) → (plain name under model.layers.{i + shift}., shift). The down projection's
# B of layer i is stored with layer i + 1, the last layer's with itself.
COLA_M_NAMES = [(re.compile(_LAYER + pattern + "$"), plain, shift) for pattern, plain, shift in (
    (r"pre_attn\.pre_(?P<p>[qkv])_proj\.cola_a", "self_attn.{p}_proj.cola_a", 0),
    (r"self_attn\.post_(?P<p>[qkv])_proj\.cola_b", "self_attn.{p}_proj.cola_b", 0),
    (r"self_attn\.pre_o_proj\.cola_a", "self_attn.o_proj.cola_a", 0),
    (r"post_attn\.post_o_proj\.cola_b", "self_attn.o_proj.cola_b", 0),
    (r"pre_mlp\.pre_(?P<p>gate|up)_proj\.cola_a", "mlp.{p}_proj.cola_a", 0),
    (r"self_mlp\.post_(?P<p>gate|up)_proj\.cola_b", "mlp.{p}_proj.cola_b", 0),
    (r"self_mlp\.pre_down_proj\.cola_a", "mlp.down_proj.cola_a", 0),
    (r"last_layer_post_mlp\.post_down_proj\.cola_b", "mlp.down_proj.cola_b", -1),
    (r"post_mlp\.post_down_proj\.cola_b", "mlp.down_proj.cola_b", 0),
)]


def plain_reference_names(stored: Iterable[str], source: str = "the checkpoint") -> Tuple[Dict[str, str], str]:
    """``({stored name: plain reference name}, layout)`` with layout ``"CoLA"`` or ``"CoLA-M"``; a name of neither
    layout is refused by name (shapes and layer counts are checked afterwards against the config)."""
    mapping, unknown, cola_m = {}, [], False
    for name in stored:
        if any(p.match(name) for p in PLAIN_NAMES):
            mapping[name] = name
            continue
        for pattern, plain, shift in COLA_M_NAMES:
            match = pattern.match(name)
            if match:
                layer = int(match["layer"]) + shift
                mapping[name] = f"model.layers.{layer}." + plain.format(p=match.groupdict().get("p"))
                cola_m = True
                break
        else:
            unknown.append(name)
    if unknown:
        unknown.sort()
        raise ConversionError(f"{source} holds tensors of neither the reference CoLA nor the CoLA-M layout: "
                              f"{unknown[:8]}{' …' if len(unknown) > 8 else ''}; from-hf reads checkpoints saved by "
                              "the reference implementation (ColaForCausalLM or ColaMForCausalLM) or by to-hf")
    targets: Dict[str, str] = {}
    for name, plain in mapping.items():
        if plain in targets:
            raise ConversionError(f"{source} stores {plain} twice (as {targets[plain]} and {name}): not one "
                                  "consistent CoLA or CoLA-M checkpoint")
        targets[plain] = name
    return mapping, "CoLA-M" if cola_m else "CoLA"


# --------------------------------------------------------------------------------------------------------------
# Configs


REFERENCE_CANNOT_REPRESENT_GQA = ("the reference implementation cannot represent grouped-query attention (its k and v "
                                  "projections have num_attention_heads heads)")


def is_grouped(m: ModelConfig) -> bool:
    return m.num_query_groups not in (None, m.num_attention_heads)


def hf_config_fields(m: ModelConfig, special_ids: Optional[Mapping[str, Optional[int]]] = None,
                     reference_layout: bool = False) -> Dict[str, Any]:
    """``ColaConfig`` keyword arguments for a run's model section; ``reference_layout``: for the reference
    implementation's own code, which has no grouped-query attention."""
    if m.arch != "cola":
        raise ConversionError(f"model.arch is {m.arch!r}: only CoLA models export to the 'cola' Hugging Face format")
    if reference_layout and is_grouped(m):
        raise ConversionError(f"model.num_query_groups={m.num_query_groups} (of {m.num_attention_heads} heads): "
                              f"{REFERENCE_CANNOT_REPRESENT_GQA}. Fix: export without --reference-layout; the "
                              "shipped modeling code loads it")
    ids = dict(special_ids or {})
    return dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.padded_ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
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
# The reference ColaConfig's defaults for the fields its config.json files may omit (its own 350M/1B/7B configs
# leave out only_lr_act, which it defaults to true). The shape fields above (and rank) are always required.
REFERENCE_DEFAULTS = {
    "only_lr_act": True,
    "lr_act_type": "silu",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def is_export(raw: Mapping[str, Any]) -> bool:
    """Whether a config.json is an export's (it names the shipped modeling code), not the reference's own."""
    auto_map = raw.get("auto_map") or {}
    return auto_map.get("AutoModelForCausalLM") == "modeling_cola.ColaForCausalLM"


def reference_defaults_used(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The :data:`REFERENCE_DEFAULTS` a config.json relies on (the fields it omits)."""
    context_given = raw.get("max_position_embeddings") or raw.get("max_sequence_length")
    rope_theta_given = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
    given = dict(raw, max_position_embeddings=context_given, rope_theta=rope_theta_given)
    return {k: v for k, v in REFERENCE_DEFAULTS.items() if given.get(k) is None}


def special_token_ids(raw: Mapping[str, Any]) -> Dict[str, Optional[int]]:
    """bos/eos/pad ids of a config.json, kept when they name a token of the vocabulary (the reference's LLaMA
    configs write pad_token_id=-1, which no embedding row has)."""
    vocab = raw.get("vocab_size") or 0
    ids = {}
    for key in SPECIAL_TOKEN_FIELDS:
        value = raw.get(key)
        if isinstance(value, list):  # transformers allows several eos ids; the first is the end of a document
            value = value[0] if value else None
        ids[key] = value if isinstance(value, int) and 0 <= value < vocab else None
    return ids


def model_section_from_hf(raw: Mapping[str, Any], rank: Optional[int] = None, only_lr_act: Optional[bool] = None,
                          dense: bool = False, source: str = "config.json") -> Dict[str, Any]:
    """The ``model`` section of a run config for a Hugging Face config: a CoLA one, or (``dense=True``, ``rank``
    given) a dense LLaMA one, whose grouped k/v heads and tied embeddings the SVD initialisation expands.

    Accepts the reference implementation's spellings: ``max_sequence_length`` for the context length, and fills
    omitted fields with the reference's defaults (:data:`REFERENCE_DEFAULTS`, e.g. ``only_lr_act`` true).
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
        if heads % kv_heads:
            raise ConversionError(f"{source}: num_key_value_heads {kv_heads} does not divide num_attention_heads "
                                  f"{heads}; each k/v head must serve a whole group of query heads")
        if not is_export(raw):
            raise ConversionError(f"{source} is in the reference implementation's layout but claims grouped-query "
                                  f"attention (num_key_value_heads {kv_heads} of {heads} heads): "
                                  f"{REFERENCE_CANNOT_REPRESENT_GQA}. Fix: use an export of cola-convert "
                                  "to-hf, whose shipped modeling code holds GQA CoLA models")
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
    defaults = REFERENCE_DEFAULTS
    theta = raw.get("rope_theta") or rope.get("rope_theta") or defaults["rope_theta"]
    context = raw.get("max_position_embeddings") or raw.get("max_sequence_length") or defaults["max_position_embeddings"]
    only = raw.get("only_lr_act", defaults["only_lr_act"]) if only_lr_act is None else only_lr_act
    return dict(
        arch="cola",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        ffn_hidden_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=None if dense or kv_heads == heads else kv_heads,
        rank=int(rank),
        only_lr_act=bool(only),
        lr_act=raw.get("lr_act_type") or defaults["lr_act_type"],
        max_position_embeddings=int(context),
        seq_length=min(int(context), ModelConfig().seq_length),
        norm_eps=float(raw.get("rms_norm_eps") or defaults["rms_norm_eps"]),
        rope_theta=float(theta),
        init_std=float(raw.get("initializer_range") or defaults["initializer_range"]),
    )
