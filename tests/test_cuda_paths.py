"""The branches that run only on CUDA, run on a CPU.

torch.cuda's functions are faked with what a one-GPU machine answers (device name and properties, allocator
statistics, events), and the CPU bridge, installed by the in-process gloo group, places every "cuda" tensor on the
CPU. So code given ``torch.device("cuda", 0)`` takes its CUDA branches here, with real models and training steps,
and a type or device mix-up in such a branch fails the suite. docs/gpu-check.md lists the branches and the test
that reaches each. Timings are never asserted.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch

from cola_megatron.analysis import bench, compare, gpu_check, gpu_phases
from cola_megatron.compat import megatron as compat_megatron
from cola_megatron.training import metrics

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
H100 = "NVIDIA H100 80GB HBM3"


# --------------------------------------------------------------------------------------------------------------
# A faked CUDA


class FakeEvent:
    def __init__(self, enable_timing=False):
        self.at = None

    def record(self, stream=None):
        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):  # milliseconds, as torch.cuda.Event reports
        return 1e3 * (end.at - self.at)


class FakeCuda:
    """torch.cuda as one GPU answers. The caching allocator is a ledger: ``allocate``/``free`` move the bytes in
    use, the peaks follow them, and ``reset_peak_memory_stats`` starts the peaks at what is in use, as CUDA's does;
    reserved memory keeps ``cache`` bytes more than allocated until ``empty_cache``."""

    def __init__(self, monkeypatch, name: str = H100):
        self.in_use = self.peak = self.reserved_peak = 0
        self.cache = 64 * 2**20
        self.calls = []
        c = torch.cuda
        for attr, fake in {
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "get_device_name": lambda device=None: name,
            "get_device_properties": lambda device=None: types.SimpleNamespace(
                major=9, minor=0, multi_processor_count=132, total_memory=80 * GIB, name=name),
            "set_device": lambda device: self.calls.append(("set_device", torch.device(device))),
            "synchronize": lambda device=None: self.calls.append(("synchronize", device)),
            "Event": FakeEvent,
            "max_memory_allocated": lambda device=None: self.peak,
            "max_memory_reserved": lambda device=None: self.reserved_peak,
            "reset_peak_memory_stats": self._reset,
            "empty_cache": lambda: self.calls.append("empty_cache"),
        }.items():
            monkeypatch.setattr(c, attr, fake)

    def allocate(self, nbytes: int) -> None:
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)
        self.reserved_peak = max(self.reserved_peak, self.in_use + self.cache)

    def free(self, nbytes: int) -> None:
        self.in_use -= nbytes

    def _reset(self, device=None):
        self.calls.append(("reset_peak_memory_stats", device))
        self.peak, self.reserved_peak = self.in_use, self.in_use + self.cache


def _param_bytes(model_chunks) -> int:
    return sum(p.numel() * p.element_size() for chunk in model_chunks for p in chunk.parameters())


def _own_rendezvous(monkeypatch):
    """initialize_distributed sets MASTER_ADDR/MASTER_PORT when absent; they go with the test, so no later
    subprocess inherits a port this process still listens on."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gloo(monkeypatch):
    """An in-process gloo group with the CPU bridge (as tests/test_model.py has it), destroyed afterwards."""
    from cola_megatron.training.distributed import destroy_distributed, initialize_distributed

    _own_rendezvous(monkeypatch)
    initialize_distributed(seed=1234, device="cpu")
    yield
    destroy_distributed()


@pytest.fixture
def cuda(monkeypatch, gloo):
    return FakeCuda(monkeypatch)


@pytest.fixture
def trainers_allocate(monkeypatch, cuda):
    """Every Trainer "allocates" its parameters' bytes on the fake GPU and frees them when it is collected, so a
    peak that includes an earlier trainer, or misses a reset, shows in the numbers."""
    from cola_megatron.training import trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        nbytes = _param_bytes(self.model)
        cuda.allocate(nbytes)
        weakref.finalize(self, cuda.free, nbytes)
        sizes.append(nbytes)

    sizes = []
    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    return sizes


# --------------------------------------------------------------------------------------------------------------
# Memory statistics: one record type for the trainer, cola-bench and the GPU check


def test_peak_memory_is_one_numeric_record_on_cuda_and_on_cpu(cuda):
    cuda.allocate(3 * GIB)
    gpu = metrics.peak_memory(torch.device("cuda", 0))
    assert gpu == metrics.PeakMemory(allocated_gib=3.0, reserved_gib=3.0 + cuda.cache / GIB, since_reset=True)
    assert gpu.record() == {"peak_mem_gib": 3.0, "peak_mem_reserved_gib": 3.0 + cuda.cache / GIB}
    host = metrics.peak_memory(torch.device("cpu"))
    assert isinstance(host.allocated_gib, float) and host.allocated_gib > 0
    assert host.reserved_gib is None and not host.since_reset
    cuda.free(2 * GIB)
    metrics.reset_peak_memory(torch.device("cuda", 0))
    assert metrics.peak_memory(torch.device("cuda", 0)).allocated_gib == 1.0
    assert cuda.calls[-2:] == ["empty_cache", ("reset_peak_memory_stats", torch.device("cuda", 0))]


def test_cola_bench_runs_end_to_end_on_cuda_with_numeric_peak_memory_and_ratios(trainers_allocate, cuda, tmp_path,
                                                                                capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cuda", "--precision", "fp32", "--variants", "cola,dense",
                       "--warmup", "0", "--steps", "1", "--micro-batch", "2", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["header"]["device"] == H100
    assert ("set_device", torch.device("cuda", 0)) in cuda.calls
    # The discarded first run, then cola and dense: each peak is that trainer's own bytes (the earlier trainers
    # were collected and the peak reset before it was built).
    cola_bytes, dense_bytes = trainers_allocate[1:]
    by = {r["variant"]: r for r in data["results"]}
    assert by["cola"]["peak_mem_gib"] == cola_bytes / GIB and by["dense"]["peak_mem_gib"] == dense_bytes / GIB
    assert by["cola"]["peak_reserved_gib"] == (cola_bytes + cuda.cache) / GIB
    for r in data["results"]:  # MFU against the H100's 989 TFLOP/s, looked up by the faked name
        assert r["mfu"] == pytest.approx(100 * r["tflops_per_gpu"] / 989.0)
    row = next(line for line in stdout.splitlines() if line.startswith("dense "))
    assert float(row.split()[-1]) == pytest.approx(dense_bytes / GIB, abs=0.005)
    assert "ratio dense/cola: throughput" in stdout
    assert f"peak memory {dense_bytes / cola_bytes:.2f}x" in stdout


def _context(tmp_path, phase: str, cpu: bool = True, backend: str = "aot_eager") -> gpu_phases.PhaseContext:
    settings = {"cpu": cpu, "deadline": time.time() + 3600, "work_dir": str(tmp_path / "work"),
                "out_dir": str(tmp_path), "compile_backend": backend, "ffn_multiple_of": None}
    return gpu_phases.PhaseContext(phase, settings, str(tmp_path / "results.jsonl"))


def _records(tmp_path):
    return gpu_check.read_records(str(tmp_path / "results.jsonl"))


def _table_rows(summary: str, title: str):
    """The rows of the markdown table under ``## title`` as lists of cells."""
    section = summary.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_gpu_check_speed_memory_and_summary_on_cuda_have_numeric_peak_columns(trainers_allocate, cuda, tmp_path,
                                                                              monkeypatch):
    from cola_megatron.training.distributed import initialize_distributed

    ctx = _context(tmp_path, "speed_7b")  # tiny shapes; the device is the GPU
    monkeypatch.setattr(ctx, "device", lambda: initialize_distributed(seed=gpu_phases.SEED, device="cuda"))
    gpu_phases.speed(ctx)
    gpu_phases.memory(_context(tmp_path, "memory", cpu=False))  # cola-plan's GPU model; no device needed
    records = _records(tmp_path)
    dense_bytes, cola_bytes = trainers_allocate[1:]
    speed = {r["variant"]: r for r in records if r["kind"] == "speed"}
    assert speed["cola"]["peak_mem_gib"] == cola_bytes / GIB
    assert speed["cola"]["peak_reserved_gib"] == (cola_bytes + cuda.cache) / GIB
    memory = {r["variant"]: r for r in records if r["kind"] == "memory"}
    assert memory["cola"]["measured_gib"] == cola_bytes / GIB and math.isfinite(memory["cola"]["error"])

    summary = gpu_check.format_summary(records + gpu_check.evaluate_targets(records), "test")
    header, dense, cola = _table_rows(summary, "Speed, 7B shapes (4 layers)")
    columns = dict(zip(header, cola))
    assert float(columns["peak alloc GiB"]) == pytest.approx(cola_bytes / GIB, abs=0.005)
    assert float(columns["peak reserved GiB"]) == pytest.approx((cola_bytes + cuda.cache) / GIB, abs=0.005)
    assert float(columns["peak alloc / dense"]) == pytest.approx(cola_bytes / dense_bytes, abs=0.005)
    assert float(columns["throughput / dense"]) > 0
    (_, *rows) = _table_rows(summary, "Memory model (cola-plan) against measured peaks")
    assert [float(r[4]) for r in rows] == pytest.approx([dense_bytes / GIB, cola_bytes / GIB], abs=0.005)


def test_profile_on_cuda_ranks_kernels_by_gpu_time(cuda, tmp_path, monkeypatch):
    """The speed phases' profile on a GPU: CUDA activity asked for, kernels (device type CUDA) ranked by their self
    device time. This CPU build of torch traces no kernels, so the profile's events are a GPU's, faked."""
    from torch import profiler as torch_profiler

    kernels = [types.SimpleNamespace(key=k, count=c, self_device_time_total=t, self_cpu_time_total=1e9,
                                     device_type="DeviceType.CUDA")
               for k, c, t in (("ampere_bf16_gemm", 12, 3000.0), ("flash_fwd_kernel", 4, 1000.0))]
    host_op = types.SimpleNamespace(key="aten::mm", count=12, self_device_time_total=0.0, self_cpu_time_total=5e6,
                                    device_type="DeviceType.CPU")
    asked = []

    class Profile:
        def __init__(self, activities, **kwargs):
            asked.extend(activities)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [host_op, kernels[1], kernels[0]]

    monkeypatch.setattr(torch_profiler, "profile", Profile)
    ctx = _context(tmp_path, "speed_1b")
    cfg = bench.variant_config(gpu_phases._speed_base(ctx, "cola/llama_1b.yaml"), "cola", 2, 2, None, "fp32", None)
    gpu_phases._profile(ctx, cfg, "cola", torch.device("cuda", 0))
    (profile,) = [r for r in _records(tmp_path) if r["kind"] == "profile"]
    assert torch_profiler.ProfilerActivity.CUDA in asked and profile["sorted_by"] == "self GPU time"
    assert [(r["name"], r["calls"], r["ms"], r["share"]) for r in profile["rows"]] == [
        ("ampere_bf16_gemm", 12, 3.0, 0.75), ("flash_fwd_kernel", 4, 1.0, 0.25)]


def test_gpu_check_without_a_gpu_is_one_line_before_any_work(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2  # this machine has no CUDA device
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu-check: error: no CUDA device is visible. Fix: run on a GPU machine, or pass --cpu for the CPU check"]
    assert not (tmp_path / "out").exists()


def test_quality_phase_resets_the_peak_before_each_run(cuda, tmp_path, monkeypatch):
    """Three train_run calls in one process: each recorded peak is that run's own, not the largest so far."""
    usage = {"dense": 5 * GIB, "cola": 3 * GIB, "cola_m": 2 * GIB}  # the first run is the largest
    device = torch.device("cuda", 0)

    class FakeTrainer:
        def __init__(self, name):
            self.state = types.SimpleNamespace(iteration=2)
            self.history = [5.0, 4.0]
            cuda.allocate(usage[name])
            weakref.finalize(self, cuda.free, usage[name])
            peaks[name] = torch.cuda.max_memory_allocated(device) / GIB

    def train_run(cfg):
        return FakeTrainer(Path(cfg.logging.log_dir).name)

    def bench_variant(cfg, name, dev, warmup, steps):
        return types.SimpleNamespace(step_ms=1.0)

    def summarize(run):
        return types.SimpleNamespace(tokens=1, final_valid_loss=4.0, final_valid_ppl=55.0, mean_tokens_per_s=1.0,
                                     peak_mem_gib=peaks[run])

    peaks = {}
    monkeypatch.setattr(gpu_phases, "corpus_available", lambda: True)
    monkeypatch.setattr(gpu_phases, "train_run", train_run)
    monkeypatch.setattr(gpu_phases.bench, "bench_variant", bench_variant)
    monkeypatch.setattr(compare, "load_run", lambda name, path: name)
    monkeypatch.setattr(compare, "summarize", summarize)
    monkeypatch.setattr(compare, "compare_runs", lambda *a, **k: None)
    monkeypatch.setattr(gpu_phases, "destroy_distributed", lambda: None)
    ctx = _context(tmp_path, "quality")
    monkeypatch.setattr(ctx, "device", lambda: device)
    gpu_phases.quality(ctx)
    recorded = {r["variant"]: r["peak_mem_gib"] for r in _records(tmp_path) if r["kind"] == "quality"}
    assert recorded == {name: nbytes / GIB for name, nbytes in usage.items()}


# --------------------------------------------------------------------------------------------------------------
# Device selection, NCCL set-up, the CPU bridge


def test_cuda_work_gets_nccl_and_its_local_rank_and_no_cpu_bridge(monkeypatch):
    from megatron.core import parallel_state, tensor_parallel

    from cola_megatron.compat import cpu as cpu_bridge
    from cola_megatron.training import distributed

    calls = []
    _own_rendezvous(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kw: calls.append(("megatron", kw)))
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: calls.append(("seed", seed)))
    monkeypatch.setattr(cpu_bridge, "install", lambda: calls.append("cpu bridge"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.resolve_device("auto") == torch.device("cuda", 1)
    assert distributed.initialize_distributed(tensor_parallel=2, seed=7, device="auto") == torch.device("cuda", 1)
    assert calls[:2] == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    assert calls[2][1]["tensor_model_parallel_size"] == 2 and calls[3] == ("seed", 7) and "cpu bridge" not in calls
    # CPU work on the same machine: gloo and the bridge.
    calls.clear()
    assert distributed.initialize_distributed(seed=7, device="cpu") == torch.device("cpu")
    assert calls[:2] == ["cpu bridge", ("init", "gloo")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        distributed.resolve_device("cuda")


def test_cpu_work_on_a_gpu_machine_builds_its_weights_on_the_cpu(cuda):
    from cola_megatron.config import load_config
    from cola_megatron.models.build import transformer_config

    # The bridge is installed (the gloo fixture): CPU work, although torch.cuda.is_available() says True.
    assert transformer_config(load_config(None, ["data.mock=true"])).use_cpu_initialization


def _fake_gpu_env(tmp_path: Path) -> dict:
    """A child whose torch.cuda.is_available() answers True on this machine without a GPU."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    path = [str(site), os.environ.get("PYTHONPATH", ""), str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


def test_cpu_tool_completes_on_the_cpu_where_cuda_is_available(tmp_path):
    """tools/comm_report.py's gloo ranks (use_cpu_initialization=False: weights on torch.cuda.current_device())
    must stay on the CPU on a GPU machine; before the bridge followed the device they built on cuda:0."""
    env = _fake_gpu_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "True"
    out = subprocess.run([sys.executable, "tools/comm_report.py", "--d", "64", "--r", "16", "--ffn", "176",
                          "--heads", "4", "--seq", "8", "--micro-batch", "1", "--tp", "2", "--sp"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for arch in ("dense", "pair", "bottleneck"):  # measured bytes equal the analytic ones
        assert any(re.match(rf"{arch}\s+\d+\s+\d+\s+\d+\s+\d+\s+yes$", line) for line in lines), out.stdout
    assert lines[-1] == "ratio bottleneck/dense: 0.35"


# --------------------------------------------------------------------------------------------------------------
# Peak FLOPs, device names, synchronisation, profiler, RNG state


PEAKS = [  # names as torch.cuda.get_device_name() reports them
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA H20", 148.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),  # not the A10's figure
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("Tesla V100-SXM2-32GB", 125.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GB200", 2450.0),
    ("NVIDIA T4", None),
]


@pytest.mark.parametrize("name,peak", PEAKS)
def test_peak_tflops_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_tflops(device=torch.device("cuda", 0)) == peak
    assert metrics.device_name(torch.device("cuda", 0)) == f"cuda ({name})"


def test_peak_tflops_is_none_for_cpu_work_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    assert metrics.peak_tflops(device=torch.device("cpu")) is None
    assert metrics.peak_tflops(2.0, torch.device("cpu")) == 2.0


def test_cuda_timer_and_trainer_sync_use_the_device(cuda):
    from cola_megatron.training.trainer import Trainer

    device = torch.device("cuda", 0)
    stop = bench._timer(device)
    time.sleep(0.01)
    assert stop() >= 0.01 and ("synchronize", device) in cuda.calls
    cuda.calls.clear()
    Trainer._sync_device(types.SimpleNamespace(device=device))
    assert cuda.calls == [("synchronize", device)]


def test_step_profiler_on_cuda_records_cuda_activity_and_a_memory_snapshot(cuda, tmp_path, monkeypatch):
    from torch import profiler as torch_profiler

    from cola_megatron.config import load_config
    from cola_megatron.training.profiling import StepProfiler

    history, asked = [], []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: history.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: Path(path).write_bytes(b"snapshot"))
    real_profile = torch_profiler.profile

    def profile(activities, **kwargs):  # this CPU build of torch has no CUDA activity to trace
        asked.extend(activities)
        return real_profile(activities=[torch_profiler.ProfilerActivity.CPU], **kwargs)

    monkeypatch.setattr(torch_profiler, "profile", profile)
    cfg = load_config(None, ["data.mock=true", f"logging.log_dir={tmp_path}", "train.profile.enabled=true",
                             "train.profile.start_step=1", "train.profile.end_step=1",
                             "train.profile.memory_snapshot=true"])
    profiler = StepProfiler(cfg, 0, torch.device("cuda", 0))
    assert profiler.sort_by == "self_cuda_time_total"
    profiler.before_step(1)
    torch.randn(8, 8) @ torch.randn(8, 8)
    profiler.after_step(1)
    files = {p.name for p in Path(profiler.dir).iterdir()}
    assert {"rank0.memory_snapshot.pickle", "rank0.ops.txt"} <= files and history == ["all", None]
    assert torch_profiler.ProfilerActivity.CUDA in asked
    # CPU work on the same machine: no CUDA activity, no snapshot.
    cpu = StepProfiler(cfg, 0, torch.device("cpu"))
    assert not cpu.memory and not cpu.cuda_activity and cpu.sort_by == "self_cpu_time_total"


def test_rng_state_has_the_cuda_generator_only_where_the_process_uses_cuda(monkeypatch, gloo):
    from cola_megatron.training.checkpoint import state

    cuda_state = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: restored.append(s))
    saved = state.rng_state()
    assert saved["cuda"] is cuda_state
    state.set_rng_state(saved)
    assert restored == [cuda_state]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # CPU work where a GPU is visible
    assert "cuda" not in state.rng_state()


# --------------------------------------------------------------------------------------------------------------
# The GPU check: environment, SDPA backend, compile pre-check, the fork probe


def _events(*names):
    return [types.SimpleNamespace(key=n) for n in names]


def test_sdpa_backends_see_math_next_to_a_fused_kernel():
    flash = "aten::_scaled_dot_product_flash_attention"
    math_op = "aten::_scaled_dot_product_attention_math"
    assert gpu_phases._sdpa_backends(_events("aten::scaled_dot_product_attention", flash,
                                             "aten::_flash_attention_forward")) == ["flash"]
    assert gpu_phases._sdpa_backends(_events(flash, math_op, "aten::bmm")) == ["flash", "math"]
    assert gpu_phases._sdpa_backends(_events(math_op)) == ["math"]
    assert gpu_phases._sdpa_backends(_events("aten::_scaled_dot_product_cudnn_attention",
                                             "aten::_scaled_dot_product_efficient_attention")) == ["cudnn", "efficient"]
    assert gpu_phases._sdpa_backends(_events("aten::bmm", "aten::softmax")) == ["math"]


def test_environment_phase_on_cuda_records_the_gpu_its_peak_and_the_attention_it_ran(cuda, tmp_path, monkeypatch):
    ctx = _context(tmp_path, "environment", cpu=False, backend="inductor")  # PhaseContext.device: CUDA
    monkeypatch.setattr(gpu_phases.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    monkeypatch.delenv("CC", raising=False)
    gpu_phases.environment(ctx)
    records = _records(tmp_path)
    (info,) = [r for r in records if r["kind"] == "info"]
    assert (info["gpu"], info["capability"], info["memory_gib"], info["peak_bf16_tflops"]) == (H100, "9.0", 80.0, 989.0)
    assert info["host_compiler"] == "/usr/bin/gcc" and not [r for r in records if r["kind"] == "note"]
    (sdpa,) = [r for r in records if r["kind"] == "check"]
    # The "GPU" is this CPU: its flash kernel (or, where torch's CPU flash cannot run bf16, the math kernel) is not a
    # GPU one, and the check says so instead of passing.
    from cola_megatron.compat.sdpa import cpu_flash_runs_bf16

    assert sdpa["status"] == "failed" and sdpa["value"] == ("flash (CPU)" if cpu_flash_runs_bf16() else "math")


def test_compile_precheck_is_one_note_and_compile_phases_skip(tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(gpu_phases.shutil, "which", lambda name: None)
    assert gpu_phases.host_compiler(cpu=False) is None
    blocker = gpu_phases.compile_blocker("inductor", cpu=False)
    assert "no host C compiler" in blocker and "Fix: install gcc" in blocker
    assert gpu_phases.compile_blocker("aot_eager", cpu=False) is None  # builds nothing
    assert "C++" in gpu_phases.compile_blocker("inductor", cpu=True)

    ctx = _context(tmp_path, "speed_compile", cpu=False, backend="inductor")
    monkeypatch.setattr(ctx, "device", lambda: pytest.fail("a skipped phase must not start the device"))
    gpu_phases.speed(ctx)
    gpu_phases.compiled_check(ctx, torch.device("cuda", 0))
    records = _records(tmp_path)
    assert [r["text"] for r in records if r["kind"] == "note"] == [f"dense_compile, cola_compile: not run, {blocker}"]
    (check,) = [r for r in records if r["kind"] == "check"]
    assert check["status"] == "skipped" and check["detail"] == f"skipped: {blocker}"
    assert not [r for r in records if r["kind"] == "speed"]

    monkeypatch.setattr(gpu_phases.shutil, "which", lambda name: "/usr/bin/clang" if name == "clang" else None)
    assert gpu_phases.host_compiler(cpu=False) == "/usr/bin/clang"  # Triton's second choice
    monkeypatch.setenv("CC", "/opt/cc/bin/mycc -O2")
    monkeypatch.setattr(gpu_phases.shutil, "which", lambda name: name if name == "/opt/cc/bin/mycc" else None)
    assert gpu_phases.host_compiler(cpu=False) == "/opt/cc/bin/mycc"  # $CC first, as Triton does


def test_runner_falls_back_to_fresh_interpreters_where_forked_cuda_fails(tmp_path):
    """On a GPU the runner first checks that a forked child can use CUDA; here (no CUDA) that probe fails for real,
    and the phases must still run, each in a fresh interpreter."""
    outcomes = gpu_check.run_phases([gpu_check.Phase("fine", "", 1, 120)], {"cpu": False, "work_dir": str(tmp_path)},
                                    str(tmp_path), budget_s=120, module="tests.gpu_check_stub")
    assert [(o["phase"], o["status"]) for o in outcomes] == [("fine", "ok")]
    assert "phases start fresh interpreters" in (tmp_path / "phases.log").read_text()


# --------------------------------------------------------------------------------------------------------------
# The gradient norm: megatron's value, one host sync


class HostReads:
    """Counts device-to-host scalar reads: ``.item()``/``float()`` (aten::_local_scalar_dense, a sync on a GPU)
    and every tensor element handed to ``torch.tensor`` (each one read to the host, a sync per tensor on a GPU)."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.count = 0
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        original = torch.tensor

        def tensor(data, *args, **kwargs):
            counter.count += _tensor_leaves(data)
            return original(data, *args, **kwargs)

        self.mode = Mode()
        monkeypatch.setattr(torch, "tensor", tensor)

    def __enter__(self):
        self.count = 0
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _tensor_leaves(data) -> int:
    if isinstance(data, torch.Tensor):
        return data.numel()
    if isinstance(data, (list, tuple)):
        return sum(_tensor_leaves(d) for d in data)
    return 0


def _grads(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48,), (32, 17), (5,)]
    return [torch.randn(shapes[i % len(shapes)], generator=gen) * (i + 1) for i in range(count)]


@pytest.mark.numerics
def test_batched_grad_norm_equals_megatrons_with_one_host_sync(gloo, monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)  # megatron's fallback
    grads = _grads(40)
    megatron_norm = clip_grads.get_grad_norm_fp32(grads)
    assert compat_megatron.use_batched_grad_norm() and clip_grads.l2_norm_impl is compat_megatron.batched_l2_norm
    ours = clip_grads.get_grad_norm_fp32(grads)
    exact = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    # Both are fp32 sums of non-negative squares: the per-tensor sums of n_i terms and the sum of the k per-tensor
    # results each lose at most (n - 1) units of 2^-24 relatively (recursive summation's bound; pairwise and
    # vectorised orders lose less), and the square roots and the final .item() a few more units. So each is within
    # (max n_i + k + 8) * 2^-24 of the float64 norm, and the two within twice that of each other.
    bound = (max(g.numel() for g in grads) + len(grads) + 8) * 2.0**-24
    assert abs(megatron_norm - exact) <= bound * exact and abs(ours - exact) <= bound * exact
    assert abs(ours - megatron_norm) <= 2 * bound * exact

    reads = HostReads(monkeypatch)
    for count in (4, 40):
        with reads:
            clip_grads.get_grad_norm_fp32(_grads(count))
        assert reads.count == 1, count  # the final .item() after the all-reduce, whatever the number of tensors
    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    with reads:
        clip_grads.get_grad_norm_fp32(_grads(40))
    assert reads.count >= 40  # megatron's fallback reads one scalar per tensor


def test_batched_grad_norm_keeps_a_fused_multi_tensor_l2norm(monkeypatch):
    from megatron.core.optimizer import clip_grads

    fused = object()  # apex's or Transformer Engine's multi_tensor_l2norm
    monkeypatch.setattr(clip_grads, "l2_norm_impl", fused)
    assert not compat_megatron.use_batched_grad_norm() and clip_grads.l2_norm_impl is fused
    assert compat_megatron.batched_l2_norm(0, None, [[]], False)[0].tolist() == [0.0]


def test_training_steps_read_the_gradient_norm_with_one_host_sync(gloo, monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from cola_megatron.config import load_config
    from cola_megatron.training.run import build_data
    from cola_megatron.training.trainer import Trainer

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)  # as a fresh process has it
    cfg = load_config(None, [f"model.{k}={v}" for k, v in bench.TINY_MODEL.items()]
                      + ["data.mock=true", "train.micro_batch_size=1", "train.global_batch_size=1",
                         "train.train_iters=2", "logging.log_interval=1000", "train.precision=fp32"], world_size=1)
    trainer = Trainer(cfg, torch.device("cpu"), log=False)
    trainer.attach_data(build_data(cfg)[1])
    tensors = sum(1 for chunk in trainer.model for p in chunk.parameters() if p.requires_grad)
    reads = HostReads(monkeypatch)
    original = trainer.optimizer.get_grad_norm
    counts = []

    def get_grad_norm():
        with reads:
            norm = original()
        counts.append(reads.count)
        return norm

    monkeypatch.setattr(trainer.optimizer, "get_grad_norm", get_grad_norm)
    result = trainer.train_step()
    assert math.isfinite(result["grad_norm"]) and result["grad_norm"] > 0
    assert tensors > 10 and counts == [1]
    del trainer
    gc.collect()
