"""A parallel layout of a run (TP, PP, DP, VP, SP, recompute, micro-batch, optimizer sharding) and the config that
selects it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from cola_megatron.config import Config

RECOMPUTE_MODES = ("none", "cola_m", "full")


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    virtual_pipeline: Optional[int]
    sequence_parallel: bool
    recompute: str
    micro_batch_size: int
    distributed_optimizer: bool
    overlap_grad_reduce: bool = True
    """Reduce gradients while the last micro-batch's backward runs (only matters with DP > 1)."""

    @property
    def model_chunks(self) -> int:
        return self.virtual_pipeline or 1

    def overrides(self) -> List[str]:
        """The cola-train overrides that select this layout."""
        vp = "null" if self.virtual_pipeline is None else str(self.virtual_pipeline)
        reduce_overlap = self.overlap_grad_reduce and self.data_parallel > 1
        return [
            f"parallel.tensor_parallel={self.tensor_parallel}",
            f"parallel.pipeline_parallel={self.pipeline_parallel}",
            f"parallel.virtual_pipeline={vp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"parallel.use_distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"parallel.overlap_grad_reduce={str(reduce_overlap).lower()}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"model.recompute={self.recompute}",
        ]

    def label(self) -> str:
        return (f"TP{self.tensor_parallel} PP{self.pipeline_parallel} DP{self.data_parallel}"
                + (f" VP{self.virtual_pipeline}" if self.virtual_pipeline else "")
                + (" SP" if self.sequence_parallel else "") + f" {self.recompute} mb{self.micro_batch_size}")


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The layout a config selects at a world size."""
    p = cfg.parallel
    return Layout(
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        data_parallel=world_size // (p.tensor_parallel * p.pipeline_parallel),
        virtual_pipeline=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        recompute=cfg.model.recompute,
        micro_batch_size=cfg.train.micro_batch_size,
        distributed_optimizer=p.use_distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
    )


def apply_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of ``cfg`` running ``layout`` (not validated)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, recompute=layout.recompute),
        parallel=dataclasses.replace(
            cfg.parallel,
            tensor_parallel=layout.tensor_parallel,
            pipeline_parallel=layout.pipeline_parallel,
            virtual_pipeline=layout.virtual_pipeline,
            sequence_parallel=layout.sequence_parallel,
            use_distributed_optimizer=layout.distributed_optimizer,
            overlap_grad_reduce=layout.overlap_grad_reduce and layout.data_parallel > 1,
            overlap_param_gather=False,
        ),
        train=dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size),
    )
