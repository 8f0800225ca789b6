"""Deterministic micro-batches: which samples each data-parallel rank reads, resumable from any iteration.

Step ``i`` consumes samples ``[i·G, (i+1)·G)`` of the dataset (G = global batch). Micro-step ``k`` takes the block
``[i·G + k·m·D, i·G + (k+1)·m·D)`` and data-parallel rank ``d`` reads its ``d``-th slice of ``m`` samples
(m = micro-batch, D = data-parallel size), as megatron's pretraining sampler does. Every layout therefore sees the
same samples in each step, and resuming only needs the iteration number.
"""

from __future__ import annotations

from typing import Dict, Iterator

import torch


def _collate(samples) -> Dict[str, torch.Tensor]:
    batch = {}
    for key in samples[0]:
        values = [torch.as_tensor(s[key]) for s in samples]
        batch[key] = torch.stack(values)
    return batch


class MicroBatches:
    """Iterates the micro-batches of one data-parallel rank, starting at a given step."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 start_step: int = 0, device: torch.device = torch.device("cpu")):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch x data-parallel "
                             f"({micro_batch} x {dp_size})")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_steps = global_batch // (micro_batch * dp_size)
        self.device = device
        self.step = start_step

    def sample_indices(self, step: int, micro_step: int):
        start = step * self.global_batch + micro_step * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        return range(start, start + self.micro_batch)

    def step_iterator(self) -> Iterator[Dict[str, torch.Tensor]]:
        """The micro-batches of the next step (advances the step counter)."""
        step = self.step
        self.step += 1
        for k in range(self.micro_steps):
            samples = [self.dataset[i % len(self.dataset)] for i in self.sample_indices(step, k)]
            yield {key: t.to(self.device, non_blocking=True) for key, t in _collate(samples).items()}
