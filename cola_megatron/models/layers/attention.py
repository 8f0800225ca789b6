"""Core attention through torch's scaled_dot_product_attention, and a self-attention that skips the q|k|v
interleaving.

Same call contract as megatron's `DotProductAttention` (query/key/value `[s, b, heads, head_dim]` in, `[s, b,
heads*head_dim]` out), but SDPA never materialises the s×s scores: flash / cuDNN kernels on GPU, the math kernel on
CPU. Causal masking uses SDPA's own `is_causal`, so no mask tensor is built.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from cola_megatron.compat.sdpa import attention_kernels


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not support context parallelism; set parallel.context_parallel=1")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences (THD) are not supported by SDPAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron masks are True where attention is forbidden
        with attention_kernels(q):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


class SeparateQKVSelfAttention(SelfAttention):
    """megatron's SelfAttention (same submodules, parameters and checkpoint keys) taking q, k and v as the
    projection produces them.

    A CoLA q|k|v slot computes q, k and v as three GEMMs; megatron's path would interleave them per head into one
    buffer (a copy) and split it again into views, so the whole buffer stays alive for backward because v, saved
    by the attention core, is a view of it, next to RoPE's copies of q and k. Here the CoLA branches are used as
    they are. With a dense q|k|v GEMM, v is copied out of the interleaved output so that the 3-wide buffer is
    freed after RoPE (one d-wide copy instead of a kept 3d-wide buffer).
    """

    def _separate_qkv(self, key_value_states, output_gate: bool, split_qkv: bool) -> bool:
        return (key_value_states is None and not output_gate and split_qkv
                and self.config.num_query_groups >= self.world_size)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if not self._separate_qkv(key_value_states, output_gate, split_qkv):
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                       split_qkv=split_qkv)
        slot = self.linear_qkv
        if hasattr(slot, "decode_branches"):
            head_dim = self.hidden_size_per_attention_head
            query, key, value = (t.view(*t.shape[:-1], -1, head_dim)
                                 for t in slot.decode_branches(slot.encode(hidden_states)))
            if self.q_layernorm is not None:
                query = self.q_layernorm(query)
            if self.k_layernorm is not None:
                key = self.k_layernorm(key)
            return query, key, value
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states)
        return query, key, value.contiguous()
