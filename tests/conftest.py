"""Settings for the whole suite, inherited by every process it starts."""

import getpass
import os
import tempfile

import pytest
import torch

# torch (2.13) caches inductor's compiled CPU kernels without ATen's CPU capability in the key: kernels compiled in
# a native (AVX-512) run and reused by a run at ATEN_CPU_CAPABILITY=avx2 gave NaN losses in the torch.compile test,
# which passes from a fresh cache. One cache per capability keeps the suite's passes at different capabilities apart.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{torch.backends.cpu.get_cpu_capability().lower()}"))


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """No hub access for a module's Hugging Face loads; remote code is cached in a fresh HF_HOME."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="module", autouse=True)
def process_group_ends_with_its_module():
    """A module that initialises torch.distributed in the test process (megatron's parallel state, in-process
    conversion) ends it with the module. Left alive, its rendezvous port stays bound and its MASTER_PORT stays in
    os.environ, where every later subprocess finds it, and their process groups fail with EADDRINUSE."""
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
