"""Workarounds for megatron-core behaviour, each naming the versions it was found on and what it covers.

Found on megatron-core 0.16.1 with torch 2.13; each one is harmless where the behaviour is already fixed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch


def pipeline_p2p_flags(virtual_pipeline: Optional[int]) -> Dict[str, bool]:
    """TransformerConfig p2p flags for the pipeline schedules.

    Interleaved 1F1B with batched p2p sends forward activations and backward gradients to the same peer at PP=2 in
    one batch, where they pair in posting order and are silently swapped (Megatron-LM issues #750 and #1450; seen
    on 0.16.1). Megatron's split, non-batched exchange keeps the two directions apart."""
    interleaved = virtual_pipeline is not None
    return {"overlap_p2p_comm": interleaved, "batch_p2p_comm": not interleaved}


def _inner_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield opt.optimizer


def populate_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state, but megatron's ``sharded_state_dict(is_loading=True)`` reads it (0.16.1's
    distributed optimizer asserts on ``step``). Zeros are placeholders that the load overwrites."""
    for inner in _inner_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` for a loaded sharded state, with two fixes for torch's Adam (no apex/TE fused
    Adam, e.g. on CPU):

    - megatron-core 0.16.1's ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` drops ``step``
      before calling ``_set_main_param_and_optimizer_states``, which then fails with ``KeyError: 'step'``. For this
      call only, that method keeps the existing ``step`` (already set from the checkpoint's param groups).
    - ``DistributedOptimizer.load_state_dict`` gives every parameter the *same* ``step`` tensor; torch's Adam
      increments each parameter's step in place, so a shared one would advance once per parameter per step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            original = opt._set_main_param_and_optimizer_states

            def keep_step(model_param, tensors, _opt=opt, _original=original):
                current = _opt._get_main_param_and_optimizer_states(model_param)
                if "step" in current and "step" not in tensors:
                    tensors = {**tensors, "step": current["step"]}
                _original(model_param, tensors)

            opt._set_main_param_and_optimizer_states = keep_step
            patched.append(opt)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def batched_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """A drop-in for ``amp_C.multi_tensor_l2norm`` (as called by megatron's ``get_grad_norm_fp32``): the L2 norm of
    all tensors of ``tensor_lists[0]`` together, as a one-element fp32 tensor on their device, without a host sync.

    megatron-core's fallback without apex or Transformer Engine (``utils.local_multi_tensor_l2_norm``, 0.16.1)
    builds a host tensor from one device scalar per tensor (``torch.tensor(l2)``): a device-to-host sync per
    parameter tensor in every step. Here the per-tensor norms come from one ``torch._foreach_norm`` (fp32
    accumulation) and their norm stays on the device; ``get_grad_norm_fp32``'s own ``.item()`` after its
    all-reduce is the step's one sync."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def use_batched_grad_norm() -> bool:
    """Give megatron's gradient norm :func:`batched_l2_norm` where it fell back to its per-tensor local version
    (no apex/TE). Where apex or Transformer Engine is installed, their fused ``multi_tensor_l2norm`` is kept.
    Returns whether the fallback was replaced (now or before)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    current = getattr(clip_grads, "l2_norm_impl", None)
    if current is batched_l2_norm:
        return True
    if current is None or current is not getattr(utils, "local_multi_tensor_l2_norm", None):
        return False
    clip_grads.l2_norm_impl = batched_l2_norm
    return True


@torch.no_grad()
def step_if_finite(optimizer, clip: float, bf16_grads: bool = False):
    """megatron's optimizer step in its stages, not applied when the gradient norm is NaN/inf: 0.16.1's fp32 and
    bf16 optimizers (no loss scaler) apply such a step, only fp16's loss scaler checks. The norm is always
    computed (megatron skips it at clip_grad=0), so it can be checked and logged. Clipping is megatron's, except
    for bf16 gradients (pure-bf16 training): 0.16.1's ``clip_grad_by_total_norm_fp32`` accepts fp32 gradients
    only, and torch's AdamW refuses fp32 gradients for bf16 weights, so those are scaled here. Returns (update applied, gradient norm or None when the
    fp16 loss scaler rejected the step)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():
        return False, None
    norm = float(optimizer.get_grad_norm())
    if not math.isfinite(norm):
        return False, norm
    if clip > 0 and bf16_grads:
        if norm > clip:
            grads = [param.grad for param in optimizer.get_parameters() if param.grad is not None]
            torch._foreach_mul_(grads, clip / (norm + 1e-6))
    elif clip > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=clip, total_norm=norm, use_decoupled_grad=getattr(
                    opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))
    return optimizer.step_with_ready_grads(), norm


@contextlib.contextmanager
def plain_process_rank():
    """megatron-core 0.16.1's ``BlendedDataset`` asks ``torch.distributed.get_rank()`` when it writes its cache,
    even in a process without a process group (e.g. ``cola-preprocess`` checks); answer rank 0 there."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def _not_unknown_mlp_notice(record) -> bool:
    """megatron logs "Unknown MLP type" for every layer whose MLP is not one of its own classes (found on 0.16.1):
    GLUMLP is meant to be built with the default process groups, as it then is."""
    return not str(record.msg).startswith("Unknown MLP type")


def quiet_known_mlp_notice() -> None:
    import logging

    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _not_unknown_mlp_notice not in logger.filters:
        logger.addFilter(_not_unknown_mlp_notice)
