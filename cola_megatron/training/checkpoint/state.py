"""What goes into a checkpoint's sharded state dict: model chunks, optimizer, RNG states, the layout.

``model`` (``model0``, ``model1``, ... with virtual pipelining) holds each chunk's ``GPTModel.sharded_state_dict()``;
its tensor keys are megatron's global keys (e.g. ``decoder.layers.self_attention.linear_qkv.a_weight``, layers
stacked along a leading axis), so any layout loads them. ``optimizer`` is the megatron optimizer's sharded state (the
distributed optimizer in its ``fully_reshardable`` form). ``rng_state`` holds every rank's RNG states, restored only
at the same layout.
"""

from __future__ import annotations

import random
from typing import Dict, List

import numpy as np
import torch

from cola_megatron.config import Config

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrapped(model_chunks):
    """GPTModels under DDP / Float16Module: their sharded keys do not depend on precision or wrapping."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def _model_keys(n_chunks: int) -> List[str]:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def model_sharded_state_dict(model_chunks) -> Dict[str, dict]:
    chunks = _unwrapped(model_chunks)
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}


def load_model_state(model_chunks, loaded: Dict[str, dict]) -> None:
    chunks = _unwrapped(model_chunks)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        chunk.load_state_dict(loaded[key], strict=True)


def optimizer_kind(cfg: Config) -> str:
    """Which of megatron's optimizers holds the state: their state is named differently."""
    if cfg.parallel.use_distributed_optimizer:
        return "distributed"
    return "mixed-precision" if cfg.train.mixed_precision else "fp32"


def current_layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "vp": vp or 1}


def rng_sharded_object(state=None):
    """Every rank's RNG states as one ShardedObject indexed by (pp, tp, dp) rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = current_layout()
    shape = (layout["pp"], layout["tp"], layout["dp"])
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_initialized():  # this process uses the GPU (not CPU work on a machine that has one)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_initialized() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def load_model_weights(ckpt_dir: str, model_chunks) -> None:
    """Load only the model weights of a checkpoint into ``model_chunks`` (any layout; megatron's parallel state
    must be initialised for the chunks' layout)."""
    from megatron.core import dist_checkpointing

    from cola_megatron.training.checkpoint.paths import resolve_checkpoint

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), ckpt_dir)
    load_model_state(model_chunks, loaded)
