"""Compatibility: the CPU bridge (``cpu``) and quieting megatron-core's import-time notices."""

import warnings


def quiet_megatron_notices() -> None:
    """megatron-core warns on import that apex / Transformer Engine are absent (the local backend needs neither)
    and about a deprecated CUDA-graph scope it sets itself; command-line tools hide those lines."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
