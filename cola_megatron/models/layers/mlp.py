"""megatron's MLP with a GLU that stores only what its backward needs.

megatron's unfused GLU keeps the gate|up tensor (σ's input), σ(gate), a copy ``up + glu_linear_offset`` (made even
for offset 0) and the product. Here a CoLA gate|up slot hands over gate and up as separate tensors (no
``[gate ; up]`` concatenation), a dense one its output chunked into views, and ``ops.glu`` keeps gate and up only;
σ(gate) is rebuilt in backward. Values and gradients are those of megatron's GLU.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.mlp import MLP

from cola_megatron.models.layers import ops


class GLUMLP(MLP):
    """Same submodules, parameters and checkpoint keys as megatron's MLP; falls back to its forward for what
    the lean path does not cover (fused or TE activations, clamping, per-token scales)."""

    def _lean(self, per_token_scale) -> bool:
        c = self.config
        return (c.gated_linear_unit and not c.use_te_activation_func and not c.bias_activation_fusion
                and per_token_scale is None and c.activation_func_clamp_value is None
                and self.activation_func in ops.GLU_ACTIVATIONS)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._lean(per_token_scale):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        fc1 = self.linear_fc1
        if hasattr(fc1, "decode_branches"):
            gate, up = fc1.decode_branches(fc1.encode(hidden_states))
        else:
            intermediate, bias = fc1(hidden_states)
            if bias is not None:
                intermediate = intermediate + bias
            gate, up = torch.chunk(intermediate, 2, dim=-1)
        if self.config.glu_linear_offset:
            up = up + self.config.glu_linear_offset
        return self.linear_fc2(ops.glu(self.activation_func, gate, up))
