"""How the suite compares two computations of the same function so that the CPU's vector width cannot decide.

Two fp32 computations of one function that order their sums differently (another layer composition, TP/PP/DP
shards, recomputation) agree only up to rounding, and how far depends on the kernels: AVX2, AVX-512, AMX and Arm
builds block their reductions differently. So where a test claims mathematical equality it builds the models in
float64 (``float64_models``) and compares with ``assert_same_function``: float64 rounding, about 1e-16 of a tensor's
scale per operation, is far below its 1e-10 bound, while any real difference between formulations (a dropped
activation, a transposed shard, a wrong scale) is a relative error of 1e-3 or more and fails. Bit-identity stays
where it is the promise (resume with the same layout, checkpoint and conversion round trips); there both sides run
the same kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

# float64 keeps 53 bits: after the few hundred dependent operations of a small model's step, differently ordered
# sums differ by about 1e-14 of the tensor's largest element. 1e-10 leaves four orders of margin for that and still
# sits five orders below the fp32 rounding (1e-7..1e-5) a formulation computed in fp32 would show.
FLOAT64_TOLERANCE = 1e-10


@contextlib.contextmanager
def float64_models():
    """Models built inside hold float64 parameters, compute in float64 and pass float64 between pipeline stages."""
    from cola_megatron.models import build

    original = build.transformer_config

    def in_float64(*args, **kwargs):
        return dataclasses.replace(original(*args, **kwargs), params_dtype=torch.float64, pipeline_dtype=torch.float64)

    build.transformer_config = in_float64
    try:
        yield
    finally:
        build.transformer_config = original


def same_function_mismatch(got: torch.Tensor, want: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE):
    """None when ``got`` equals ``want`` within ``tolerance`` of ``want``'s largest magnitude, else a description.

    The bound is relative to the tensor's scale, not elementwise: an element near zero is the sum of terms as large
    as the tensor's others, so its rounding error is set by them."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    if want.numel() == 0:
        return None
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    if error <= tolerance * max(scale, torch.finfo(want.dtype).tiny):
        return None
    return f"max |difference| {error:.3e} > {tolerance:g} x max |value| {scale:.3e}"


def assert_same_function(got: torch.Tensor, want: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE, name=""):
    mismatch = same_function_mismatch(got, want, tolerance)
    assert mismatch is None, f"{name}: {mismatch}"


# Loss histories of a few fp32 training steps computed two ways (TP/PP/DP layouts, recomputation, torch.compile, a
# checkpoint resumed at another layout). These run the whole trainer (megatron's DDP, optimizer and schedules),
# which has no float64 mode, so the bound is derived from fp32 rounding instead: one step's loss and gradients
# differ between the two ways by the rounding of their reductions, about 1e-7 relative (a few ulps of 2^-24); the
# optimizer carries that into the next steps' weights, and each further step of at most lr 3e-3 over these small
# models adds about as much again -- provided the optimizer does not amplify it. Adam does: its update
# lr * m / (sqrt(v) + eps) has the size lr whatever the gradient's, so an element whose gradient is a cancellation
# (true value near 0, rounding noise comparable to it) moves by +lr in one way and -lr in the other. With the
# default eps = 1e-8 that put grouped-query CoLA's TP2 runs 2.2e-6 from one process at the fifth step with AVX-512
# kernels and 2.0e-5 with AVX2 ones. The trajectory tests therefore train with TRAJECTORY_ADAM_EPS: the update then
# moves at most lr / eps = 3 times a gradient's difference, so rounding stays rounding (the same runs: 3.5e-7 and
# 1.3e-7). Measured over every history test_trainer, test_layout_product and test_checkpoint compare: at most
# 3.5e-7 relative with AVX-512 kernels, 2.8e-7 with AVX2 and 5.4e-7 with the baseline ones, so 1e-5 keeps a
# tenfold margin. A real difference between the two ways (a
# dropped or misplaced shard, a wrong activation or loss weighting) changes the losses by 1e-3 or more, as the
# negative controls in test_tensor_parallel show for the same models.
TRAJECTORY_ADAM_EPS = 1e-3
TRAJECTORY_RTOL = 1e-5


def trajectory_mismatch(got, want, rtol: float = TRAJECTORY_RTOL):
    """None when two loss histories agree within ``rtol`` at every step, else the worst step."""
    if len(got) != len(want):
        return f"{len(got)} losses != {len(want)}"
    worst = max(((abs(g - w) / abs(w), i) for i, (g, w) in enumerate(zip(got, want))), default=(0.0, None))
    if worst[0] <= rtol:
        return None
    return f"step {worst[1]}: relative difference {worst[0]:.2e} > {rtol:g} ({got} vs {want})"


def assert_same_trajectory(got, want, rtol: float = TRAJECTORY_RTOL, what: str = ""):
    mismatch = trajectory_mismatch(got, want, rtol)
    assert mismatch is None, f"{what}: {mismatch}"
