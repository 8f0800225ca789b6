"""Building megatron's GPTModel from a config: the TransformerConfig translation and one model chunk per stage."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from cola_megatron.compat.megatron import pipeline_p2p_flags
from cola_megatron.config import Config
from cola_megatron.models.layers.ops import identity
from cola_megatron.models.layers.transformer_config import CoLATransformerConfig


def params_dtype(cfg: Config) -> torch.dtype:
    """Parameters live in bf16 only in the reference's pure-bf16 mode; otherwise fp32 (megatron keeps the bf16
    compute copy inside Float16Module and fp32 masters in the optimizer)."""
    return torch.bfloat16 if cfg.train.pure_bf16 else torch.float32


def transformer_config(cfg: Config, use_cpu_initialization: Optional[bool] = None) -> CoLATransformerConfig:
    m, p = cfg.model, cfg.parallel
    if use_cpu_initialization is None:  # CPU work (the bridge installed) also on a machine that has a GPU
        from cola_megatron.compat import cpu as cpu_bridge

        use_cpu_initialization = cpu_bridge.installed() or not torch.cuda.is_available()
    recompute = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
    return CoLATransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.padded_ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=identity if (m.arch == "cola" and m.only_lr_act) else F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_std,
        # initialize_parameters() overwrites every weight (layout-independently) afterwards, but megatron's layers
        # only set their tensor-parallel attributes while initialising, so it must stay on.
        perform_initialization=True,
        use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        bf16=cfg.train.precision == "bf16",
        fp16=cfg.train.precision == "fp16",
        params_dtype=params_dtype(cfg),
        pipeline_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32),
        autocast_dtype=None,
        # Fusions that need Transformer Engine or apex stay off; megatron enables TE/apex paths itself when present.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **pipeline_p2p_flags(p.virtual_pipeline),
        cola_rank=m.rank if m.arch == "cola" else 0,
        cola_tp_scheme=p.cola_tp_scheme,
        cola_init_std=m.cola_init_std,
        cola_recompute=m.recompute,
        **recompute.get(m.recompute, {}),
    )


def build_model(
    cfg: Config,
    tconfig: Optional[CoLATransformerConfig] = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
):
    """One model chunk (a pipeline stage, or one virtual stage of it) as a megatron GPTModel."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from cola_megatron.models.spec import block_spec

    tconfig = tconfig or transformer_config(cfg)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    spec = block_spec(tconfig, cfg.model.arch, cfg.model.attention, vp_stage=vp_stage, pp_rank=pp_rank)
    m = cfg.model
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta),
        vp_stage=vp_stage,
    )
