"""megatron-core ModuleSpecs for CoLA and for the dense LLaMA baseline.

Both use the same local-backend kernels (our RMSNorm, SDPA core attention, megatron's bias-dropout-add), so a
benchmark between them compares the projections and nothing else.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from cola_megatron.compat.megatron import quiet_known_mlp_notice
from cola_megatron.models.layers.attention import SDPAttention, SeparateQKVSelfAttention
from cola_megatron.models.layers.cola import CoLAFC1, CoLAFC2, CoLAProj, CoLAQKV
from cola_megatron.models.layers.norm import RMSNorm
from cola_megatron.models.layers.cola_m import CoLAMTransformerLayer
from cola_megatron.models.layers.mlp import GLUMLP

CORE_ATTENTION = {"sdpa": SDPAttention, "megatron": DotProductAttention}
# megatron's SelfAttention and MLP with the q|k|v and GLU paths that store less (same parameters and keys).
SELF_ATTENTION, MLP_MODULE = SeparateQKVSelfAttention, GLUMLP
quiet_known_mlp_notice()


def layer_spec(arch: str = "cola", attention: str = "sdpa", recompute: str = "none") -> ModuleSpec:
    """A LLaMA transformer layer; ``arch='cola'`` puts CoLA modules in the four linear slots, ``recompute='cola_m'``
    makes it a CoLA-M layer (same submodules and parameters, less stored for backward)."""
    if arch == "cola":
        qkv, proj, fc1, fc2 = CoLAQKV, CoLAProj, CoLAFC1, CoLAFC2
    elif arch == "dense":
        qkv, proj, fc1, fc2 = ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear
    else:
        raise ValueError(f"unknown arch {arch!r}: use 'cola' or 'dense'")
    if recompute == "cola_m" and arch != "cola":
        raise ValueError("model.recompute=cola_m needs model.arch=cola; use recompute=full or none")
    return ModuleSpec(
        module=CoLAMTransformerLayer if recompute == "cola_m" else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SELF_ATTENTION,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=CORE_ATTENTION[attention],
                    linear_proj=proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP_MODULE, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config, arch: str = "cola", attention: str = "sdpa", vp_stage=None, pp_rank=None):
    """The layers this pipeline stage (and virtual stage) builds, and the final RMSNorm."""
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    spec = layer_spec(arch, attention, getattr(config, "cola_recompute", "none"))
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)
