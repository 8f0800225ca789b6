"""The phases of ``tools/gpu_check.py`` (cola_megatron.analysis.gpu_check runs each in its own process and time box).

Each phase appends JSON records to the results file as it goes, so a phase killed at its deadline keeps what it
measured. Every run goes through the project's entry points: the bench harness (``bench.variant_config`` and
``bench.bench_variant``: a real Trainer, megatron schedule, DDP and optimizer), the model builder, ``cola-plan``'s
memory model, and the experiment's variants trained by ``training.run.run``. With ``cpu`` set the shapes are tiny
and the same code runs in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from cola_megatron.compat import quiet_megatron_notices

quiet_megatron_notices()

# Imported here so that the server every phase is forked from holds them already.
import torch  # noqa: E402

from cola_megatron.analysis import bench, compare, experiment, plan  # noqa: E402
from cola_megatron.cli import one_line  # noqa: E402
from cola_megatron.config import Config, config_from_dict, load_config  # noqa: E402
from cola_megatron.models import accounting  # noqa: E402
from cola_megatron.models.build import build_model, transformer_config  # noqa: E402
from cola_megatron.models.init import initialize_parameters  # noqa: E402
from cola_megatron.resources import shipped_config  # noqa: E402
from cola_megatron.training import metrics  # noqa: E402
from cola_megatron.training.distributed import destroy_distributed, initialize_distributed  # noqa: E402
from cola_megatron.training.run import run as train_run  # noqa: E402

GIB = 2**30
SEED = 1234
CORPUS = "data_cache/sample_corpus/bpe8192"
QUALITY_EXPERIMENT = "experiments/llama_60m.yaml"

# --------------------------------------------------------------------------------------------------------------
# Shapes and tolerances per mode (docs/gpu-check.md explains each number)

TINY_SHAPE = dict(hidden_size=64, ffn_hidden_size=176, num_layers=2, num_attention_heads=4, rank=16, seq_length=64)

CORRECTNESS = {
    "gpu": dict(shape=dict(hidden_size=256, ffn_hidden_size=688, num_layers=4, num_attention_heads=4, rank=64,
                           seq_length=256), micro_batch=8, steps=20, warmup=3, lr=3e-3, compile_steps=3,
                final_over_first=0.95),
    "cpu": dict(shape=TINY_SHAPE, micro_batch=2, steps=5, warmup=0, lr=1e-2, compile_steps=2, final_over_first=1.0),
}
TOLERANCE = {
    # bf16 compute with fp32 master weights against fp32: the largest relative loss difference over the steps.
    "bf16_loss": 0.02,
    "pure_bf16_loss": 0.05,
    "compile_loss": 0.01,
    # Recompute against none: ||g - g_none|| / ||g_none|| over all parameters.
    "fp32_grad": 1e-5,
    "bf16_grad": 3e-2,
}

# name -> (shipped config, variants with the baseline first, --layers, micro-batch, variants to profile)
SPEED = {
    "speed_1b": ("cola/llama_1b.yaml", ["dense", "cola", "cola_m", "cola_full"], None, 32, ["cola", "cola_m"]),
    "speed_7b": ("cola/llama_7b.yaml", ["dense", "cola"], 4, 32, ["cola"]),
    "speed_compile": ("cola/llama_1b.yaml", ["dense_compile", "cola_compile"], None, 32, []),
}
SPEED_STEPS = {"gpu": dict(warmup=3, steps=10, cpu_micro_batch=None),
               "cpu": dict(warmup=0, steps=1, cpu_micro_batch=2)}
PROFILE_TOP = 15

QUALITY = {
    "gpu": dict(extra=[], calibrate=(2, 3), min_steps=20, max_steps=None, margin_s=20.0),
    "cpu": dict(extra=[f"model.{k}={v}" for k, v in TINY_SHAPE.items()]
                + ["train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_iters=1"],
                calibrate=(0, 1), min_steps=2, max_steps=2, margin_s=5.0),
}


# --------------------------------------------------------------------------------------------------------------
# Records


class PhaseContext:
    def __init__(self, phase: str, settings: Dict, results_path: str):
        self.phase = phase
        self.settings = settings
        self.cpu = bool(settings["cpu"])
        self.mode = "cpu" if self.cpu else "gpu"
        self.deadline = float(settings["deadline"])
        self.results_path = results_path
        self.work_dir = os.path.join(settings["work_dir"], phase)
        self.out_dir = settings["out_dir"]
        os.makedirs(self.work_dir, exist_ok=True)

    def time_left(self) -> float:
        return self.deadline - time.time()

    def record(self, kind: str, **fields) -> None:
        with open(self.results_path, "a") as f:
            f.write(json.dumps({"phase": self.phase, "kind": kind, **fields}) + "\n")

    def check(self, name: str, passed: Optional[bool], value=None, tolerance=None, detail: str = "") -> None:
        """passed None records the check as skipped (detail says why)."""
        status = "skipped" if passed is None else ("passed" if passed else "failed")
        self.record("check", name=name, status=status, value=value, tolerance=tolerance, detail=detail)
        print(f"gpu-check: {self.phase}: {name}: {status} {'' if value is None else value} {detail}", flush=True)

    def note(self, text: str) -> None:
        self.record("note", text=text)
        print(f"gpu-check: {self.phase}: {text}", flush=True)

    def device(self) -> torch.device:
        return initialize_distributed(seed=SEED, device="cpu" if self.cpu else "cuda")


def run_phase(name: str, settings: Dict, results_path: str, log_path: str) -> None:
    """Process entry of one phase: own process group (the runner kills it whole), output into the log."""
    os.setpgid(0, 0)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    ctx = PhaseContext(name, settings, results_path)
    code = 0
    try:
        PHASES[name](ctx)
    except BaseException as error:  # recorded, and the phase's exit status says so
        ctx.record("error", message=one_line(f"{type(error).__name__}: {error}")[:800],
                   traceback=traceback.format_exc()[-6000:])
        traceback.print_exc()
        code = 1
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ctx.record("usage", cpu_s=round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
               max_rss_gib=round(own.ru_maxrss / 2**20, 2))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: process groups and compile workers go with the process


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def _read_jsonl(path: str) -> List[Dict]:
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def corpus_available() -> bool:
    return all(os.path.exists(os.path.join(CORPUS, f)) for f in ("train.bin", "valid.bin", "tokenizer.json"))


def _data_overrides() -> List[str]:
    if corpus_available():
        return ["model.vocab_size=8192", f"data.train_paths=[{CORPUS}/train]", "data.valid_paths=[]",
                f"data.tokenizer={CORPUS}/tokenizer.json"]
    return ["model.vocab_size=8192", "data.mock=true"]


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _max_relative_difference(values: Sequence[float], reference: Sequence[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, reference))


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """``train.torch_compile`` calls ``Module.compile()`` with torch's default backend (inductor); another backend
    (aot_eager on a CPU) is passed in here without touching the trainer."""
    if backend == "inductor":
        yield
        return
    original = torch.nn.Module.compile

    def compile_with_backend(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_with_backend
    try:
        yield
    finally:
        torch.nn.Module.compile = original


def hardware_flops_per_token(cfg: Config) -> Optional[float]:
    """The accounting module's hardware-FLOP count (recomputation included) when it offers one, else None."""
    fn = getattr(accounting, "hardware_flops_per_token", None)
    if not callable(fn):
        return None
    for arg in (cfg.model, cfg):
        try:
            return float(fn(arg))
        except (TypeError, AttributeError):
            continue
    return None


def _gradients(cfg: Config, device: torch.device, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Parameter gradients of one forward/backward of a freshly built model (megatron's Float16Module in bf16)."""
    from megatron.core.transformer.module import Float16Module

    tconfig = transformer_config(cfg, use_cpu_initialization=device.type == "cpu")
    model = build_model(cfg, tconfig)
    initialize_parameters([model], SEED, cfg.model.init_std)
    model = model.to(device)
    if cfg.train.mixed_precision:
        model = Float16Module(tconfig, model)
    inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    positions = torch.arange(inputs.shape[1], device=device).expand(inputs.shape[0], -1)
    loss = model(inputs, positions, None, labels=labels).float().mean()
    loss.backward()
    return {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}


def _gradient_error(grads: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> tuple:
    """(||g - g_ref|| / ||g_ref|| over all parameters, the worst tensor and its relative error)."""
    if sorted(grads) != sorted(reference):
        return math.inf, "different parameter sets", math.inf
    diff = sum(float((grads[n] - reference[n]).pow(2).sum()) for n in reference)
    norm = sum(float(reference[n].pow(2).sum()) for n in reference)
    worst = max(reference, key=lambda n: float((grads[n] - reference[n]).norm() / (reference[n].norm() + 1e-30)))
    worst_error = float((grads[worst] - reference[worst]).norm() / (reference[worst].norm() + 1e-30))
    return math.sqrt(diff / max(norm, 1e-30)), worst, worst_error


def _bench(cfg: Config, name: str, device: torch.device, warmup: int, steps: int):
    """One variant through the bench harness; also its peak reserved memory and hardware-FLOP utilisation."""
    start = time.monotonic()
    result = bench.bench_variant(cfg, name, device, warmup, steps)
    row = dataclasses.asdict(result)
    row["elapsed_s"] = round(time.monotonic() - start, 2)
    if row.get("hfu") is None:
        hw = hardware_flops_per_token(cfg)
        peak = metrics.peak_tflops(cfg.logging.peak_tflops, device)
        row["hfu"] = 100.0 * result.tokens_per_s * hw / 1e12 / peak if hw and peak else None
    return result, row


def predicted_step(cfg: Config, device: torch.device) -> Dict:
    """cola-plan's step time for this one-GPU run (the shipped kernel data, scaled when this GPU's peak differs)."""
    peak = metrics.peak_tflops(cfg.logging.peak_tflops, device) or 989.0
    cluster = plan.Cluster(nodes=1, gpus_per_node=1, gpu_tflops=peak)
    e = plan.estimate(cfg, plan.layout_of(cfg, 1), cluster)
    return {"predicted_step_ms": e.step_s * 1e3, "predicted_calibrated": e.calibrated,
            "predicted_breakdown_ms": {k: v * 1e3 for k, v in e.breakdown().items()}}


def _compiled(variant: str) -> bool:
    return bool(bench.VARIANTS[variant].get("torch_compile"))


def _shape_line(cfg: Config, micro_batch: int) -> str:
    m = cfg.model
    return (f"d={m.hidden_size} ffn={m.padded_ffn_hidden_size} r={m.rank} layers={m.num_layers} "
            f"heads={m.num_attention_heads} seq={m.seq_length} vocab={m.vocab_size} micro_batch={micro_batch} "
            f"{cfg.train.precision}")


# --------------------------------------------------------------------------------------------------------------
# Phase 1: environment


def host_compiler(cpu: bool) -> Optional[str]:
    """The host compiler torch.compile's default backend (inductor) builds with at run time, or None: on a GPU,
    Triton compiles its kernel launchers with $CC, else gcc, else clang; on a CPU, inductor writes C++ for $CXX,
    else g++ (c++ and clang++ are accepted too)."""
    variable, names = ("CXX", ("g++", "c++", "clang++")) if cpu else ("CC", ("gcc", "clang"))
    if os.environ.get(variable):
        return shutil.which(os.environ[variable].split()[0])
    return next((path for path in map(shutil.which, names) if path), None)


def compile_blocker(backend: str, cpu: bool) -> Optional[str]:
    """Why the compile checks and compiled speed runs cannot run here (one note, the fix in it), or None."""
    if backend != "inductor" or host_compiler(cpu):
        return None
    if cpu:
        return ("no host C++ compiler ($CXX, g++, c++ or clang++): torch.compile's inductor writes C++ on a CPU, so "
                "the compile phases are skipped. Fix: install g++, or pass --compile-backend aot_eager")
    return ("no host C compiler ($CC, gcc or clang): Triton builds its kernel launchers with one at run time, so the "
            "compile phases are skipped. Fix: install gcc (apt-get install gcc) or set CC")


def _sdpa_backends(events: Sequence) -> List[str]:
    """SDPA backends a profile's events (``prof.key_averages()``: anything with a ``key``) show. Every kernel that
    ran is listed, so attention that ran partly in math (``aten::_scaled_dot_product_attention_math``) next to a
    fused kernel shows both; math also when no SDPA op ran at all (attention outside SDPA is unfused)."""
    found = set()
    for name in (e.key for e in events):
        if "_scaled_dot_product_attention_math" in name:
            found.add("math")
        elif "_scaled_dot_product_flash_attention_for_cpu" in name:
            found.add("flash (CPU)")
        elif "_scaled_dot_product_flash_attention" in name or "_flash_attention_forward" in name:
            found.add("flash")
        elif "_scaled_dot_product_cudnn_attention" in name or "_cudnn_attention_forward" in name:
            found.add("cudnn")
        elif "_scaled_dot_product_efficient_attention" in name or "_efficient_attention_forward" in name:
            found.add("efficient")
        elif "_scaled_dot_product_fused_attention_overrideable" in name:
            found.add("overrideable")
    return sorted(found) or ["math"]


def environment(ctx: PhaseContext) -> None:
    info = {
        "device": "cpu" if ctx.cpu else "cuda",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "megatron_core": _megatron_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if not ctx.cpu:
        gpu = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(gpu)
        info.update(gpu=torch.cuda.get_device_name(gpu), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / GIB, 1),
                    peak_bf16_tflops=metrics.peak_tflops(device=gpu))
    else:
        info.update(gpu=None, processor=platform.processor() or platform.machine())
    backend = ctx.settings["compile_backend"]
    info.update(compile_backend=backend, host_compiler=host_compiler(ctx.cpu))
    ctx.record("info", **info)
    blocker = compile_blocker(backend, ctx.cpu)
    if blocker:
        ctx.note(blocker)

    # The attention the model actually runs: one forward/backward of a CoLA layer at the 1B head size, profiled.
    device = ctx.device()
    shape = TINY_SHAPE if ctx.cpu else dict(hidden_size=512, ffn_hidden_size=1376, num_layers=1,
                                            num_attention_heads=8, rank=128, seq_length=256)
    precision = "fp32" if ctx.cpu else "bf16"
    cfg = load_config(None, [f"model.{k}={v}" for k, v in shape.items()]
                      + ["model.vocab_size=1024", f"train.precision={precision}", "data.mock=true"], world_size=1)
    tokens = torch.randint(0, 1024, (2, cfg.model.seq_length + 1), generator=torch.Generator().manual_seed(0))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _gradients(cfg, device, tokens)
    backends = _sdpa_backends(prof.key_averages())
    if ctx.cpu:
        ctx.check("SDPA backend is flash or cuDNN", None, value=",".join(backends),
                  detail=f"skipped on CPU (ran: {', '.join(backends)})")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ok = set(backends) <= {"flash", "cudnn"}
    detail = f"ran: {', '.join(backends)}"
    try:  # and the fused kernels alone can run the model's attention (raises when only math would do)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            _gradients(cfg, device, tokens)
    except RuntimeError as error:
        ok, detail = False, detail + f"; with only flash/cuDNN allowed: {one_line(error)[:200]}"
    ctx.check("SDPA backend is flash or cuDNN", ok, value=",".join(backends), detail=detail)


# --------------------------------------------------------------------------------------------------------------
# Phase 2: correctness


def _correctness_config(ctx: PhaseContext, arch: str, precision: str, pure_bf16: bool = False,
                        recompute: str = "none", compiled: bool = False, steps: Optional[int] = None) -> Config:
    c = CORRECTNESS[ctx.mode]
    steps = steps or c["steps"]
    overrides = [f"model.{k}={v}" for k, v in c["shape"].items()] + _data_overrides() + [
        f"model.arch={arch}", f"model.recompute={recompute}", f"train.precision={precision}",
        f"train.pure_bf16={str(pure_bf16).lower()}", f"train.torch_compile={str(compiled).lower()}",
        f"train.micro_batch_size={c['micro_batch']}", f"train.global_batch_size={c['micro_batch']}",
        f"train.train_iters={steps}", "train.eval_iters=0", f"train.seed={SEED}", f"optimizer.lr={c['lr']}",
        f"optimizer.warmup_iters={c['warmup']}", "logging.log_interval=1000000"]
    return load_config(None, overrides, world_size=1)


def correctness(ctx: PhaseContext) -> None:
    c = CORRECTNESS[ctx.mode]
    device = ctx.device()
    ctx.note(f"data: {'sample corpus' if corpus_available() else 'mock (sample corpus not found)'}; shape "
             + _shape_line(_correctness_config(ctx, 'cola', 'fp32'), c["micro_batch"]))

    # Training: bf16 (fp32 master weights) and pure bf16 against fp32, same data and seed.
    for arch in ("cola", "dense"):
        runs = {}
        for label, precision, pure in (("fp32", "fp32", False), ("bf16", "bf16", False), ("pure_bf16", "bf16", True)):
            cfg = _correctness_config(ctx, arch, precision, pure)
            runs[label] = bench.bench_variant(cfg, arch, device, 0, c["steps"]).losses
        ref = runs["fp32"]
        ctx.record("losses", arch=arch, **runs)
        ctx.check(f"{arch}: fp32 loss falls over {c['steps']} steps (last / first)",
                  _finite(ref) and ref[-1] < c["final_over_first"] * ref[0], value=ref[-1] / ref[0],
                  tolerance=c["final_over_first"])
        for label, key in (("bf16", "bf16_loss"), ("pure_bf16", "pure_bf16_loss")):
            error = _max_relative_difference(runs[label], ref) if _finite(runs[label]) else math.inf
            ctx.check(f"{arch}: {label} vs fp32 loss, largest relative difference", error <= TOLERANCE[key],
                      value=error, tolerance=TOLERANCE[key], detail=f"final {runs[label][-1]:.4f} vs {ref[-1]:.4f}")

    # Recomputation: CoLA-M and full recompute give none's gradients.
    tokens = torch.randint(0, 8192, (c["micro_batch"], c["shape"]["seq_length"] + 1),
                           generator=torch.Generator().manual_seed(0))
    for precision, key in (("fp32", "fp32_grad"), ("bf16", "bf16_grad")):
        reference = _gradients(_correctness_config(ctx, "cola", precision), device, tokens)
        for mode in ("cola_m", "full"):
            grads = _gradients(_correctness_config(ctx, "cola", precision, recompute=mode), device, tokens)
            error, worst, worst_error = _gradient_error(grads, reference)
            ctx.check(f"cola {precision}: {mode} gradients vs none (relative norm)", error <= TOLERANCE[key],
                      value=error, tolerance=TOLERANCE[key], detail=f"worst tensor {worst}: {worst_error:.2e}")

    compiled_check(ctx, device)


def compiled_check(ctx: PhaseContext, device: torch.device) -> None:
    """The compiled layer trains like the eager one (bf16, as benchmarked); skipped, with the fix, where the
    compiler torch.compile needs is missing."""
    c = CORRECTNESS[ctx.mode]
    steps = c["compile_steps"]
    backend = ctx.settings["compile_backend"]
    name = f"cola bf16: compiled ({backend}) vs eager loss over {steps} steps"
    blocker = compile_blocker(backend, ctx.cpu)
    if blocker:
        ctx.check(name, None, detail=f"skipped: {blocker}")
        return
    eager = bench.bench_variant(_correctness_config(ctx, "cola", "bf16", steps=steps), "cola", device, 0, steps)
    with compile_backend(backend):
        compiled = bench.bench_variant(_correctness_config(ctx, "cola", "bf16", compiled=True, steps=steps),
                                       "cola_compile", device, 0, steps)
    error = _max_relative_difference(compiled.losses, eager.losses) if _finite(compiled.losses) else math.inf
    ctx.check(name, error <= TOLERANCE["compile_loss"], value=error, tolerance=TOLERANCE["compile_loss"])


# --------------------------------------------------------------------------------------------------------------
# Phase 3: speed


def _speed_base(ctx: PhaseContext, config: str) -> Config:
    data = ["data.mock=true", "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null"]
    if ctx.cpu:
        return load_config(None, [f"model.{k}={v}" for k, v in bench.TINY_MODEL.items()] + data)
    return load_config(shipped_config(config), data)


def _profile(ctx: PhaseContext, cfg: Config, name: str, device: torch.device) -> None:
    """Top kernels (GPU) or ops (CPU) by self time over a short run of one variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        bench.bench_variant(cfg, name, device, 1, cfg.train.train_iters - 1)
    events = list(prof.key_averages())
    if device.type == "cuda":
        def self_time(e):
            for attr in ("self_device_time_total", "self_cuda_time_total"):
                if hasattr(e, attr):
                    return float(getattr(e, attr))
            return 0.0

        events = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))] or events
        sorted_by = "self GPU time"
    else:
        def self_time(e):
            return float(e.self_cpu_time_total)

        sorted_by = "self CPU time"
    total = sum(self_time(e) for e in events) or 1.0
    top = sorted(events, key=self_time, reverse=True)[:PROFILE_TOP]
    rows = [{"name": e.key, "calls": int(e.count), "ms": self_time(e) / 1e3, "share": self_time(e) / total}
            for e in top]
    ctx.record("profile", source_phase=ctx.phase, variant=name, sorted_by=sorted_by, rows=rows,
               detail=f"torch.profiler over building the variant and {cfg.train.train_iters} training steps "
                      f"(1 warm-up); total {total / 1e3:.1f} ms")


def speed(ctx: PhaseContext) -> None:
    config, names, layers, micro_batch, profiled = SPEED[ctx.phase]
    s = SPEED_STEPS[ctx.mode]
    micro_batch = s["cpu_micro_batch"] or micro_batch
    precision = "fp32" if ctx.cpu else "bf16"
    if ctx.cpu:  # the profiling path once, not its cost per variant
        profiled = profiled[:1] if ctx.phase == "speed_1b" else []
    backend = ctx.settings["compile_backend"]
    blocker = compile_blocker(backend, ctx.cpu)
    not_run = [n for n in names if _compiled(n)] if blocker else []
    if not_run:
        ctx.note(f"{', '.join(not_run)}: not run, {blocker}")
        names = [n for n in names if n not in not_run]
        profiled = [n for n in profiled if n in names]
    if not names:
        return
    base = _speed_base(ctx, config)

    def variant(name: str, steps: int) -> Config:
        return bench.variant_config(base, name, micro_batch, steps, layers, precision,
                                    ctx.settings.get("ffn_multiple_of"))

    configs = {name: variant(name, s["warmup"] + s["steps"]) for name in names}
    device = ctx.device()
    shape = _shape_line(configs[names[0]], micro_batch)
    with compile_backend(backend):
        # A discarded first run, as cola-bench does: first-use costs are not charged to the baseline (on a CPU
        # once per process is enough, and a compiled one would cost seconds of tracing).
        if not (ctx.cpu and configs[names[0]].train.torch_compile):
            bench.bench_variant(variant(names[0], s["warmup"] + 1), names[0], device, s["warmup"], 1)
        last_elapsed = 0.0
        for name in names:
            if ctx.time_left() < 1.2 * last_elapsed:
                ctx.note(f"{name}: not run, {ctx.time_left():.0f} s left in the box")
                continue
            result, row = _bench(configs[name], name, device, s["warmup"], s["steps"])
            row.update(predicted_step(configs[name], device))  # beside the measured step_ms: the model's calibration
            last_elapsed = row["elapsed_s"]
            compiled = configs[name].train.torch_compile
            if compiled:
                from torch._dynamo.utils import counters

                row["dynamo_stats"] = dict(counters["stats"])
                row["compile_backend"] = backend
            ctx.record("speed", shape=shape, config=configs[name].to_dict(), compiled=compiled, **row)
            ctx.check(f"{name}: losses finite", _finite(result.losses), value=result.losses[-1])
        for name in profiled:
            if ctx.time_left() < 2.5 * last_elapsed:
                ctx.note(f"profile of {name}: not run, {ctx.time_left():.0f} s left in the box")
                continue
            _profile(ctx, variant(name, 2 if ctx.cpu else 3), name, device)


# --------------------------------------------------------------------------------------------------------------
# Phase 4: memory model


def memory(ctx: PhaseContext) -> None:
    rows = [r for r in _read_jsonl(ctx.results_path) if r.get("kind") == "speed"]
    if not rows:
        ctx.note("no speed rows to compare: run the speed phases first")
        return
    for r in rows:
        cfg = config_from_dict(r["config"], world_size=1)
        predicted = plan.peak_memory(cfg, plan.layout_of(cfg, 1), device="cpu" if ctx.cpu else "cuda")
        measured = r.get("peak_mem_gib")
        states = predicted.model_states / GIB
        ctx.record("memory", source_phase=r["phase"], variant=r["variant"], compiled=r.get("compiled", False),
                   predicted_gib=predicted.total / GIB, predicted_model_states_gib=states,
                   predicted_activations_gib=predicted.activations / GIB, measured_gib=measured,
                   measured_activations_gib=None if measured is None else measured - states,
                   error=None if not measured else (predicted.total / GIB - measured) / measured)
    if ctx.cpu:
        ctx.check("predicted peak memory within 10 % of measured", None,
                  detail="skipped on CPU (only the process-wide peak is known there)")


# --------------------------------------------------------------------------------------------------------------
# Phase 5: quality


def quality(ctx: PhaseContext) -> None:
    q = QUALITY[ctx.mode]
    if not corpus_available():
        ctx.check("60M quality run", None, detail=f"skipped: the sample corpus is not at {CORPUS} (make corpus, or "
                                                  "carry that folder)")
        return
    exp = experiment.load_experiment(shipped_config(QUALITY_EXPERIMENT))
    names = list(exp.variants)
    base = load_config(exp.base, [*exp.overrides, *q["extra"]], world_size=1)
    t = base.train
    device = ctx.device()

    # Calibrate: each variant's step time on the real data, so that all of them train the same steps in the box.
    warmup, steps = q["calibrate"]
    calib_dir = os.path.join(ctx.work_dir, "calibrate")
    step_s, overhead_s = {}, {}
    for name in names:
        cfg = load_config(exp.base, experiment.run_overrides(exp, name, calib_dir, [
            *q["extra"], f"train.train_iters={warmup + steps}", "optimizer.warmup_iters=0", "train.eval_interval=0"]),
            world_size=1)
        start = time.monotonic()
        result = bench.bench_variant(cfg, name, device, warmup, steps)
        step_s[name] = result.step_ms / 1e3
        overhead_s[name] = max(0.0, time.monotonic() - start - (warmup + steps) * step_s[name])
    evals = 11 * t.eval_iters / 3.0  # ten evaluations and the final one, a forward pass about 1/3 of a step
    left = ctx.time_left() - q["margin_s"] - sum(overhead_s.values()) - evals * sum(step_s.values())
    fit = int(left / sum(step_s.values())) if left > 0 else 0
    n = min(fit, t.train_iters if q["max_steps"] is None else q["max_steps"])
    if n < q["min_steps"]:
        ctx.note(f"only {fit} steps fit the box; running {q['min_steps']}")
        n = q["min_steps"]
    ctx.record("quality_plan", steps=n, fit=fit, step_s=step_s, overhead_s=overhead_s,
               tokens_per_variant=n * t.global_batch_size * base.model.seq_length)

    # Train: the experiment's variants with the schedule scaled to n steps, same seed and samples.
    run_dir = os.path.join(ctx.work_dir, "runs")
    schedule = [f"train.train_iters={n}", f"optimizer.warmup_iters={max(1, round(n * base.optimizer.warmup_iters / t.train_iters))}",
                f"train.eval_interval={max(1, round(n * (t.eval_interval or t.train_iters) / t.train_iters))}",
                f"logging.log_interval={max(1, min(base.logging.log_interval, n // 10))}", "logging.tensorboard=false"]
    reached = {}
    for i, name in enumerate(names):
        later = sum(n * step_s[v] + overhead_s[v] for v in names[i + 1:])
        limit_min = max(0.1, (ctx.time_left() - later - q["margin_s"] / 2) / 60.0)
        cfg = load_config(exp.base, experiment.run_overrides(exp, name, run_dir, [
            *q["extra"], *schedule, f"train.exit_duration_minutes={limit_min:.3f}"]), world_size=1)
        # Each run's peak memory is its own: without a reset, CoLA's and CoLA-M's would include the earlier runs'.
        metrics.reset_peak_memory(device)
        trainer = train_run(cfg)
        reached[name] = trainer.state.iteration
        summary = compare.summarize(compare.load_run(name, Path(run_dir) / name))
        ctx.record("quality", variant=name, steps=trainer.state.iteration, planned_steps=n,
                   tokens=summary.tokens, valid_loss=summary.final_valid_loss, valid_ppl=summary.final_valid_ppl,
                   mean_tokens_per_s=summary.mean_tokens_per_s, peak_mem_gib=summary.peak_mem_gib,
                   overrides=experiment.run_overrides(exp, name, run_dir, [*q["extra"], *schedule]))
        ctx.check(f"{name}: losses finite", _finite(trainer.history), value=trainer.history[-1])
        del trainer
    ctx.check("every variant trained the same steps", len(set(reached.values())) == 1 and n in reached.values(),
              value=min(reached.values()), detail=f"planned {n}: {reached}")
    try:
        compare.compare_runs([f"{v}={os.path.join(run_dir, v)}" for v in names],
                             Path(ctx.out_dir) / "quality.png", Path(ctx.out_dir) / "quality.md",
                             title=f"{exp.title}, {n} steps each")
    except Exception as error:  # the plot is a convenience; the records hold the numbers
        ctx.note(f"plot/table not written: {one_line(error)[:300]}")
    destroy_distributed()


PHASES: Dict[str, Callable[[PhaseContext], None]] = {
    "environment": environment,
    "correctness": correctness,
    "speed_1b": speed,
    "speed_7b": speed,
    "speed_compile": speed,
    "memory": memory,
    "quality": quality,
}
