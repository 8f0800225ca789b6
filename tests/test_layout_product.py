"""The full layout product once: TP2 x PP2 x DP2 (8 gloo processes) with sequence parallelism, the distributed
optimizer, CoLA-M and grouped-query attention (4 heads in 2 k/v groups, one group per TP rank) trains like one
process, and its checkpoint continues at TP1 PP1 DP1 like the one-process run.
"""

from __future__ import annotations

import os

import pytest

from tests.distributed import run_distributed
from tests.numerics import TRAJECTORY_ADAM_EPS, assert_same_trajectory

SAVED_AT, ITERS = 3, 5


def _cfg(iters, save_dir=None, load_dir=None, **parallel):
    from cola_megatron.config import config_from_dict

    return config_from_dict({
        "model": dict(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4, rank=16,
                      vocab_size=256, seq_length=32, cola_init_std=0.3, recompute="cola_m", num_query_groups=2),
        "parallel": dict(use_distributed_optimizer=True, **parallel),
        "train": dict(micro_batch_size=2, global_batch_size=8, train_iters=iters, eval_iters=0, seed=7,
                      precision="fp32"),
        "optimizer": dict(lr=3e-3, warmup_iters=1, decay_iters=10, adam_eps=TRAJECTORY_ADAM_EPS),
        "data": dict(mock=True),
        "checkpoint": dict(save_dir=save_dir, load_dir=load_dir),
        "logging": dict(log_interval=100),
    })


def _train(cfg):
    import torch.distributed as dist

    from cola_megatron.training.run import run

    trainer = run(cfg, log=False)
    dist.barrier()
    return trainer.history


def _eight_processes(root):
    return _train(_cfg(SAVED_AT, save_dir=os.path.join(root, "run"), tensor_parallel=2, pipeline_parallel=2,
                       sequence_parallel=True))


def _one_process(root):
    straight = _train(_cfg(ITERS))
    resumed = _train(_cfg(ITERS, load_dir=os.path.join(root, "run", f"iter_{SAVED_AT:07d}")))
    return straight, resumed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("product"))
    eight = run_distributed(_eight_processes, 8, root, timeout=900)
    straight, resumed = run_distributed(_one_process, 1, root, timeout=600)[0]
    return eight, straight, resumed


def test_tp2_pp2_dp2_matches_one_process(runs):
    eight, straight, _ = runs
    assert all(history == eight[0] for history in eight)  # every rank reports the same global loss
    assert len(eight[0]) == SAVED_AT and len(straight) == ITERS
    assert_same_trajectory(eight[0], straight[:SAVED_AT])
    assert straight[0] != straight[-1]  # the model trains: equal losses are not trivially equal


def test_its_checkpoint_continues_at_tp1_pp1_dp1(runs):
    _, straight, resumed = runs
    assert len(resumed) == ITERS - SAVED_AT
    assert_same_trajectory(resumed, straight[SAVED_AT:])
