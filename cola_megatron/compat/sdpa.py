"""torch's CPU flash attention under a lowered ATEN_CPU_CAPABILITY.

On a CPU with AMX, torch (2.13) picks its bf16 flash-attention kernel by what the hardware can do, but that kernel's
VNNI packing refuses to run unless ATen's dispatch level is AVX-512 ("pack_vnni2 is only supported when avx512 is
supported"). So with ATEN_CPU_CAPABILITY=avx2 or =default, as users set to get another machine's numerics, every bf16
attention call fails. The math kernel computes the same function at every capability; it is used only there.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_flash_runs_bf16() -> bool:
    """Whether torch's CPU flash-attention kernel can run bf16 here: always, except where the hardware has the bf16
    matrix instructions it packs for (AMX, AVX-512 BF16) and ATen's dispatch level is below AVX-512."""
    hardware_packs = any(getattr(torch.cpu, probe, lambda: True)()
                         for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return not hardware_packs or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def attention_kernels(query: torch.Tensor):
    """Context for one scaled_dot_product_attention call on ``query``'s device and dtype."""
    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and not cpu_flash_runs_bf16():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
