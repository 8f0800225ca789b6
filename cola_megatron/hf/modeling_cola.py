"""Hugging Face model code for CoLA language models (arXiv 2502.10940).

A LLaMA decoder in which every q, k, v, o, gate, up and down projection is a low-rank bottleneck
``y = silu(x @ cola_a) @ cola_b`` with ``cola_a: (d_in, r)`` and ``cola_b: (r, d_out)``. Embeddings, the untied
``lm_head`` and the RMSNorms stay dense. ``num_key_value_heads`` below ``num_attention_heads`` is grouped-query
attention: k and v have that many heads (``cola_b`` of k and v is ``(r, num_key_value_heads · head_dim)``), the KV
cache holds only those, and each serves ``num_attention_heads / num_key_value_heads`` consecutive query heads.

This file is shipped verbatim next to exported weights and loaded with ``trust_remote_code=True``, so it may only
import torch and transformers.

Conventions:
- RoPE is the Hugging Face LLaMA one: theta from the config, ``rotate_half`` over the two non-interleaved halves of
  each head.
- Attention follows ``config._attn_implementation``: ``"sdpa"`` (the default) is
  ``torch.nn.functional.scaled_dot_product_attention``, ``"eager"`` writes the softmax out and is the one path that
  can return attention weights (``output_attentions=True``). A 2-D ``attention_mask`` (1 = token, 0 = padding) is
  honoured, so left-padded batches generate correctly; positions are then counted from the first real token of
  each row.
- ``output_hidden_states=True`` returns the embeddings, every layer's output and the final normed states.
- Gradient checkpointing (``gradient_checkpointing_enable()``) recomputes each decoder layer in the backward pass.
- The loss is next-token cross-entropy; given ``num_items_in_batch`` (as the Trainer passes under gradient
  accumulation) it is the sum over this batch's targets divided by that count, so accumulated micro-batches give the
  loss and gradients of one large batch.
- PEFT: the projections are not ``nn.Linear`` (each is two matrices around a SiLU), so LoRA attaches to the
  matrices themselves with ``LoraConfig(target_parameters=["cola_a", "cola_b"], target_modules=[])``
  (peft >= 0.17); ``target_modules=["q_proj", ...]`` and ``"all-linear"`` find no linear layer to wrap.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_cola import ColaConfig

# The outputs' cache field: `cache` from transformers 5.2 on (which warns about the older name), `past_key_values`
# before.
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class ColaProjection(nn.Module):
    """``y = silu(x @ cola_a) @ cola_b``: a bias-free low-rank auto-encoder replacing one dense projection."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.cola_a = nn.Parameter(torch.empty(in_features, rank))
        self.cola_b = nn.Parameter(torch.empty(rank, out_features))

    @property
    def init_std(self):
        # Keeps the variance of B·σ(A·x) close to that of a dense layer (CoLA paper, section 3).
        return (self.rank * (self.in_features + self.out_features)) ** -0.25

    def forward(self, x):
        return F.silu(x @ self.cola_a) @ self.cola_b

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class ColaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables of shape (batch, seq, head_dim), the two halves repeated as in HF LLaMA."""
    # Recomputed per call (cheap) instead of a buffer, so loading on the meta device needs no buffer init.
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def sdpa_mask(attention_mask, q_len, kv_len, device):
    """Returns ``(attn_mask, is_causal)`` for scaled_dot_product_attention.

    The queries are the last ``q_len`` of ``kv_len`` positions (earlier ones come from the KV cache).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False  # already a full (batch, 1, q, kv) mask
    padded = attention_mask is not None and not bool(attention_mask.all())
    past = kv_len - q_len
    if not padded:
        if q_len == 1:
            return None, False
        if past == 0:
            return None, True
    query_pos = torch.arange(past, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = key_pos <= query_pos
    if padded:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but cache + input have {kv_len}; "
                "pass a mask over the cached and the new tokens."
            )
        allowed = allowed & attention_mask[:, None, None, :].bool()
        # A query on a padding position would see no key and SDPA would return NaN, which then leaks into real
        # tokens through 0 * NaN. Letting it see itself keeps it finite; no real token attends to it.
        allowed = allowed | (key_pos == query_pos)
    return allowed, False


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def eager_attention(q, k, v, attn_mask, is_causal):
    """Softmax attention written out, returning ``(output, weights)``; masks as for ``sdpa_mask``."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v, weights


def repeat_kv(x, times):
    """(batch, groups, seq, head_dim) → (batch, groups · times, seq, head_dim): each k/v head serves ``times``
    consecutive query heads (grouped-query attention, as in Hugging Face LLaMA)."""
    if times == 1:
        return x
    batch, groups, seq, head_dim = x.shape
    return x[:, :, None].expand(batch, groups, times, seq, head_dim).reshape(batch, groups * times, seq, head_dim)


class ColaAttention(nn.Module):
    """Self-attention with ``num_key_value_heads`` k/v heads (grouped-query attention when fewer than the query
    heads): k and v are ``num_key_value_heads · head_dim`` wide, each still a CoLA bottleneck, and the KV cache
    holds only those heads; they are repeated for the query heads after the cache."""

    def __init__(self, config, layer_idx):
        super().__init__()
        d, r = config.hidden_size, config.rank
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = d // config.num_attention_heads
        kv = self.num_key_value_heads * self.head_dim
        self.q_proj = ColaProjection(d, d, r)
        self.k_proj = ColaProjection(d, kv, r)
        self.v_proj = ColaProjection(d, kv, r)
        self.o_proj = ColaProjection(d, d, r)

    def forward(self, hidden_states, cos, sin, attn_mask, is_causal, past_key_values=None, output_attentions=False):
        batch, seq, _ = hidden_states.shape

        def heads(x, count):
            return x.view(batch, seq, count, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(hidden_states), self.num_heads), cos, sin)
        k = apply_rotary(heads(self.k_proj(hidden_states), self.num_key_value_heads), cos, sin)
        v = heads(self.v_proj(hidden_states), self.num_key_value_heads)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k, v = (repeat_kv(t, self.num_heads // self.num_key_value_heads) for t in (k, v))
        # Read at call time, so set_attn_implementation() after loading takes effect.
        implementation = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {implementation!r} is not supported by CoLA models; use one of "
                             f"{ATTENTION_IMPLEMENTATIONS}.")
        weights = None
        if implementation == "eager":
            out, weights = eager_attention(q, k, v, attn_mask, is_causal)
        elif output_attentions:
            raise ValueError("output_attentions=True needs the eager attention path: load the model with "
                             "attn_implementation=\"eager\".")
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), weights


class ColaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, ffn, r = config.hidden_size, config.intermediate_size, config.rank
        self.only_lr_act = config.only_lr_act
        self.gate_proj = ColaProjection(d, ffn, r)
        self.up_proj = ColaProjection(d, ffn, r)
        self.down_proj = ColaProjection(ffn, d, r)

    def forward(self, x):
        gate = self.gate_proj(x)
        if not self.only_lr_act:
            gate = F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class ColaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = ColaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ColaAttention(config, layer_idx)
        self.post_attention_layernorm = ColaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ColaMLP(config)

    def forward(self, hidden_states, cos, sin, attn_mask, is_causal, past_key_values=None, output_attentions=False):
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attn_mask, is_causal, past_key_values, output_attentions
        )
        h = hidden_states + attn_out
        return h + self.mlp(self.post_attention_layernorm(h)), weights


class ColaPreTrainedModel(PreTrainedModel):
    config_class = ColaConfig
    base_model_prefix = "model"
    _no_split_modules = ["ColaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _supports_cache_class = True
    _supports_static_cache = False

    def _init_weights(self, module):
        # nn.init.* is looked up at call time: transformers swaps in versions that skip already-loaded tensors.
        if isinstance(module, ColaProjection):
            nn.init.normal_(module.cola_a, mean=0.0, std=module.init_std)
            nn.init.normal_(module.cola_b, mean=0.0, std=module.init_std)
        elif isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ColaRMSNorm):
            nn.init.ones_(module.weight)


class ColaModel(ColaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ColaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ColaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False  # the flag gradient_checkpointing_enable() sets
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        if past_key_values is None:
            past_key_values = cache  # the name transformers >= 5.2 uses
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        output_attentions = bool(
            self.config.output_attentions if output_attentions is None else output_attentions
        )
        output_hidden_states = bool(
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
            use_cache = False  # a cache filled inside recomputed layers would hold every layer twice
        past_key_values = _as_cache(past_key_values) if use_cache or past_key_values is not None else None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()

        q_len = inputs_embeds.shape[1]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        kv_len = past_len + q_len
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = _position_ids(attention_mask, past_len, q_len, device)
        attn_mask, is_causal = sdpa_mask(attention_mask, q_len, kv_len, device)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden_states, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            args = (hidden_states, cos, sin, attn_mask, is_causal, past_key_values, output_attentions)
            if checkpointing:
                hidden_states, weights = self._gradient_checkpointing_func(layer.__call__, *args)
            else:
                hidden_states, weights = layer(*args)
            if output_attentions:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if _wants_dict(self.config, return_dict) else output.to_tuple()


class ColaForCausalLM(ColaPreTrainedModel, GenerationMixin):
    # Tells the Trainer the loss honours num_items_in_batch, so it does not divide by the accumulation steps again.
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        self.model = ColaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        cache=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, num_items_in_batch)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if _wants_dict(self.config, return_dict) else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        if "cache" in kwargs or "next_sequence_length" in kwargs:
            # transformers >= 5.2 passes the cache as `cache` and slices by `next_sequence_length`: its generic
            # preparation fits this model (forward takes `cache`).
            return super().prepare_inputs_for_generation(
                input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs
            )
        # Earlier releases: written out, as their generic preparation differs from one release to the next.
        past_len = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        total = _sequence_length(input_ids, attention_mask, kwargs.get("cache_position"))
        model_inputs = {
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }
        if inputs_embeds is not None and past_len < inputs_embeds.shape[1]:
            # The prompt was given as embeddings and is not cached yet (every step without a cache): the
            # embeddings, then the tokens generated so far, which are the last ids.
            generated = total - inputs_embeds.shape[1]
            embeds = inputs_embeds[:, past_len:]
            if generated > 0:
                new = self.get_input_embeddings()(input_ids[:, -generated:]).to(embeds.dtype)
                embeds = torch.cat([embeds, new], dim=1)
            model_inputs["inputs_embeds"] = embeds
        else:
            model_inputs["input_ids"] = input_ids[:, input_ids.shape[1] - (total - past_len):].contiguous()
        return model_inputs


def next_token_loss(logits, labels, num_items_in_batch=None):
    """Position t predicts ``labels[t + 1]``; -100 marks ignored targets. The mean over this batch's targets, or,
    given ``num_items_in_batch`` (the targets of all accumulated micro-batches), their sum divided by it."""
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=-100,
        reduction="mean" if num_items_in_batch is None else "sum",
    )
    if num_items_in_batch is None:
        return losses
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses / num_items_in_batch


def _sequence_length(input_ids, attention_mask, cache_position):
    """Positions so far (cached and new), which generation tracks in cache_position and the attention mask."""
    if cache_position is not None:
        return int(cache_position[-1]) + 1
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.shape[1]
    return input_ids.shape[1]


def _as_cache(past_key_values):
    if past_key_values is None or isinstance(past_key_values, Cache):
        return past_key_values
    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(past_key_values)
    raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache), not legacy tuples.")


def _position_ids(attention_mask, past_len, q_len, device):
    if attention_mask is not None and attention_mask.dim() == 2:
        # Count positions from each row's first real token, so left padding does not shift RoPE.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:].to(device)
    return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)


def _wants_dict(config, return_dict):
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


def expected_parameter_shapes(config):
    """Every parameter name of ``ColaForCausalLM`` with its shape: the contract an exported state dict must meet."""
    d, ffn, r = config.hidden_size, config.intermediate_size, config.rank
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    io = {
        "self_attn.q_proj": (d, d),
        "self_attn.k_proj": (d, kv),
        "self_attn.v_proj": (d, kv),
        "self_attn.o_proj": (d, d),
        "mlp.gate_proj": (d, ffn),
        "mlp.up_proj": (d, ffn),
        "mlp.down_proj": (ffn, d),
    }
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (d,)
        shapes[prefix + "post_attention_layernorm.weight"] = (d,)
        for name, (d_in, d_out) in io.items():
            shapes[f"{prefix}{name}.cola_a"] = (d_in, r)
            shapes[f"{prefix}{name}.cola_b"] = (r, d_out)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def load_cola_state_dict(model, state_dict):
    """Loads a state dict with the reference CoLA names into ``model``, naming every missing, unexpected or
    mis-shaped tensor in one error before anything is copied."""
    expected = expected_parameter_shapes(model.config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{name}: got {tuple(state_dict[name].shape)}, expected {expected[name]}"
        for name in expected
        if name in state_dict and tuple(state_dict[name].shape) != expected[name]
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing: {missing}")
        if unexpected:
            problems.append(f"unexpected: {unexpected}")
        if misshaped:
            problems.append(f"wrong shape: {misshaped}")
        raise ValueError(
            "state dict does not match the CoLA model built from this config ("
            + "; ".join(problems)
            + "). Check that the config (hidden_size, intermediate_size, rank, layers, vocab_size, "
            "num_key_value_heads) is the "
            "checkpoint's and that cola_a is stored as (d_in, r), cola_b as (r, d_out)."
        )
    model.load_state_dict(state_dict, strict=True)
    return model


# save_pretrained copies this file and configuration_cola.py next to the weights and writes the auto_map, so a saved
# copy loads again with trust_remote_code=True.
ColaModel.register_for_auto_class("AutoModel")
ColaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ColaConfig",
    "ColaProjection",
    "ColaModel",
    "ColaForCausalLM",
    "ColaPreTrainedModel",
    "expected_parameter_shapes",
    "load_cola_state_dict",
]
