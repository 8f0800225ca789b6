"""RMSNorm for the local backend.

megatron-core's torch-norm wrapper refuses sequence parallelism, and its fused norm needs apex. This one is plain
torch; under sequence parallelism its weight is marked `sequence_parallel` so megatron's `finalize_model_grads`
sums its gradient over the tensor-parallel group (each rank only saw its slice of the sequence).
"""

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
