"""Settings for the whole suite, inherited by every process it starts."""

import getpass
import os
import tempfile

import torch

# torch (2.13) caches inductor's compiled CPU kernels without ATen's CPU capability in the key: kernels compiled in
# a native (AVX-512) run and reused by a run at ATEN_CPU_CAPABILITY=avx2 gave NaN losses in the torch.compile test,
# which passes from a fresh cache. One cache per capability keeps the suite's passes at different capabilities apart.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{torch.backends.cpu.get_cpu_capability().lower()}"))
