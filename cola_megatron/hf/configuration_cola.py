"""Hugging Face configuration for CoLA language models.

This file is shipped verbatim next to exported weights and loaded with ``trust_remote_code=True``, so it may only
import transformers.
"""

from transformers import PretrainedConfig

# Written into every saved config.json so `AutoConfig` / `AutoModelForCausalLM` find the shipped files.
COLA_AUTO_MAP = {
    "AutoConfig": "configuration_cola.ColaConfig",
    "AutoModel": "modeling_cola.ColaModel",
    "AutoModelForCausalLM": "modeling_cola.ColaForCausalLM",
}

SUPPORTED_LR_ACT_TYPES = ("silu",)


class ColaConfig(PretrainedConfig):
    """A LLaMA decoder whose seven projections per block are CoLA bottlenecks ``y = B · silu(A · x)``.

    ``num_key_value_heads`` (default: ``num_attention_heads``) below the heads is grouped-query attention.

    CoLA-specific fields:
        rank: bottleneck width r of every projection.
        lr_act_type: the bottleneck non-linearity; only ``"silu"``.
        only_lr_act: if true (the reference implementation's default, kept so that its config.json files, which
            omit the key, mean the same here) the MLP is ``down(gate(x) * up(x))`` (the bottleneck SiLUs are the
            only non-linearities); if false it is ``down(SiLU(gate(x)) * up(x))``.
    """

    model_type = "cola"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=None,
        rank=128,
        lr_act_type="silu",
        only_lr_act=True,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.02,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        _validate(
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            rank=rank,
            lr_act_type=lr_act_type,
            hidden_act=hidden_act,
            tie_word_embeddings=tie_word_embeddings,
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rank = rank
        self.lr_act_type = lr_act_type
        self.only_lr_act = bool(only_lr_act)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Derived, not a free parameter: a head_dim in an older config.json is recomputed.
        kwargs.pop("head_dim", None)
        self.head_dim = hidden_size // num_attention_heads
        kwargs.setdefault("auto_map", dict(COLA_AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def _validate(
    *, hidden_size, num_attention_heads, num_key_value_heads, rank, lr_act_type, hidden_act, tie_word_embeddings
):
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
        )
    if not isinstance(num_key_value_heads, int) or num_key_value_heads <= 0 or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads ({num_key_value_heads}) must be a positive divisor of num_attention_heads "
            f"({num_attention_heads}): each k/v head serves a group of query heads."
        )
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if lr_act_type not in SUPPORTED_LR_ACT_TYPES:
        raise ValueError(f"lr_act_type {lr_act_type!r} is not supported; use one of {SUPPORTED_LR_ACT_TYPES}.")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; CoLA's gated MLP uses 'silu'.")
    if tie_word_embeddings:
        raise ValueError("CoLA models have an untied lm_head: set tie_word_embeddings=False.")


# save_pretrained copies this file next to the config and records it in the auto_map.
ColaConfig.register_for_auto_class()
