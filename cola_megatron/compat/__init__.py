"""Compatibility: the CPU bridge (``cpu``), torch's CPU attention kernels under a lowered ATen capability
(``sdpa``), and quieting megatron-core's notices that no user can act on."""

import warnings


def quiet_megatron_notices() -> None:
    """megatron-core warns on import that apex / Transformer Engine are absent (the local backend needs neither)
    and about a deprecated CUDA-graph scope it sets itself; its checkpoint loading calls torch APIs that torch
    marks deprecated (``load_state_dict``, ShardedTensor). Nothing a user can act on: command-line tools hide them."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    warnings.filterwarnings("ignore", message=r".*`load_state_dict` is deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
                            category=FutureWarning)
