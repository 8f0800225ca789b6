"""Run megatron-core on a machine without CUDA (CPU tensors, gloo collectives).

megatron-core assumes CUDA in a small number of places. Each patch below names the megatron-core (or torch.cuda)
function it bridges and why. `install()` applies them once per process; it is called for work that runs on the CPU
(`training.distributed.initialize_distributed` with a CPU device), whether or not the machine also has a GPU, and
never for work on a GPU. Call it before building models or process groups.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_installed = False

# CPU tensor type names as megatron's optimizer and grad-clipping checks expect them (`param.type() == ...`).
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # megatron passes torch.cuda.current_device() results around
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU.

    Bridges the hard-coded `device="cuda"` tensors in `pipeline_parallel.schedules` (`total_num_tokens`), scattered
    `.cuda()` / `.to("cuda")` calls (DDP buffers, p2p communication, grad clipping), and makes `Tensor.type()` report
    CUDA names for CPU float tensors (`optimizer.clip_grads`, `DistributedOptimizer` param-type checks).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to:
            if _is_cuda_device(kwargs.get("device")):
                kwargs = dict(kwargs, device="cpu")
            # Tensor.to(device, dtype, non_blocking, copy): only the first argument after self can be a device.
            if len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
        elif _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for `torch.cuda.current_stream()` (DDP `start_grad_sync`, p2p communication)."""

    def synchronize(self):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()


class _NullEvent:
    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _patch_torch_cuda():
    """torch.cuda entry points megatron-core calls unconditionally."""
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")  # rotary `inv_freq.to(device=...)`, p2p buffers
    cuda.synchronize = lambda *a, **k: None  # p2p communication, timers, DDP
    cuda.current_stream = lambda *a, **k: _NullStream()  # DDP (0.19.x `start_grad_sync`)
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Event = lambda *a, **k: _NullEvent()
    # `tensor_parallel.random.CheckpointFunction` and the RNG tracker read/write the "CUDA" generator directly.
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state


def _patch_rng_tracker():
    """Back megatron's model-parallel RNG tracker with the CPU generator.

    Bridges `tensor_parallel.random._get_cuda_rng_state`, `_set_cuda_rng_state` and `CudaRNGStatesTracker.add`
    (used by `model_parallel_cuda_manual_seed` and every dropout/recompute fork).
    """
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mp_random.CudaRNGStatesTracker.add = add
    # `CudaRNGStatesTracker.fork` warns when the CPU generator moved inside a fork; here the forked "CUDA" generator
    # is the CPU one, so the warning fires on every fork and means nothing.
    import logging

    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)


def _patch_checkpoint_without_output():
    """`tensor_parallel.random.CheckpointWithoutOutput.__init__` stores `fp8 is not None`, so fp8=False turns
    Transformer Engine's FP8 path on and fails without TE. Store `bool(fp8)`."""
    from megatron.core.tensor_parallel import random as mp_random

    cls = mp_random.CheckpointWithoutOutput
    original_init = cls.__init__

    def __init__(self, fp8=False, *args, **kwargs):
        original_init(self, fp8, *args, **kwargs)
        self.fp8 = bool(fp8)

    cls.__init__ = __init__


def _patch_default_causal_mask():
    """`transformer.utils.get_default_causal_mask` builds its mask with `device="cuda"` (used by the local fused
    softmax when no mask is passed). Build it on CPU."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=8)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def stub_triton_consumers():
    """megatron-core 0.19.x imports triton at import time in `transformer/moe/ops/paged_stash.py`; CPU builds of
    torch ship no triton. Register a placeholder for that one module (a fake top-level `triton` would break
    torch._inductor). Harmless on releases without that module."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.modules.setdefault(name, types.ModuleType(name))


def installed() -> bool:
    """Whether this process runs megatron-core on the CPU through the bridge."""
    return _installed


def install() -> bool:
    """Apply the bridge: this process's megatron-core work runs on the CPU. Chosen by the device the work runs on,
    not by whether CUDA is available: CPU tools (resharding, the comm report, ``gpu_check --cpu``, the tests) also
    run on GPU machines, where an unpatched megatron-core would place tensors on ``cuda:0`` beside CPU ones.
    Returns True (kept for callers that read it)."""
    global _installed
    if _installed:
        return True
    stub_triton_consumers()
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_checkpoint_without_output()
    _patch_default_causal_mask()
    # A process-wide mode: pushed once and never popped, so every later torch call is covered.
    _CudaToCpuMode().__enter__()
    _installed = True
    return True
