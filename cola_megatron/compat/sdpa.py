"""torch's CPU flash attention under a lowered ATEN_CPU_CAPABILITY.

On a CPU with AMX, torch (2.13) picks its bf16 flash-attention kernel by what the hardware can do, but that kernel's
VNNI packing refuses to run unless ATen's dispatch level is AVX-512 ("pack_vnni2 is only supported when avx512 is
supported"). So with ATEN_CPU_CAPABILITY=avx2 or =default, as users set to get another machine's numerics, every bf16
attention call fails. The math kernel computes the same function at every capability; it is used only there.
"""

from __future__ import annotations

import contextlib

import torch


def _flash_refuses_bf16() -> bool:
    return not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def attention_kernels(query: torch.Tensor):
    """Context for one scaled_dot_product_attention call on ``query``'s device and dtype."""
    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and _flash_refuses_bf16():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
