"""cola-plan: its memory prediction against the real training objects, its ranking, and the launch files it renders.

Measured memory on a CPU (process RSS is dominated by libraries, so the test measures what the planner predicts):

- model states: the bytes of every distinct storage behind the model's parameters, megatron's DDP parameter and
  gradient buffers, and the optimizer's parameters (fp32 masters) and state (Adam moments), after one step;
- activations: the peak, over one training step (megatron's schedule: forward, backward, recomputation), of the
  bytes of distinct storages autograd holds for backward, tracked with ``torch.autograd.graph.saved_tensors_hooks``
  (a packed tensor counts from packing until autograd releases it; parameters are excluded).

The prediction uses ``device="cpu"`` (torch's composite RMSNorm on CPU saves fp32 copies; see cost/memory.py, _rms_norm).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from cola_megatron.analysis import plan
from cola_megatron.compat.sdpa import cpu_flash_runs_bf16
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

    from cola_megatron.training.distributed import initialize_distributed
    from cola_megatron.training.run import build_data
    from cola_megatron.training.trainer import Trainer

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
        cases = {name: cfg for name, cfg in cases.items() if _measurable(cfg)}
        per_rank = run_distributed(_measure_cases, world, list(cases.items()))
        for rank, results in enumerate(per_rank):
            for name, (stage, states, activations) in results.items():
                cfg = cases[name]
                predicted = plan.stage_memory(cfg, plan.layout_of(cfg, world), stage, device="cpu")
                out[(name, rank)] = (predicted, states, activations)
    return out


ALL_CASES = [(n, r) for n in CASES_WORLD_1 for r in range(1)] + [(n, r) for n in CASES_WORLD_2 for r in range(2)]


def _measurable(cfg) -> bool:
    """The model counts what flash attention stores. Where torch's CPU flash kernel cannot run bf16 (an AMX machine
    at ATEN_CPU_CAPABILITY below AVX-512, compat/sdpa.py), bf16 attention runs the math kernel, which also stores
    the s×s probabilities no GPU run stores: nothing there to compare with."""
    return cfg.train.precision != "bf16" or cpu_flash_runs_bf16()


@pytest.mark.parametrize("case,rank", ALL_CASES)
def test_predicted_memory_within_10_percent_of_measured(measured, case, rank):
    if (case, rank) not in measured:
        pytest.skip("bf16 attention runs torch's math kernel at this ATEN_CPU_CAPABILITY (compat/sdpa.py)")
    predicted, states, activations = measured[(case, rank)]
    total_predicted = predicted.model_states + predicted.activations
    total_measured = states + activations
    detail = (f"{case} rank {rank}: predicted model states {predicted.model_states:.0f} B, activations "
              f"{predicted.activations:.0f} B; measured {states} B, {activations} B")
    assert total_predicted == pytest.approx(total_measured, rel=0.10), detail
    # Each part on its own, so a large part cannot hide an error in the other.
    assert predicted.model_states == pytest.approx(states, rel=0.10), detail
    assert predicted.activations == pytest.approx(activations, rel=0.10), detail


# --------------------------------------------------------------------------------------------------------------
# The model's parts


@pytest.mark.parametrize("path", ["configs/cola/llama_60m.yaml", "configs/cola/llama_1b.yaml",
                                  "configs/cola/llama_7b.yaml", "configs/dense/llama_1b.yaml",
                                  "configs/cola/llama3_8b.yaml"])
def test_parameter_count_matches_the_model(path):
    from cola_megatron.models.accounting import count_parameters

    m = load_config(path).model
    assert plan.stage_parameters(m, 1, 1, 0) == count_parameters(m).total
    # Pipeline stages split the layers and put the embedding first, the output layer last.
    stages = [plan.stage_parameters(m, 1, 4, s) for s in range(4)]
    assert sum(stages) == count_parameters(m).total and stages[0] > stages[1] == stages[2] < stages[3]


def test_cola_m_keeps_2d_plus_7r_per_token_and_layer():
    cfg = load_config("configs/cola_m/llama_7b.yaml")
    d, r = cfg.model.hidden_size, cfg.model.rank
    layer = plan.layer_activations(cfg, tp=1, sequence_parallel=False)
    assert layer.cola_m_kept == 2 * (2 * d + 7 * r)  # bf16
    # Without recomputation (GPU kernels): 8d + 7r + 3f elements plus fp32 RMS and log-sum-exp.
    f, heads = cfg.model.ffn_hidden_size, cfg.model.num_attention_heads
    assert layer.full == 2 * (8 * d + 7 * r + 3 * f) + 4 * (2 + heads)
    # Sequence parallelism shards what lives on the residual stream, TP the attention and GLU tensors.
    sharded = plan.layer_activations(cfg, tp=4, sequence_parallel=True)
    assert sharded.cola_m_kept == layer.cola_m_kept / 4
    assert layer.full / 4 < sharded.full < layer.full


def test_grouped_query_attention_narrows_k_v_tensors_and_their_collectives():
    """The Llama-3-8B shape (8 k/v groups of 32 heads: kv = d/4). CoLA-M keeps 2d + 7r as with multi-head attention;
    without recomputation k and v are kv wide (6d + 2kv + 7r + 3f); the TP collectives narrow where they carry k and
    v (pair, dense) and not the bottleneck scheme's r-wide codes."""
    from cola_megatron.analysis.comm_report import block_collectives, block_shape

    cfg = load_config("configs/cola_m/llama3_8b.yaml")
    m = cfg.model
    d, r, f, heads = m.hidden_size, m.rank, m.ffn_hidden_size, m.num_attention_heads
    kv = d // heads * m.num_query_groups
    assert kv == d // 4
    layer = plan.layer_activations(cfg, tp=1, sequence_parallel=False)
    assert layer.cola_m_kept == 2 * (2 * d + 7 * r)
    assert layer.full == 2 * (6 * d + 2 * kv + 7 * r + 3 * f) + 4 * (2 + heads)
    mha = load_config("configs/cola_m/llama3_8b.yaml", ["model.num_query_groups=null"])
    assert plan.layer_activations(mha, tp=1, sequence_parallel=False).full - layer.full == 2 * 2 * (d - kv)

    def widths(config, arch):
        return sum(c.width for c in block_collectives(arch, block_shape(config), 8, True))

    assert widths(cfg, "bottleneck") == widths(mha, "bottleneck") == 2 * 7 * r
    assert widths(mha, "pair") - widths(cfg, "pair") == 2 * 2 * (d - kv)  # q|k|v output, forward and backward
    assert widths(cfg, "dense") == widths(mha, "dense")  # dense moves the layers' d-wide inputs and outputs


def test_first_pipeline_stage_holds_pp_micro_batches():
    layout = plan.Layout(1, 4, 1, None, False, "none", 1, False)
    assert [plan.in_flight_passes(layout, s, micro_batches=8) for s in range(4)] == [4, 3, 2, 1]
    assert plan.in_flight_passes(layout, 0, micro_batches=2) == 2
    interleaved = dataclasses.replace(layout, virtual_pipeline=2)
    # megatron's interleaved warm-up: 2(PP-1) + (VP-1)·PP chunk passes, then one more.
    assert plan.in_flight_passes(interleaved, 0, micro_batches=8) == 2 * 3 + 4 + 1


def test_distributed_optimizer_shards_the_optimizer_over_dp():
    cfg = load_config("configs/cola/llama_1b.yaml")
    replicated = plan.stage_memory(cfg, plan.Layout(1, 1, 8, None, False, "none", 8, False), 0)
    sharded = plan.stage_memory(cfg, plan.Layout(1, 1, 8, None, False, "none", 8, True), 0)
    n = plan.stage_parameters(cfg.model, 1, 1, 0)
    assert (replicated.weights, replicated.gradients, replicated.optimizer) == (2 * n, 4 * n, 12 * n)
    assert sharded.optimizer == 12 * n / 8 and sharded.weights == replicated.weights


def test_recomputation_trades_memory_for_time():
    cfg = load_config("configs/cola/llama_7b.yaml")
    cluster = plan.Cluster(nodes=8)
    by_mode = {mode: plan.estimate(cfg, plan.Layout(1, 1, 64, None, False, mode, 8, True), cluster)
               for mode in plan.RECOMPUTE_MODES}
    assert by_mode["full"].memory.activations < by_mode["cola_m"].memory.activations \
        < by_mode["none"].memory.activations
    assert by_mode["none"].compute_s < by_mode["cola_m"].compute_s < by_mode["full"].compute_s


# --------------------------------------------------------------------------------------------------------------
# Ranking, the command line and the launch files it renders


def _layout_in_sbatch(path):
    text = open(os.path.join(REPO, path)).read()
    block = re.search(r"^layout=\(\n(.*?)^\)", text, re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def _layout_in_pytorchjob(path):
    with open(os.path.join(REPO, path)) as f:
        doc = yaml.safe_load(f)
    args = doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    return [a for a in args if a.split("=")[0] in PLAN_KEYS]


PLAN_KEYS = {o.split("=")[0] for o in plan.Layout(1, 1, 1, None, False, "none", 1, False).overrides()}


def test_seven_b_on_8_nodes_of_8_h100_uses_the_recommended_layout():
    cfg = load_config("configs/cola/llama_7b.yaml")
    best = plan.rank_layouts(cfg, plan.Cluster(nodes=8, gpus_per_node=8, gpu_memory_gib=80))[0]
    assert best.fits
    assert _layout_in_sbatch("launch/slurm/cola_7b.sbatch") == best.layout.overrides()
    assert _layout_in_pytorchjob("launch/k8s/pytorchjob.yaml") == best.layout.overrides()
    with open(os.path.join(REPO, "docs", "launching.md")) as f:
        assert " ".join(best.layout.overrides()) in f.read()


@pytest.mark.parametrize("target,args", [
    ("launch/slurm/cola_7b.sbatch", ["--config", "configs/cola/llama_7b.yaml", "--nodes", "8", "--render-slurm"]),
    ("launch/k8s/pytorchjob.yaml", ["--config", "configs/cola/llama_7b.yaml", "--nodes", "8", "--render-k8s"]),
    ("launch/slurm/cola_1b.sbatch", ["--config", "configs/cola/llama_1b.yaml", "--nodes", "1", "--render-slurm"]),
])
def test_launch_files_are_rendered_from_the_current_templates(tmp_path, monkeypatch, target, args):
    """The committed launch files are what cola-plan renders now (re-render with the command in their header)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / os.path.basename(target)
    assert plan.main([*args, str(out), "--top", "1"]) == 0
    with open(os.path.join(REPO, target)) as f:
        committed = f.read()
    rendered = out.read_text().replace(str(out), target)
    assert rendered == committed, f"{target} is stale: re-render it with the command in its header"


def test_cli_json_ranks_fitting_layouts_first(capsys):
    base = ["--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "2", "--json", "--top", "1000",
            "--reserve-gib", "0"]
    assert plan.main(base) == 0
    totals = sorted(r["memory_gib"]["total"] for r in json.loads(capsys.readouterr().out))
    limit = totals[len(totals) // 2]  # a GPU that fits about half of the layouts
    assert plan.main([*base, "--gpu-memory-gib", str(limit)]) == 0
    ranked = json.loads(capsys.readouterr().out)
    fits = [r["fits"] for r in ranked]
    assert fits == sorted(fits, reverse=True) and fits[0] and not fits[-1]
    assert all(r["memory_gib"]["total"] <= limit for r in ranked if r["fits"])
    steps = [r["step_s"] for r in ranked if r["fits"]]
    assert steps == sorted(steps)
    cfg = load_config("configs/demo.yaml", ranked[0]["overrides"], world_size=2)  # a valid cola-train layout
    assert cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel <= 2


def test_cli_evaluate_prints_the_configs_own_layout(capsys):
    assert plan.main(["--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "2", "--evaluate",
                      "parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "train.micro_batch_size=4",
                      "train.global_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "TP2 PP1 DP1 SP none mb4" in out and "1 layouts" in out


def test_cli_bad_input_is_one_clear_error(capsys):
    assert plan.main(["--config", "configs/demo.yaml", "model.hiden_size=3"]) == 2
    assert "did you mean 'model.hidden_size'" in capsys.readouterr().err
    # No layout of 3 GPUs divides a global batch of 32.
    assert plan.main(["--config", "configs/demo.yaml", "--nodes", "3", "--gpus-per-node", "1",
                      "train.global_batch_size=32", "train.micro_batch_size=4"]) == 1
    assert "no layout" in capsys.readouterr().err
    assert plan.main(["--config", "configs/demo.yaml", "--recompute", "some"]) == 2


def test_render_repeats_list_lines_and_refuses_unknown_placeholders():
    text = "a={{A}}\n  - \"{{ITEMS}}\"\nend\n"
    assert plan.render(text, {"A": 1, "ITEMS": ["x", "y"]}) == 'a=1\n  - "x"\n  - "y"\nend\n'
    with pytest.raises(KeyError, match="MISSING"):
        plan.render("{{MISSING}}", {})


def test_tools_wrapper_runs():
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan.py"), "--config", "configs/demo.yaml",
                             "--nodes", "1", "--gpus-per-node", "1", "--top", "3"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "best:" in result.stdout


# --------------------------------------------------------------------------------------------------------------
# Step time from measured kernels: the breakdown, recalibration, and what changes it


def test_explain_and_json_break_the_step_down(capsys):
    args = ["--config", "configs/dense/llama_1b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--evaluate",
            "train.micro_batch_size=32"]
    assert plan.main([*args, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    parts = row["step_breakdown_s"]
    assert {"gemm_qkv", "gemm_proj", "gemm_fc1", "gemm_fc2", "gemm_output", "attention", "elementwise", "optimizer",
            "tensor_parallel", "pipeline", "data_parallel_exposed", "bubble"} == set(parts)
    assert sum(parts.values()) == pytest.approx(row["step_s"], rel=1e-9) and row["step_calibrated"]
    # The paper's 5461-wide MLP GEMMs dominate the dense 1B step (the H100 data: about 140 TFLOP/s).
    assert parts["gemm_fc1"] + parts["gemm_fc2"] > 0.6 * row["step_s"]
    assert plan.main([*args, "--explain"]) == 0
    captured = capsys.readouterr()
    assert "step time of TP1 PP1 DP1 none mb32" in captured.out and "GEMMs fc1" in captured.out
    assert "pipeline bubble" in captured.out and "optimizer step" in captured.out
    assert "warning: model.ffn_hidden_size=5461" in captured.err


def _step(cfg, layout, cluster=None):
    return plan.estimate(cfg, layout, cluster or plan.Cluster(nodes=1, gpus_per_node=1)).step_s


def test_padding_the_1b_ffn_and_pure_bf16_shorten_the_step():
    layout = plan.Layout(1, 1, 1, None, False, "none", 32, False)
    paper = load_config("configs/dense/llama_1b.yaml")
    padded = load_config("configs/dense/llama_1b.yaml", ["model.ffn_multiple_of=128"])
    assert _step(padded, layout) < 0.5 * _step(paper, layout)  # more FLOPs, but on the fast kernels
    pure = load_config("configs/cola/llama_1b.yaml", ["train.pure_bf16=true"])
    mixed = load_config("configs/cola/llama_1b.yaml")
    assert plan.estimate(pure, layout, plan.Cluster()).optimizer_s < plan.estimate(mixed, layout,
                                                                                    plan.Cluster()).optimizer_s


def test_kernel_data_recalibrates_and_another_gpu_is_uncalibrated(tmp_path, capsys):
    """Halving every measured GEMM time (a GPU twice as fast at GEMMs) shortens the predicted GEMM time by half
    less the launch cost; a peak the data do not describe marks the estimate uncalibrated."""
    from cola_megatron.cost import kernels

    rows = [json.loads(line) for line in open(kernels.shipped_kernel_data())]
    faster = tmp_path / "faster.jsonl"
    faster.write_text("".join(json.dumps({**r, "us": r["us"] / 2} if r["probe"] == "gemm" else r) + "\n"
                              for r in rows))
    cfg, layout = load_config("configs/cola/llama_1b.yaml"), plan.Layout(1, 1, 1, None, False, "none", 32, False)
    base = plan.estimate(cfg, layout, plan.Cluster(nodes=1, gpus_per_node=1))
    fast = plan.estimate(cfg, layout, plan.Cluster(nodes=1, gpus_per_node=1, kernel_data=str(faster)))
    gemm = lambda e: sum(v for k, v in e.breakdown().items() if k.startswith("gemm_"))  # noqa: E731
    assert 0.45 < gemm(fast) / gemm(base) < 0.55 and fast.calibrated
    assert fast.memory.total == base.memory.total
    args = ["--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "1", "--top", "1"]
    assert plan.main([*args, "--gpu-tflops", "2250"]) == 0
    assert "step times are uncalibrated" in capsys.readouterr().err
    assert plan.main(args) == 0
    assert "uncalibrated" not in capsys.readouterr().err
