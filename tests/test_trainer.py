"""cola-train on megatron-core: every parallel layout computes the same losses as one process.

Each launch re-initialises megatron's parallel state for several layouts inside one process group, since process
start-up dominates on a small CPU.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.numerics import TRAJECTORY_ADAM_EPS, assert_same_trajectory

ITERS = 5


def _cfg(arch: str, train=None, **parallel):
    """``arch`` 'cola', 'dense', or 'cola-gqa' (CoLA with grouped-query attention, 4 heads in 2 groups)."""
    from cola_megatron.config import config_from_dict

    groups = 2 if arch == "cola-gqa" else None
    arch = "cola" if arch == "cola-gqa" else arch
    model = dict(arch=arch, hidden_size=64, ffn_hidden_size=128, num_layers=4, num_attention_heads=4, rank=16,
                 vocab_size=256, seq_length=32, cola_init_std=0.3 if arch == "cola" else None,
                 num_query_groups=groups)
    return config_from_dict({
        "model": model,
        "parallel": parallel,
        "train": dict(dict(micro_batch_size=2, global_batch_size=8, train_iters=ITERS, precision="fp32",
                           eval_iters=0, seed=7), **(train or {})),
        "optimizer": dict(lr=3e-3, warmup_iters=1, adam_eps=TRAJECTORY_ADAM_EPS),
        "data": dict(mock=True),
        "logging": dict(log_interval=100),
    })


def _losses(cfg):
    from cola_megatron.training.run import run

    trainer = run(cfg, log=False)
    return trainer.history


def _run_layouts(layouts):
    """[(name, arch, parallel kwargs[, train overrides])] → {name: losses} (every rank has the same losses)."""
    import torch.distributed as dist

    results = {}
    for name, arch, parallel, *train in layouts:
        results[name] = _losses(_cfg(arch, train=train[0] if train else None, **parallel))
        dist.barrier()
    return results


def _precision_runs():
    """Mixed and pure bf16 on CPU, and the learning rates megatron's scheduler applies."""
    from cola_megatron.training.run import run

    out = {}
    for name, train in {"fp32": {}, "bf16": {"precision": "bf16"},
                        "pure_bf16": {"precision": "bf16", "pure_bf16": True}}.items():
        trainer = run(_cfg("cola", train=dict(train, train_iters=8)), log=False)
        opt = trainer.optimizer
        inner = getattr(opt, "chained_optimizers", [opt])[0].optimizer  # the torch optimizer megatron drives
        out[name] = {"losses": trainer.history,
                     "param_dtype": str(next(trainer.model[0].parameters()).dtype),
                     "master_dtype": str(inner.param_groups[0]["params"][0].dtype)}
    # 1 warmup step, then cosine from 3e-3 to 3e-4 by step 8 (megatron's OptimizerParamScheduler).
    sched, group = trainer.scheduler, trainer.optimizer.param_groups[0]
    lrs = []
    for step in range(9):
        sched.num_steps = step
        lrs.append(sched.get_lr(group))
    out["lrs"] = lrs
    return out


LAYOUTS_WORLD_2 = [
    ("TP2", dict(tensor_parallel=2)),
    ("TP2-SP", dict(tensor_parallel=2, sequence_parallel=True)),
    ("PP2", dict(pipeline_parallel=2)),
    ("PP2-VP2", dict(pipeline_parallel=2, virtual_pipeline=2)),
    ("DP2", dict()),
    ("DP2-distopt", dict(use_distributed_optimizer=True)),
]


# Grouped-query attention rides along in the same launches (the TP layouts' gradients: test_tensor_parallel.py).
GQA_LAYOUTS_WORLD_2 = [(n, p) for n, p in LAYOUTS_WORLD_2 if n in ("TP2-SP", "PP2")]


@pytest.fixture(scope="module")
def layout_losses():
    archs = ("cola", "dense")
    ref = run_distributed(_run_layouts, 1, [(f"{a}/TP1", a, {}) for a in (*archs, "cola-gqa")]
                          + [("cola/TP1-micro8", "cola", {}, {"micro_batch_size": 8})])[0]
    world2 = run_distributed(_run_layouts, 2, [(f"{a}/{n}", a, p) for a in archs for n, p in LAYOUTS_WORLD_2]
                             + [(f"cola-gqa/{n}", "cola-gqa", p) for n, p in GQA_LAYOUTS_WORLD_2])[0]
    world4 = run_distributed(_run_layouts, 4, [(f"{a}/TP2-PP2", a, dict(tensor_parallel=2, pipeline_parallel=2))
                                               for a in (*archs, "cola-gqa")])[0]
    return {**ref, **world2, **world4}


@pytest.mark.parametrize("arch", ["cola", "dense"])
@pytest.mark.parametrize("layout", [n for n, _ in LAYOUTS_WORLD_2] + ["TP2-PP2"])
def test_losses_match_single_process(layout_losses, arch, layout):
    ref = layout_losses[f"{arch}/TP1"]
    got = layout_losses[f"{arch}/{layout}"]
    assert len(ref) == ITERS and all(math.isfinite(x) for x in ref)
    assert ref[-1] < ref[0], f"the reference run did not learn: {ref}"
    assert_same_trajectory(got, ref, what=f"{arch} {layout}")


@pytest.mark.parametrize("layout", [n for n, _ in GQA_LAYOUTS_WORLD_2] + ["TP2-PP2"])
def test_grouped_query_attention_losses_match_single_process(layout_losses, layout):
    ref, got = layout_losses["cola-gqa/TP1"], layout_losses[f"cola-gqa/{layout}"]
    assert ref[-1] < ref[0], f"the reference run did not learn: {ref}"
    assert ref != layout_losses["cola/TP1"], "grouped-query attention must change the model"
    assert_same_trajectory(got, ref, what=f"cola-gqa {layout}")


def test_distributed_optimizer_matches_plain_dp(layout_losses):
    for arch in ("cola", "dense"):
        assert_same_trajectory(layout_losses[f"{arch}/DP2-distopt"], layout_losses[f"{arch}/DP2"], what=arch)


def test_gradient_accumulation_matches_one_big_micro_batch(layout_losses):
    assert_same_trajectory(layout_losses["cola/TP1-micro8"], layout_losses["cola/TP1"])


@pytest.fixture(scope="module")
def precision_runs():
    return run_distributed(_precision_runs, 1)[0]


def test_bf16_mixed_precision_keeps_fp32_masters(precision_runs):
    fp32, bf16 = precision_runs["fp32"], precision_runs["bf16"]
    assert bf16["param_dtype"] == "torch.bfloat16" and bf16["master_dtype"] == "torch.float32"
    assert fp32["param_dtype"] == fp32["master_dtype"] == "torch.float32"
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-2)
    assert bf16["losses"] != fp32["losses"]  # it really computed in bf16


def test_pure_bf16_has_no_fp32_copy(precision_runs):
    pure = precision_runs["pure_bf16"]
    assert pure["param_dtype"] == pure["master_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(x) for x in pure["losses"])
    assert pure["losses"] == pytest.approx(precision_runs["fp32"]["losses"], rel=5e-2)


def test_warmup_then_cosine_to_min_lr(precision_runs):
    lrs = precision_runs["lrs"]  # steps 0..8, warmup 1, decay over 8, peak 3e-3, floor 10 %
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(3e-3)
    for step in range(1, 9):
        progress = (step - 1) / 7
        expect = 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * progress))
        assert lrs[step] == pytest.approx(expect, rel=1e-6), step


def test_cola_and_dense_differ(layout_losses):
    """Guards the comparisons above against both archs silently building the same model."""
    assert layout_losses["cola/TP1"][0] != pytest.approx(layout_losses["dense/TP1"][0], rel=1e-3)


def test_cli_prints_metric_line_and_writes_metrics(tmp_path):
    log_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "cola_megatron.train", "--config", "configs/demo.yaml", "data.mock=true",
         "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null", "train.train_iters=4",
         "train.eval_iters=1", "optimizer.warmup_iters=1", "logging.log_interval=2", f"logging.log_dir={log_dir}", "checkpoint.save_dir=null",
         "checkpoint.save_interval=0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if "] iter " in l]
    assert len(lines) == 2
    for key in ("elapsed", "ms/iter", "ETA", "loss", "lr", "grad_norm", "tok/s", "TFLOP/s/gpu", "MFU", "peak mem",
                "skipped"):
        assert key in lines[-1]
    assert "validation at iter 4" in out.stdout and "perplexity" in out.stdout
    records = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [2, 4]
    from cola_megatron.config import load_config

    demo = load_config("configs/demo.yaml")
    per_step = demo.train.global_batch_size * demo.model.seq_length
    assert [r["tokens"] for r in train] == [2 * per_step, 4 * per_step]  # cumulative: iterations x batch x seq
    assert all(r["tflops_per_gpu"] > 0 for r in train)
    assert [r["kind"] for r in records].count("valid") == 1
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard events written"


def test_dry_run_7b_allocates_nothing():
    out = subprocess.run(
        [sys.executable, "-m", "cola_megatron.train", "--config", "configs/cola/llama_7b.yaml", "--dry-run",
         "data.mock=true", "data.tokenizer=null"],  # its C4 files are not shipped
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "parameters: 2,82" in out.stdout
    assert "training FLOPs per token" in out.stdout
    assert "tensor_parallel=1" in out.stdout
