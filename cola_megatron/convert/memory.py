"""How a conversion process allocates: freed tensor buffers go back to the kernel.

Conversion allocates and frees tensors of every size, one group after another. glibc raises its mmap threshold to
the size of each large block freed, so that later blocks of up to 32 MB come from the heap, where freed memory
mostly stays with the process: resident memory would then grow with the model although no more than a group of
tensors is ever alive. A fixed threshold keeps every block above 1 MB in its own mapping, returned when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns the dynamic adjustment off
THRESHOLD_BYTES = 1 << 20


def return_freed_buffers() -> None:
    """Fix glibc's mmap threshold in this process (a no-op on other C libraries)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
