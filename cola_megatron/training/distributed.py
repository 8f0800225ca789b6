"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) and megatron's model-parallel state."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def initialize_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: Optional[int] = None,
    seed: int = 1234,
    device: str = "auto",
    timeout_minutes: float = 30.0,
) -> torch.device:
    """Initialise torch.distributed from the torchrun environment (a single process when it is absent) and
    megatron's parallel state. On CPU the CUDA bridge is installed first."""
    from megatron.core import parallel_state, tensor_parallel as mp_tensor_parallel

    from cola_megatron.compat import cpu as cpu_bridge

    dev = resolve_device(device)
    if dev.type == "cpu":
        cpu_bridge.install()
    else:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(
            backend="gloo" if dev.type == "cpu" else "nccl",
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
    )
    torch.manual_seed(seed)
    mp_tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dev


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for single-machine process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
