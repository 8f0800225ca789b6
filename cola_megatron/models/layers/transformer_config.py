"""megatron-core's TransformerConfig with the few fields CoLA's modules read."""

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class CoLATransformerConfig(TransformerConfig):
    cola_rank: int = 0
    """Bottleneck width r of every CoLA projection (0 for the dense baseline)."""

    cola_tp_scheme: str = "bottleneck"
    """How CoLA projections are split over tensor parallelism: 'bottleneck' or 'pair' (docs/design.md §3)."""

    cola_init_std: Optional[float] = None
    """Override of the paper's A/B init std; None uses (r·(d_in + d_out))^(-1/4)."""

    cola_recompute: str = "none"
    """Activation recomputation: 'none', 'cola_m' or 'full' (megatron's per-layer recompute)."""
