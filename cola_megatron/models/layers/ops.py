"""Autograd ops that save for backward only what their backward needs.

``silu_linear(z, B) = B · σ(z)`` saves z and rebuilds σ(z) in backward (one elementwise op) instead of keeping
both z (σ's input) and σ(z) (the GEMM's input); the autograd graph is otherwise the plain composition's, so
gradients are computed in the same order. ``glu(gate, up)`` is the GLU product ``act(gate) · up`` saving
gate and up, not also act(gate) (and no ``up + 0`` copy, as megatron's unfused GLU makes). Both compute the
same values and gradients with the same kernels as the plain compositions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity(x: torch.Tensor) -> torch.Tensor:
    """The GLU 'activation' of only_lr_act: down(gate(x) * up(x))."""
    return x


class _LinearOfSiLU(torch.autograd.Function):
    """``F.linear(a, weight)`` for ``a = σ(z)``: saves z (which σ's own backward keeps anyway) instead of a."""

    @staticmethod
    def forward(ctx, activated, weight, z):
        ctx.save_for_backward(z, weight)
        return F.linear(activated, weight)

    @staticmethod
    def backward(ctx, grad):
        z, weight = ctx.saved_tensors
        grad_activated = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_activated = grad.matmul(weight)
        if ctx.needs_input_grad[1]:
            activated = F.silu(z)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(activated.reshape(-1, activated.shape[-1]))
        return grad_activated, grad_weight, None


def linear_of_silu(activated: torch.Tensor, weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``F.linear(activated, weight)`` where ``activated`` holds σ(z) (after any communication that only moves
    it), storing z for backward instead of activated."""
    return _LinearOfSiLU.apply(activated, weight, z)


def silu_linear(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.silu(z), weight)``, storing z only (σ's backward and the GEMM's share it)."""
    return linear_of_silu(F.silu(z), weight, z)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, silu: bool):
        ctx.save_for_backward(gate, up)
        ctx.silu = silu
        return (F.silu(gate) if silu else gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            if ctx.silu:
                grad_gate = torch.ops.aten.silu_backward(grad_gate, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * (F.silu(gate) if ctx.silu else gate)
        return grad_gate, grad_up, None


GLU_ACTIVATIONS = (F.silu, identity)


def glu(activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``activation(gate) * up`` for activation F.silu or identity, storing gate and up only."""
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"glu supports the activations {GLU_ACTIVATIONS}, got {activation}")
    return _GLU.apply(gate, up, activation is F.silu)
