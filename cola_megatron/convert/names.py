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
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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


# A dense (LLaMA) layer: megatron slot → the Hugging Face LLaMA projections it fuses. linear_qkv holds, for each
# query group, that group's query heads then its key head then its value head; linear_fc1 is [gate; up].
DENSE_SLOTS = {
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}


@dataclass(frozen=True)
class Unit:
    """One megatron tensor (by its TP=1 state-dict name) and the reference tensors it holds.

    ``kind`` says how they relate: ``same`` (one tensor, unchanged), ``cola`` (CoLA factors: branch i of the fused
    megatron tensor is reference tensor i transposed), ``cat`` (reference tensors stacked along rows, e.g. [gate; up])
    or ``qkv`` (rows grouped per query group: ``groups`` blocks of ``split`` rows, one part per reference tensor).
    """

    megatron: str
    reference: Tuple[str, ...]
    kind: str = "same"
    split: Tuple[int, ...] = ()
    groups: int = 1


def layer_units(m: ModelConfig, i: int) -> List[Unit]:
    """The units of layer ``i`` in writing order."""
    prefix, ref = f"decoder.layers.{i}.", f"model.layers.{i}."
    units = [Unit(prefix + meg, (ref + name,)) for meg, name in LAYER_TENSORS.items()]
    if m.arch == "cola":
        for slot, projections in SLOTS.items():
            a, b = (tuple(f"{ref}{p}.{suffix}" for p in projections) for suffix in ("cola_a", "cola_b"))
            units.append(Unit(f"{prefix}{slot}.a_weight", a, "cola"))
            if slot == "self_attention.linear_qkv" and is_grouped(m):  # k and v B's, narrower, stacked apart
                units += [Unit(f"{prefix}{slot}.b_weight", b[:1], "cola"), Unit(f"{prefix}{slot}.b_kv_weight", b[1:], "cola")]
            else:
                units.append(Unit(f"{prefix}{slot}.b_weight", b, "cola"))
        return units
    head_dim = m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    per_group_q = m.num_attention_heads // groups * head_dim
    for slot, projections in DENSE_SLOTS.items():
        names = tuple(ref + p for p in projections)
        if slot.endswith("linear_qkv.weight"):
            units.append(Unit(prefix + slot, names, "qkv", (per_group_q, head_dim, head_dim), groups))
        else:
            units.append(Unit(prefix + slot, names, "cat" if len(names) > 1 else "same"))
    return units


def unit_groups(m: ModelConfig) -> List[List[Unit]]:
    """Every unit of a model, in the groups conversion streams: each whole-model tensor alone, then one group per
    layer (reading and writing hold one group at a time)."""
    whole = [Unit(meg, (ref,)) for meg, ref in MODEL_TENSORS.items()]
    return [[whole[0]]] + [layer_units(m, i) for i in range(m.num_layers)] + [[u] for u in whole[1:]]


def to_reference(unit: Unit, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The reference tensors of one megatron tensor (contiguous; transposes are fresh copies)."""
    if unit.kind == "same":
        return {unit.reference[0]: tensor}
    if unit.kind == "cola":
        if tensor.shape[0] != len(unit.reference):
            raise ConversionError(f"{unit.megatron} holds {tensor.shape[0]} fused projections, expected "
                                  f"{len(unit.reference)}: not a CoLA checkpoint of this code's layout")
        return {name: transposed(tensor[branch]) for branch, name in enumerate(unit.reference)}
    if unit.kind == "cat":
        return {name: part.contiguous() for name, part in zip(unit.reference, tensor.chunk(len(unit.reference)))}
    per_group = tensor.reshape(unit.groups, sum(unit.split), -1)
    parts = per_group.split(list(unit.split), dim=1)
    return {name: part.reshape(-1, tensor.shape[-1]).contiguous() for name, part in zip(unit.reference, parts)}


_TRANSPOSE_ROWS = 512


def transposed(matrix: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``matrix.t()`` as a contiguous tensor (into ``out`` when given), copied a block of rows at a time: torch's
    strided copy of a whole transposed bf16 matrix of a 7B's size (4096 x 1024) runs at 0.5-2 GB/s on a 2-core x86
    host, blocks of 512 rows, which stay in cache, at about 3 GB/s (the CoLA factors are most of a conversion's bytes)."""
    if out is None:
        out = matrix.new_empty(matrix.shape[1], matrix.shape[0])  # on the meta device too (shapes only)
    for start in range(0, matrix.shape[0], _TRANSPOSE_ROWS):
        out[:, start:start + _TRANSPOSE_ROWS].copy_(matrix[start:start + _TRANSPOSE_ROWS].t())
    return out


def to_megatron(unit: Unit, tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The inverse of :func:`to_reference`: ``tensors`` in the order of ``unit.reference``, written into ``out``
    (the megatron tensor's storage, e.g. a scratch mapping) when given."""
    if unit.kind == "cola":
        if out is None:
            out = tensors[0].new_empty(len(tensors), *tensors[0].shape[::-1])
        for branch, factor in enumerate(tensors):
            transposed(factor, out[branch])
        return out
    if unit.kind == "same":
        fused = tensors[0]
    elif unit.kind == "cat":
        fused = torch.cat(list(tensors))
    else:
        d = tensors[0].shape[-1]
        fused = torch.cat([t.reshape(unit.groups, -1, d) for t in tensors], dim=1).reshape(-1, d)
    return fused if out is None else out.copy_(fused)


def _take(state: Mapping[str, torch.Tensor], name: str, side: str) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"{side} weights have no tensor {name!r}: the checkpoint and its config disagree on "
                              "the model's shape (layers?); convert with the config the weights were trained with")
    return state[name]


def _check_no_extra(state: Mapping[str, Any], used: set, side: str) -> None:
    extra = sorted(k for k in state if k not in used)
    if extra:
        raise ConversionError(f"{side} weights hold tensors the model does not have: {extra[:8]}"
                              f"{' …' if len(extra) > 8 else ''}; is this a checkpoint of the configured shape?")


def _all_units(m: ModelConfig) -> List[Unit]:
    return [u for group in unit_groups(m) for u in group]


def megatron_to_reference(state: Mapping[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """Unsplit megatron state dict → reference-named tensors (whole models in memory: for small models and tests;
    conversion streams :func:`unit_groups`)."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out = {}
    for unit in _all_units(m):
        out.update(to_reference(unit, _take(state, unit.megatron, "megatron")))
    _check_no_extra(state, {u.megatron for u in _all_units(m)}, "megatron")
    return out


def reference_to_megatron(state: Mapping[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """Reference-named tensors → the unsplit megatron state dict (the inverse of :func:`megatron_to_reference`)."""
    units = _all_units(m)
    out = {u.megatron: to_megatron(u, [_take(state, n, "Hugging Face") for n in u.reference]) for u in units}
    _check_no_extra(state, {n for u in units for n in u.reference}, "Hugging Face")
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


def llama_shapes(raw: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """The tensor shapes of a Hugging Face LLaMA of config ``raw`` (tied embeddings: no lm_head)."""
    d, ffn, vocab = raw["hidden_size"], raw["intermediate_size"], raw["vocab_size"]
    heads = raw["num_attention_heads"]
    kv = (raw.get("num_key_value_heads") or heads) * (d // heads)
    io = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
          "self_attn.o_proj": (d, d), "mlp.gate_proj": (ffn, d), "mlp.up_proj": (ffn, d), "mlp.down_proj": (d, ffn)}
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not raw.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        for name, shape in io.items():
            shapes[f"{p}{name}.weight"] = shape
    return shapes


# --------------------------------------------------------------------------------------------------------------
# Configs


REFERENCE_CANNOT_REPRESENT_GQA = ("the reference implementation cannot represent grouped-query attention (its k and v "
                                  "projections have num_attention_heads heads)")


def is_grouped(m: ModelConfig) -> bool:
    return m.num_query_groups not in (None, m.num_attention_heads)


def hf_config_fields(m: ModelConfig, special_ids: Optional[Mapping[str, Optional[int]]] = None,
                     reference_layout: bool = False) -> Dict[str, Any]:
    """``ColaConfig`` keyword arguments for a run's model section (``LlamaConfig`` ones for a dense model);
    ``reference_layout``: for the reference implementation's own code, which has no grouped-query attention."""
    ids = dict(special_ids or {})
    shared = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.padded_ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        initializer_range=m.init_std,
        tie_word_embeddings=False,
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"),
    )
    if m.arch == "dense":
        return dict(shared, head_dim=m.hidden_size // m.num_attention_heads, attention_bias=False, mlp_bias=False,
                    architectures=["LlamaForCausalLM"])
    if reference_layout and is_grouped(m):
        raise ConversionError(f"model.num_query_groups={m.num_query_groups} (of {m.num_attention_heads} heads): "
                              f"{REFERENCE_CANNOT_REPRESENT_GQA}. Fix: export without --reference-layout; the "
                              "shipped modeling code loads it")
    return dict(shared, rank=m.rank, lr_act_type=m.lr_act, only_lr_act=m.only_lr_act,
                architectures=["ColaForCausalLM"])


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
                          dense: bool = False, source: str = "config.json", keep_dense: bool = False
                          ) -> Dict[str, Any]:
    """The ``model`` section of a run config for a Hugging Face config: a CoLA one, or (``dense=True``, ``rank``
    given) a dense LLaMA one, whose grouped k/v heads and tied embeddings the SVD initialisation expands, or
    (``keep_dense=True``) a dense run of the LLaMA's own shape.

    Accepts the reference implementation's spellings: ``max_sequence_length`` for the context length, and fills
    omitted fields with the reference's defaults (:data:`REFERENCE_DEFAULTS`, e.g. ``only_lr_act`` true).
    """
    missing = [k for k in REQUIRED_HF_FIELDS if raw.get(k) is None]
    rank = rank if rank is not None else raw.get("rank")
    if rank is None and not keep_dense:
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
    if keep_dense and raw.get("tie_word_embeddings"):
        raise ConversionError(f"{source} ties the output layer to the embeddings, and dense runs here have an "
                              "untied one. Fix: save lm_head.weight as a tensor of its own (tie_word_embeddings "
                              "false), or use from-dense for a CoLA warm start, which unties it")
    if not dense and not keep_dense and kv_heads != heads:
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
    shared = dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        ffn_hidden_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        max_position_embeddings=int(context),
        seq_length=min(int(context), ModelConfig().seq_length),
        norm_eps=float(raw.get("rms_norm_eps") or defaults["rms_norm_eps"]),
        rope_theta=float(theta),
        init_std=float(raw.get("initializer_range") or defaults["initializer_range"]),
    )
    if keep_dense:
        return dict(shared, arch="dense", num_query_groups=kv_heads if kv_heads != heads else None)
    return dict(shared, arch="cola", num_query_groups=None if dense or kv_heads == heads else kv_heads,
                rank=int(rank), only_lr_act=bool(only), lr_act=raw.get("lr_act_type") or defaults["lr_act_type"])
