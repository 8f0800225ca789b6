"""Initialisation that does not depend on TP/PP/VP: one seed gives the same model at every layout."""

from __future__ import annotations

import zlib
from typing import Dict, Iterable

import torch


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
    ``default_std`` (embeddings, output layer, dense projections); an ``init_std`` tuple gives each slice along
    dim 0 its own std (a fused CoLA A whose branches have different output widths).
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
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            if isinstance(std, tuple):  # one std per branch of a fused CoLA A (q and the narrower k/v under GQA)
                for branch, branch_std in zip(full.unbind(0), std):
                    branch.normal_(0.0, branch_std, generator=gen)
            else:
                full.normal_(0.0, std, generator=gen)
            param.copy_(_local_shard(full, param, tp_rank, tp_size))


