"""cola-plan: its memory prediction against the real training objects, its ranking, and the launch files it renders.

Measured memory on a CPU (process RSS is dominated by libraries, so the test measures what the planner predicts):

- model states: the bytes of every distinct storage behind the model's parameters, megatron's DDP parameter and
  gradient buffers, and the optimizer's parameters (fp32 masters) and state (Adam moments), after one step;
- activations: the peak, over one training step (megatron's schedule: forward, backward, recomputation), of the
  bytes of distinct storages autograd holds for backward, tracked with ``torch.autograd.graph.saved_tensors_hooks``
  (a packed tensor counts from packing until autograd releases it; parameters are excluded).

The prediction uses ``device="cpu"`` (torch's composite RMSNorm on CPU saves fp32 copies; see plan._rms_norm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from cola_megatron import plan
from cola_megatron.config import config_from_dict, load_config
from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------------------
# Measuring memory on CPU


class SavedTensorTracker:
    """Peak bytes of distinct storages autograd holds for backward while the hooks are active."""

    def __init__(self, exclude_storages):
        self.exclude = set(exclude_storages)
        self.live = {}  # storage pointer -> [bytes, references]
        self.current = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.exclude or storage.nbytes() == 0:
            return tensor
        return _Held(self, tensor, storage.data_ptr(), storage.nbytes())

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    """A saved tensor; released (and uncounted) when autograd drops it."""

    def __init__(self, tracker, tensor, key, nbytes):
        self.tensor, self.tracker, self.key = tensor, tracker, key
        entry = tracker.live.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            tracker.current += nbytes
            tracker.peak = max(tracker.peak, tracker.current)
        entry[1] += 1

    def __del__(self):
        entry = self.tracker.live[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.tracker.live[self.key]
            self.tracker.current -= entry[0]


def _storages(tensors):
    found = {}
    for t in tensors:
        if t is not None:
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return found


def model_state_storages(trainer):
    """Distinct storages of parameters, DDP buffers, optimizer parameters and optimizer state."""
    tensors = []
    for chunk in trainer.model:
        for p in chunk.parameters():
            tensors += [p, getattr(p, "main_grad", None)]
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            tensors += [buffer.param_data, buffer.grad_data]
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    for opt in optimizers:
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                tensors += [p, p.grad]
        for state in inner.state.values():
            tensors += [v for v in state.values() if hasattr(v, "untyped_storage")]
    return _storages(tensors)


def _config(arch="cola", recompute="none", precision="bf16", micro_batch=4, global_batch=8, layers=4, **parallel):
    return config_from_dict({
        "model": dict(arch=arch, hidden_size=128, ffn_hidden_size=352, num_layers=layers, num_attention_heads=4,
                      rank=32, vocab_size=512, seq_length=64, recompute=recompute, only_lr_act=arch == "cola"),
        "parallel": parallel,
        "train": dict(micro_batch_size=micro_batch, global_batch_size=global_batch, train_iters=4,
                      precision=precision, eval_iters=0),
        "optimizer": dict(warmup_iters=1),
        "data": dict(mock=True),
        "logging": dict(log_interval=100, tensorboard=False),
    })


def _measure_cases(cases):
    """On every rank: {name: (stage, model-state bytes, peak saved-activation bytes)} after a warm-up step."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from cola_megatron.parallel import initialize_distributed
    from cola_megatron.train import build_data
    from cola_megatron.trainer import Trainer

    results = {}
    for name, cfg in cases:
        p = cfg.parallel
        device = initialize_distributed(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline,
                                        seed=cfg.train.seed, device="cpu")
        _, train_ds, _ = build_data(cfg)
        trainer = Trainer(cfg, device, log=False)
        trainer.attach_data(train_ds, None)
        trainer.train_step()  # creates the optimizer state
        states = model_state_storages(trainer)
        tracker = SavedTensorTracker(states)
        with tracker.hooks():
            trainer.train_step()
        results[name] = (ps.get_pipeline_model_parallel_rank(), sum(states.values()), tracker.peak)
        del trainer
        dist.barrier()
    return results


CASES_WORLD_1 = {
    "cola none": _config(),
    "cola full": _config(recompute="full"),
    "cola cola_m": _config(recompute="cola_m"),
    "cola none fp32": _config(precision="fp32"),
    "dense none": _config(arch="dense"),
}
CASES_WORLD_2 = {
    "TP2 SP": _config(tensor_parallel=2, sequence_parallel=True),
    "TP2 SP cola_m": _config(recompute="cola_m", tensor_parallel=2, sequence_parallel=True),
    "TP2 dense": _config(arch="dense", tensor_parallel=2),
    "PP2 1F1B": _config(pipeline_parallel=2, micro_batch=2),
    "PP2 VP2 full": _config(recompute="full", pipeline_parallel=2, virtual_pipeline=2, micro_batch=2),
    "DP2 distributed optimizer": _config(use_distributed_optimizer=True),
}


@pytest.fixture(scope="module")
def measured():
    """{(case, rank): (predicted Memory, measured model states, measured activations)}."""
    out = {}
    for world, cases in ((1, CASES_WORLD_1), (2, CASES_WORLD_2)):
        per_rank = run_distributed(_measure_cases, world, list(cases.items()))
        for rank, results in enumerate(per_rank):
            for name, (stage, states, activations) in results.items():
                cfg = cases[name]
                predicted = plan.stage_memory(cfg, plan.layout_of(cfg, world), stage, device="cpu")
                out[(name, rank)] = (predicted, states, activations)
    return out


ALL_CASES = [(n, r) for n in CASES_WORLD_1 for r in range(1)] + [(n, r) for n in CASES_WORLD_2 for r in range(2)]


@pytest.mark.parametrize("case,rank", ALL_CASES)
def test_predicted_memory_within_10_percent_of_measured(measured, case, rank):
    predicted, states, activations = measured[(case, rank)]
    total_predicted = predicted.model_states + predicted.activations
    total_measured = states + activations
    detail = (f"{case} rank {rank}: predicted model states {predicted.model_states:.0f} B, activations "
              f"{predicted.activations:.0f} B; measured {states} B, {activations} B")
    assert total_predicted == pytest.approx(total_measured, rel=0.10), detail
    # Each part on its own, so a large part cannot hide an error in the other.
    assert predicted.model_states == pytest.approx(states, rel=0.10), detail
    assert predicted.activations == pytest.approx(activations, rel=0.10), detail
