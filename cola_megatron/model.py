"""Building the GPTModel from a config, layout-independent initialisation, parameter and FLOP accounting."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from cola_megatron.config import Config, ModelConfig
from cola_megatron.layers.transformer_config import CoLATransformerConfig


def identity(x: torch.Tensor) -> torch.Tensor:
    """The GLU 'activation' of only_lr_act: down(gate(x) * up(x))."""
    return x


def params_dtype(cfg: Config) -> torch.dtype:
    """Parameters live in bf16 only in the reference's pure-bf16 mode; otherwise fp32 (megatron keeps the bf16
    compute copy inside Float16Module and fp32 masters in the optimizer)."""
    return torch.bfloat16 if cfg.train.pure_bf16 else torch.float32


def transformer_config(cfg: Config, use_cpu_initialization: Optional[bool] = None) -> CoLATransformerConfig:
    m, p = cfg.model, cfg.parallel
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
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
        # Interleaved 1F1B with batched p2p sends forward activations and backward gradients to the same peer at
        # PP=2 in one batch, where they pair in posting order and are silently swapped (Megatron-LM #750/#1450).
        # Megatron's split, non-batched exchange keeps the two directions apart.
        overlap_p2p_comm=p.virtual_pipeline is not None,
        batch_p2p_comm=p.virtual_pipeline is None,
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

    from cola_megatron.spec import block_spec

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


# --------------------------------------------------------------------------------------------------------------
# Initialisation that does not depend on TP/PP/VP


def global_parameter_names(model: torch.nn.Module) -> Dict[str, str]:
    """Local parameter name → the name it has in the unsplit model (pipeline stages number layers from 0)."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    offsets = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}." for i, layer in enumerate(layers)}
    names = {}
    for name, _ in model.named_parameters():
        global_name = name
        if name.startswith("decoder.layers."):
            local_prefix = ".".join(name.split(".")[:3]) + "."
            global_name = offsets[local_prefix] + name[len(local_prefix):]
        names[name] = global_name
    return names


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _local_shard(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


@torch.no_grad()
def initialize_parameters(model_chunks: Iterable[torch.nn.Module], seed: int, default_std: float) -> None:
    """Fill every parameter from a generator seeded by (seed, its global name), drawing the full unsplit tensor and
    keeping this rank's shard: one seed gives the same model at every TP/PP/VP layout.

    Vectors (norm weights) are 1; matrices are N(0, std²) with the module's ``init_std`` (CoLA's paper init) or
    ``default_std`` (embeddings, output layer, dense projections).
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    tp_size = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    for chunk in model_chunks:
        names = global_parameter_names(chunk)
        for name, param in chunk.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp_size
            gen = torch.Generator(device=param.device).manual_seed(_seed_for(seed, names[name]))
            std = getattr(param, "init_std", default_std)
            full = torch.empty(shape, dtype=torch.float32, device=param.device).normal_(0.0, std, generator=gen)
            param.copy_(_local_shard(full, param, tp_rank, tp_size))


# --------------------------------------------------------------------------------------------------------------
# Accounting


@dataclass
class ParameterCount:
    embedding: int
    output_layer: int
    per_layer: int
    layers: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.layers + self.final_norm

    @property
    def non_embedding(self) -> int:
        """Parameters that cost matmul FLOPs per token: the blocks and the output layer."""
        return self.total - self.embedding


def _projection_params(m: ModelConfig, d_in: int, d_out: int) -> int:
    return m.rank * (d_in + d_out) if m.arch == "cola" else d_in * d_out


def count_parameters(m: ModelConfig) -> ParameterCount:
    """Exact parameter count from the shapes alone (no allocation; works for 7B on any machine)."""
    d, f = m.hidden_size, m.padded_ffn_hidden_size
    head_dim = d // m.num_attention_heads
    kv = head_dim * (m.num_query_groups or m.num_attention_heads)
    attention = (
        _projection_params(m, d, d) + 2 * _projection_params(m, d, kv) + _projection_params(m, d, d)
    )
    mlp = 2 * _projection_params(m, d, f) + _projection_params(m, f, d)
    per_layer = attention + mlp + 2 * d
    return ParameterCount(
        embedding=m.vocab_size * d,
        output_layer=m.vocab_size * d,
        per_layer=per_layer,
        layers=per_layer * m.num_layers,
        final_norm=d,
    )


def training_flops_per_token(m: ModelConfig, seq_length: Optional[int] = None) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation), torchtitan/PaLM convention:

        6 · N + 12 · L · s · d

    N: parameters of the blocks and the output layer (every weight is used in one multiply-add forward and two
    backward; a CoLA projection of r·(d_in + d_out) weights costs exactly that), L layers, s sequence length,
    d hidden size (attention scores and weighted sum, causal masking not discounted). Recomputation is not model
    FLOPs, so MFU is comparable across recompute modes.
    """
    s = seq_length or m.seq_length
    return 6.0 * count_parameters(m).non_embedding + 12.0 * m.num_layers * s * m.hidden_size


def describe_layout(cfg: Config, world_size: Optional[int] = None) -> List[str]:
    p = cfg.parallel
    lines = [
        f"tensor_parallel={p.tensor_parallel} pipeline_parallel={p.pipeline_parallel} "
        f"virtual_pipeline={p.virtual_pipeline} sequence_parallel={p.sequence_parallel} "
        f"cola_tp_scheme={p.cola_tp_scheme}"
    ]
    if world_size:
        dp = world_size // (p.tensor_parallel * p.pipeline_parallel)
        micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        lines.append(f"world_size={world_size} data_parallel={dp} micro_batches_per_step={micro}")
    return lines
