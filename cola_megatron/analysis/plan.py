"""``cola-plan``: choose a parallel layout for a config and a cluster from predicted memory and step time.

    cola-plan --config configs/cola/llama_7b.yaml --nodes 8 --gpus-per-node 8 --gpu-memory-gib 80
    cola-plan --config configs/demo.yaml --nodes 1 --gpus-per-node 2 --evaluate parallel.tensor_parallel=2
    cola-plan --config configs/cola/llama_1b.yaml --nodes 1 --explain       # the best layout's step, part by part

For every layout (TP, PP, DP, VP, SP, recompute, micro-batch) the config allows on the cluster, it predicts the
per-GPU memory of the fullest pipeline stage (``cola_megatron.cost.memory``) and the step time, and ranks the
layouts that fit. ``--render-slurm`` / ``--render-k8s`` write launch files for the best one from the templates in
``launch/``.

Step time of the slowest (last) pipeline stage, per micro-batch times the micro-batches, from measured kernels
(``cola_megatron.cost``; ``--kernel-data FILE`` recalibrates for another GPU): every GEMM of every layer (forward,
both backward GEMMs, what recomputation repeats) at its shape's measured speed, the flash-attention core, the
memory-bound elementwise work and megatron's gradient accumulation, the output layer and cross entropy; then the
optimizer step (mixed precision or pure bf16), the 1F1B bubble, TP and PP communication on the critical path, and
the part of the gradient reduction the last micro-batch's backward cannot hide. Communication per step and GPU: TP
collectives per layer (cola_megatron.analysis.comm_report's table, plus the forward collectives that recomputation
repeats), pipeline sends of activations and gradients, data-parallel gradient reduce-scatter + parameter all-gather
(distributed optimizer) or all-reduce. Measure the top few layouts before a long run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.config import Config, ConfigError, load_config, validate
from cola_megatron.cost.compute import (ComputeTime, embedding_seconds, gradient_accumulation_seconds, head_seconds,
                                        layer_seconds, optimizer_seconds)
from cola_megatron.cost.kernels import KernelModel, load_kernel_model, shipped_model
from cola_megatron.cost.layout import RECOMPUTE_MODES, Layout, apply_layout, layout_of
from cola_megatron.cost.memory import (GIB, Memory, activation_bytes, micro_batches_per_step, peak_memory,
                                       stage_parameters, state_bytes_per_parameter)
# The memory model's parts, as cola-plan's callers (the GPU check, the tests) name them.
from cola_megatron.cost.memory import in_flight_passes, layer_activations, stage_memory  # noqa: F401
from cola_megatron.cost.shapes import slow_shape_warnings
from cola_megatron.resources import launch_template



@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    nvlink_gbs: float = 450.0
    """GB/s per GPU and direction inside a node (H100 SXM: NVLink 4, 450)."""
    network_gbs: float = 50.0
    """GB/s per GPU between nodes (one 400 Gb/s NIC per GPU: 50)."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    reserve_gib: float = 6.0
    """Memory no estimate covers: CUDA context, NCCL buffers, allocator fragmentation."""
    kernel_data: Optional[str] = None
    """JSON-lines file of measured kernels (None: the shipped H100 data)."""

    def kernels(self) -> KernelModel:
        """The kernel model for this cluster's GPU (uncalibrated when the data describe another peak)."""
        if self.kernel_data is None:
            return shipped_model().for_gpu(self.gpu_tflops)
        return load_kernel_model(self.kernel_data, self.gpu_tflops)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# --------------------------------------------------------------------------------------------------------------
# Communication and step time


@dataclass
class Estimate:
    layout: Layout
    memory: Memory
    fits: bool
    tp_bytes: float
    """Bytes one GPU sends per step in tensor-parallel collectives (ring algorithms)."""
    pp_bytes: float
    """Bytes one GPU sends per step to its pipeline neighbours."""
    dp_bytes: float
    """Bytes one GPU sends per step for gradient reduction and parameter gathering."""
    compute_s: float
    """The last stage's forward and backward over the step's micro-batches (the parts in ``compute``)."""
    bubble_s: float
    tp_s: float
    pp_s: float
    dp_exposed_s: float
    optimizer_s: float = 0.0
    compute: Optional[ComputeTime] = None
    """compute_s by part, summed over the step's micro-batches (GEMMs by slot, attention, elementwise)."""
    calibrated: bool = True

    @property
    def step_s(self) -> float:
        return self.compute_s + self.optimizer_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_exposed_s

    def breakdown(self) -> Dict[str, float]:
        """Seconds per step by part: GEMMs by slot, attention, elementwise, optimizer, exposed communication,
        pipeline bubble. They sum to step_s."""
        c = self.compute or ComputeTime()
        parts = {f"gemm_{slot}": t for slot, t in c.gemms.items()}
        parts.update(attention=c.attention, elementwise=c.elementwise, optimizer=self.optimizer_s,
                     tensor_parallel=self.tp_s, pipeline=self.pp_s, data_parallel_exposed=self.dp_exposed_s,
                     bubble=self.bubble_s)
        return parts

    def as_dict(self) -> Dict[str, object]:
        mem = self.memory
        return {
            "layout": dataclasses.asdict(self.layout),
            "overrides": self.layout.overrides(),
            "fits": self.fits,
            "memory_gib": {k: getattr(mem, k) / GIB for k in
                           ("weights", "gradients", "optimizer", "activations", "pipeline_buffers", "workspace",
                            "reserve", "total")},
            "memory_stage": mem.stage,
            "communication_gb_per_step": {"tensor_parallel": self.tp_bytes / 1e9, "pipeline": self.pp_bytes / 1e9,
                                          "data_parallel": self.dp_bytes / 1e9},
            "step_s": self.step_s,
            "step_calibrated": self.calibrated,
            "time_s": {"compute": self.compute_s, "optimizer": self.optimizer_s, "bubble": self.bubble_s,
                       "tensor_parallel": self.tp_s, "pipeline": self.pp_s, "data_parallel_exposed": self.dp_exposed_s},
            "step_breakdown_s": self.breakdown(),
        }


def _tp_bytes_per_layer(cfg: Config, layout: Layout, tokens: int) -> float:
    """Bytes one GPU sends in one layer's TP collectives for one micro-batch (forward, backward, recompute)."""
    tp = layout.tensor_parallel
    if tp == 1:
        return 0.0
    from cola_megatron.analysis.comm_counter import ring_bytes_per_rank
    from cola_megatron.analysis.comm_report import BlockShape, block_collectives

    m = cfg.model
    arch = "dense" if m.arch == "dense" else cfg.parallel.cola_tp_scheme
    shape = BlockShape(m.hidden_size, m.padded_ffn_hidden_size, m.rank, m.num_attention_heads, m.num_query_groups)
    collectives = list(block_collectives(arch, shape, tp, layout.sequence_parallel))
    if layout.recompute == "full":  # the layer's forward runs again
        collectives += [c for c in collectives if c.phase == "forward"]
    elif layout.recompute == "cola_m":  # the column slots gather σ(z) again before their B
        collectives += [c for c in collectives if c.phase == "forward" and c.kind == "all_gather"]
    act = activation_bytes(cfg)
    return sum(ring_bytes_per_rank(c.kind, c.width * tokens * act, tp) for c in collectives)


def micro_batch_compute(cfg: Config, layout: Layout, kernels: KernelModel, stage: int) -> ComputeTime:
    """One micro-batch's forward and backward through pipeline stage ``stage`` on one GPU."""
    m = cfg.model
    tp, pp, sp = layout.tensor_parallel, layout.pipeline_parallel, layout.sequence_parallel
    act, mb = activation_bytes(cfg), layout.micro_batch_size
    scheme = cfg.parallel.cola_tp_scheme if m.arch == "cola" else "bottleneck"
    layer = layer_seconds(kernels, m, mb, tp, sp, scheme, layout.recompute, act)
    out = ComputeTime().add(layer, m.num_layers // pp)
    if stage == pp - 1:
        out = out.add(head_seconds(kernels, m, mb, tp, sp, act))
    if stage == 0:
        out = out.add(ComputeTime(elementwise=embedding_seconds(kernels, m, mb, act)))
    # megatron's DDP adds every micro-batch's gradients into its main-gradient buffer.
    accumulate = gradient_accumulation_seconds(kernels, stage_parameters(m, tp, pp, stage),
                                               cfg.train.mixed_precision and not cfg.train.pure_bf16)
    return out.add(ComputeTime(elementwise=accumulate))


def estimate(cfg: Config, layout: Layout, cluster: Cluster, device: str = "cuda",
             kernels: Optional[KernelModel] = None) -> Estimate:
    """Memory, communication and step time of ``layout`` for ``cfg`` on ``cluster``."""
    m, c = cfg.model, cluster
    kernels = kernels or c.kernels()
    tp, pp, dp, v = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel, layout.model_chunks
    sp = tp if layout.sequence_parallel else 1
    act = activation_bytes(cfg)
    mem = peak_memory(cfg, layout, device, c.reserve_gib)
    tokens = layout.micro_batch_size * m.seq_length
    micro_batches = micro_batches_per_step(cfg, layout)

    # Compute: the slowest stage (the last one carries the output layer) sets the pipeline's pace.
    per_micro_batch = micro_batch_compute(cfg, layout, kernels, pp - 1)
    if pp > 1:
        first = micro_batch_compute(cfg, layout, kernels, 0)
        per_micro_batch = max(per_micro_batch, first, key=lambda t: t.total)
    per_micro_batch_s = per_micro_batch.total
    compute = ComputeTime().add(per_micro_batch, micro_batches)
    bubble_s = (pp - 1) / v * per_micro_batch_s

    # TP collectives stay inside a node; they are on the critical path.
    layers = m.num_layers // pp
    tp_bytes = micro_batches * layers * _tp_bytes_per_layer(cfg, layout, tokens)
    tp_s = tp_bytes / (c.nvlink_gbs * 1e9)
    # Pipeline: each micro-batch and model chunk sends its activations forward and their gradient back.
    pp_bytes = 2.0 * micro_batches * v * tokens * m.hidden_size / sp * act if pp > 1 else 0.0
    pp_link = c.nvlink_gbs if tp * dp * pp <= c.gpus_per_node else c.network_gbs
    pp_s = pp_bytes / (pp_link * 1e9)
    # Data parallel: megatron's rank order puts TP innermost, then DP; a DP group leaves the node when TP·DP does.
    _, grad_bytes, _ = state_bytes_per_parameter(cfg)
    n = stage_parameters(m, tp, pp, mem.stage)
    share = (dp - 1) / dp
    dp_link = (c.nvlink_gbs if tp * dp <= c.gpus_per_node else c.network_gbs) * 1e9
    if layout.distributed_optimizer:
        reduce_bytes, gather_bytes = share * n * grad_bytes, share * n * act
    else:
        reduce_bytes, gather_bytes = 2 * share * n * grad_bytes, 0.0
    # Gradient buckets reduce while the last micro-batch's backward (about 2/3 of its time) runs.
    hidden_s = 2.0 / 3.0 * per_micro_batch_s if layout.overlap_grad_reduce else 0.0
    dp_exposed_s = max(0.0, reduce_bytes / dp_link - hidden_s) + gather_bytes / dp_link
    # The optimizer updates this rank's parameters (its 1/DP shard with the distributed optimizer).
    updated = stage_parameters(m, tp, pp, pp - 1) / (dp if layout.distributed_optimizer else 1)
    optimizer_s = optimizer_seconds(kernels, int(updated), cfg.train.pure_bf16, cfg.train.precision == "fp32")
    return Estimate(
        layout=layout,
        memory=mem,
        fits=mem.total <= c.gpu_memory_gib * GIB,
        tp_bytes=tp_bytes,
        pp_bytes=pp_bytes,
        dp_bytes=reduce_bytes + gather_bytes,
        compute_s=compute.total,
        bubble_s=bubble_s,
        tp_s=tp_s,
        pp_s=pp_s,
        dp_exposed_s=dp_exposed_s,
        optimizer_s=optimizer_s,
        compute=compute,
        calibrated=kernels.calibrated,
    )


# --------------------------------------------------------------------------------------------------------------
# Enumerating and ranking


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: Config, cluster: Cluster, recompute_modes: Sequence[str] = RECOMPUTE_MODES,
                      distributed_optimizer: bool = True, max_virtual_pipeline: int = 8) -> Iterable[Layout]:
    """Every layout the config's validation accepts on the cluster (TP inside a node)."""
    m, t = cfg.model, cfg.train
    world = cluster.world_size
    modes = [mode for mode in recompute_modes if mode != "cola_m" or m.arch == "cola"]
    for tp in _divisors(cluster.gpus_per_node):
        for pp in _divisors(m.num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if t.global_batch_size % dp:
                continue
            vps = [None] + ([v for v in _divisors(m.num_layers // pp) if 1 < v <= max_virtual_pipeline]
                            if pp > 1 else [])
            for vp in vps:
                for sp in ([False, True] if tp > 1 else [False]):
                    for mode in modes:
                        for mb in _divisors(t.global_batch_size // dp):
                            layout = Layout(tp, pp, dp, vp, sp, mode, mb, distributed_optimizer and dp > 1)
                            try:
                                validate(apply_layout(cfg, layout), world)
                            except ConfigError:
                                continue
                            yield layout


def rank_layouts(cfg: Config, cluster: Cluster, device: str = "cuda", **candidates) -> List[Estimate]:
    """All candidate layouts: those that fit fastest first, then the others by memory (least first)."""
    kernels = cluster.kernels()
    estimates = [estimate(cfg, layout, cluster, device, kernels)
                 for layout in candidate_layouts(cfg, cluster, **candidates)]

    def key(e: Estimate):
        if e.fits:
            return (0, round(e.step_s, 6), e.memory.total, e.layout.label())
        return (1, e.memory.total, e.step_s, e.layout.label())

    return sorted(estimates, key=key)


# --------------------------------------------------------------------------------------------------------------
# Launch files from the templates in launch/

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def render(template: str, values: Dict[str, object]) -> str:
    """Replace ``{{NAME}}`` placeholders. A list value repeats its line once per item (bash arrays, YAML lists)."""
    out = []
    for line in template.splitlines(keepends=True):
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise KeyError(f"template placeholder {{{{{unknown[0]}}}}} has no value")
        lists = [n for n in names if isinstance(values[n], (list, tuple))]
        if len(lists) > 1:
            raise ValueError(f"a template line may hold one list placeholder: {line.strip()}")
        items = values[lists[0]] if lists else [None]
        for item in items:
            rendered = line
            for n in names:
                rendered = rendered.replace("{{" + n + "}}", str(item if n in lists else values[n]))
            out.append(rendered)
    return "".join(out)


TEMPLATES = {"slurm": ("slurm", "template.sbatch"), "k8s": ("k8s", "pytorchjob.template.yaml")}


# Per-pod requests of the PyTorchJob: placeholders to adjust to the nodes (the plan predicts GPU memory only).
K8S_CPUS_PER_GPU, K8S_MEMORY_GIB_PER_GPU, K8S_SHM_GIB_PER_GPU = 8, 64, 8
K8S_MEMORY_GIB_PER_CPU_PROCESS, K8S_SHM_GIB_PER_CPU_PROCESS = 4, 1


def template_values(best: Estimate, config_path: str, cluster: Cluster, job_name: str,
                    command: str, device: str = "cuda") -> Dict[str, object]:
    """Placeholder values of the launch templates for the chosen layout; ``command`` re-renders the file.

    ``device="cpu"`` renders a job without GPUs: ``cluster.gpus_per_node`` is then the number of training
    processes per node (gloo on the CPU).
    """
    mem = best.memory
    procs = cluster.gpus_per_node
    cpu = device == "cpu"
    unit = "processes" if cpu else "GPUs"
    if cpu:
        resources = [f'cpu: "{procs}"', f"memory: {procs * K8S_MEMORY_GIB_PER_CPU_PROCESS}Gi"]
        shm = procs * K8S_SHM_GIB_PER_CPU_PROCESS
    else:
        resources = [f'cpu: "{procs * K8S_CPUS_PER_GPU}"', f"memory: {procs * K8S_MEMORY_GIB_PER_GPU}Gi",
                     f'nvidia.com/gpu: "{procs}"']
        shm = procs * K8S_SHM_GIB_PER_GPU
    workers = cluster.nodes - 1
    # A single-node job has no Worker replica type at all (the operator rejects replicas: 0).
    worker_spec = ["    Worker:", f"      replicas: {workers}", "      restartPolicy: ExitCode",
                   "      template: *pod"] if workers else []
    pods = "one master pod" + (f" and {workers} worker pod{'s' if workers > 1 else ''}" if workers else "")
    return {
        "JOB_NAME": job_name,
        "NODES": cluster.nodes,
        "WORKERS": workers,
        "GPUS_PER_NODE": procs,
        "PROCS_PER_POD": procs,
        "PODS": pods,
        "DEVICES": f"{procs} CPU training processes" if cpu else f"{procs} GPUs",
        "SBATCH_DEVICE": [] if cpu else [f"--gpus-per-node={procs}"],
        "RESOURCES": resources,
        "SHM_SIZE": f"{shm}Gi",
        "WORKER_SPEC": worker_spec,
        "CONFIG": config_path,
        "LAYOUT": best.layout.overrides(),
        "PLAN": [
            f"layout {best.layout.label()} on {cluster.nodes} x {procs} {unit}"
            + ("" if cpu else f" of {cluster.gpu_memory_gib:g} GiB")
            + f": predicted {mem.total / GIB:.1f} GiB per {'process' if cpu else 'GPU'}",
            f"(model states {mem.model_states / GIB:.1f}, activations {mem.activations / GIB:.1f}), "
            f"step {best.step_s:.2f} s; re-render with:",
            command,
        ],
    }


def render_launch_file(kind: str, out_path: str, values: Dict[str, object]) -> None:
    """Write launch/<kind>'s template rendered with ``values`` to ``out_path``."""
    with open(launch_template(*TEMPLATES[kind])) as f:
        text = render(f.read(), values)
    with open(out_path, "w") as f:
        f.write(text)
    if out_path.endswith((".sh", ".sbatch")):
        os.chmod(out_path, 0o755)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _number(low: float, high: float = math.inf, low_open: bool = True, integer: bool = False):
    """An argparse type: a finite number in (low, high] (or [low, high]); NaN, inf and zero-divisors are refused."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if integer else ''}number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be a {'whole' if integer else 'finite'} number {bound}, got {text}")
        return value
    return parse


POSITIVE, FRACTION, NON_NEGATIVE = _number(0), _number(0, 1), _number(0, low_open=False)
COUNT, NON_NEGATIVE_COUNT = _number(0, integer=True), _number(0, low_open=False, integer=True)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cola-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for cola-train")
    c = Cluster()
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=COUNT, default=c.nodes)
    g.add_argument("--gpus-per-node", type=COUNT, default=c.gpus_per_node)
    g.add_argument("--gpu-memory-gib", type=POSITIVE, default=c.gpu_memory_gib)
    g.add_argument("--nvlink-gbs", type=POSITIVE, default=c.nvlink_gbs, help="GB/s per GPU inside a node")
    g.add_argument("--network-gbs", type=POSITIVE, default=c.network_gbs, help="GB/s per GPU between nodes")
    g.add_argument("--gpu-tflops", type=POSITIVE, default=c.gpu_tflops, help="dense bf16 peak per GPU")
    g.add_argument("--reserve-gib", type=NON_NEGATIVE, default=c.reserve_gib,
                   help="per-GPU memory for the CUDA context, NCCL and fragmentation")
    g.add_argument("--kernel-data", metavar="FILE",
                   help="JSON lines of kernels measured on the cluster's GPU (default: the shipped H100 data; "
                        "docs/launching.md says how to measure)")
    s = p.add_argument_group("search")
    s.add_argument("--recompute", default=",".join(RECOMPUTE_MODES),
                   help="recompute modes to consider, comma-separated (default: all)")
    s.add_argument("--no-distributed-optimizer", action="store_true", help="replicate the optimizer over DP")
    s.add_argument("--evaluate", action="store_true", help="only the layout the config (and overrides) selects")
    s.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="kernels to predict activations for (cpu: torch's composite RMSNorm); with cpu, rendered "
                        "launch files run --gpus-per-node CPU processes per node and request no GPUs")
    o = p.add_argument_group("output")
    o.add_argument("--top", type=COUNT, default=15, help="layouts to print")
    o.add_argument("--json", action="store_true", help="print JSON instead of a table (with each step's breakdown)")
    o.add_argument("--explain", action="store_true",
                   help="print the best layout's step time part by part (GEMMs by slot, attention, elementwise, "
                        "optimizer, exposed communication, bubble)")
    o.add_argument("--render-slurm", metavar="PATH", help="write an sbatch script for the best layout")
    o.add_argument("--render-k8s", metavar="PATH", help="write a Kubeflow PyTorchJob for the best layout")
    o.add_argument("--job-name", help="job name in rendered files (default: from the config path)")
    o.add_argument("--overwrite", action="store_true", help="replace existing --render-slurm / --render-k8s files")
    return p


def format_table(estimates: Sequence[Estimate]) -> List[str]:
    unit, scale = ("GiB", GIB) if max(e.memory.total - e.memory.reserve for e in estimates) >= GIB else ("MiB", 1024**2)

    def mem(x: float) -> str:
        return f"{x / scale:7.1f}"

    lines = [
        f"{'#':>3} {'layout':<34} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'other':>7} "
        f"{'total':>7}  {'TP GB':>7} {'PP GB':>6} {'DP GB':>6}  {'step s':>8} {'bubble':>6}  fits",
        f"{'':>3} {'':<34} {f'({unit} per GPU, fullest pipeline stage)':^55}  {'(sent per GPU and step)':^21}",
    ]
    for i, e in enumerate(estimates, 1):
        m = e.memory
        other = m.pipeline_buffers + m.workspace + m.reserve
        bubble = e.bubble_s / e.step_s if e.step_s else 0.0
        lines.append(
            f"{i:>3} {e.layout.label():<34} {mem(m.weights)} {mem(m.gradients)} {mem(m.optimizer)} "
            f"{mem(m.activations)} {mem(other)} {mem(m.total)}  {e.tp_bytes / 1e9:7.3g} {e.pp_bytes / 1e9:6.3g} "
            f"{e.dp_bytes / 1e9:6.3g}  {e.step_s:8.3g} {bubble:6.1%}  {'yes' if e.fits else 'NO'}")
    return lines


PART_NAMES = {
    "attention": "attention core (flash)",
    "elementwise": "elementwise (norms, SiLU, GLU, RoPE, adds, cross entropy)",
    "optimizer": "optimizer step",
    "tensor_parallel": "exposed communication: tensor parallel",
    "pipeline": "exposed communication: pipeline",
    "data_parallel_exposed": "exposed communication: data parallel",
    "bubble": "pipeline bubble",
}


def explain(best: Estimate, kernels: KernelModel) -> List[str]:
    """The step time of ``best`` part by part (the parts sum to the step)."""
    step = best.step_s
    lines = [f"step time of {best.layout.label()}: {step:.3g} s ({kernels.describe()})"]
    for part, seconds in best.breakdown().items():
        name = f"GEMMs {part[5:]}" if part.startswith("gemm_") else PART_NAMES[part]
        lines.append(f"  {name:<58} {seconds:9.4f} s {seconds / step if step else 0.0:6.1%}")
    return lines


def _job_name(config_path: str) -> str:
    parts = os.path.normpath(config_path).split(os.sep)
    stem = os.path.splitext(parts[-1])[0]
    name = f"{parts[-2]}-{stem}" if len(parts) > 1 and parts[-2] != "configs" else stem
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def _command(args, flag: str, out_path: str) -> str:
    """The cola-plan command that renders ``out_path`` again with these settings."""
    parts = ["cola-plan", "--config", args.config, "--nodes", str(args.nodes), "--gpus-per-node",
             str(args.gpus_per_node), "--gpu-memory-gib", f"{args.gpu_memory_gib:g}"]
    defaults = build_parser().parse_args(["--config", args.config])
    for name in ("nvlink_gbs", "network_gbs", "gpu_tflops", "reserve_gib", "kernel_data",
                 "recompute", "device", "job_name"):
        if getattr(args, name) != getattr(defaults, name):
            parts += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.no_distributed_optimizer:
        parts.append("--no-distributed-optimizer")
    return " ".join([*parts, *args.overrides, flag, out_path])


def check_launch_outputs(paths: Sequence[str], overwrite: bool) -> None:
    """Before any work: each launch file's directory exists, and an existing file is replaced only when asked."""
    if len(set(map(os.path.abspath, paths))) < len(paths):
        raise ConfigError("--render-slurm and --render-k8s name the same file. Fix: give each its own path")
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ConfigError(f"{path} is a directory. Fix: give the launch file's path, e.g. {path}/job.sbatch")
        if not os.path.isdir(folder):
            raise ConfigError(f"cannot write {path}: directory {folder} does not exist. Fix: create it or "
                              "choose another path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write {path}: {folder} is not writable. Fix: choose a writable location")
        if os.path.lexists(path) and not overwrite:
            raise ConfigError(f"{path} already exists. Fix: pass --overwrite to replace it, or choose another path")


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.nvlink_gbs, args.network_gbs,
                      args.gpu_tflops, args.reserve_gib, args.kernel_data)
    modes = [mode.strip() for mode in args.recompute.split(",") if mode.strip()]
    bad = [mode for mode in modes if mode not in RECOMPUTE_MODES]
    if cluster.nodes < 1 or cluster.gpus_per_node < 1 or bad or not modes:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1 and --recompute a list of "
                          f"{', '.join(RECOMPUTE_MODES)}. Fix: correct those options")
    if cluster.reserve_gib >= cluster.gpu_memory_gib:
        raise ConfigError(f"--reserve-gib {cluster.reserve_gib:g} leaves nothing of --gpu-memory-gib "
                          f"{cluster.gpu_memory_gib:g}. Fix: lower --reserve-gib")
    check_launch_outputs([p for p in (args.render_slurm, args.render_k8s) if p], args.overwrite)
    cfg = load_config(args.config, args.overrides, world_size=cluster.world_size if args.evaluate else None)
    kernels = cluster.kernels()
    if args.evaluate:
        estimates = [estimate(cfg, layout_of(cfg, cluster.world_size), cluster, args.device, kernels)]
    else:
        estimates = rank_layouts(cfg, cluster, args.device, recompute_modes=modes,
                                 distributed_optimizer=not args.no_distributed_optimizer)
    if not estimates:
        print(f"cola-plan: no layout of this config runs on {cluster.world_size} GPUs; change train.global_batch_size "
              "or the cluster shape", file=sys.stderr)
        return 1
    best = estimates[0]
    if args.json:
        print(json.dumps([e.as_dict() for e in estimates[: args.top]], indent=1))
    else:
        m = cfg.model
        print(f"cola-plan: {m.arch} d={m.hidden_size} layers={m.num_layers} seq={m.seq_length} "
              f"global_batch={cfg.train.global_batch_size} precision={cfg.train.precision} on {cluster.nodes} x "
              f"{cluster.gpus_per_node} GPUs ({cluster.gpu_memory_gib:g} GiB); {len(estimates)} layouts")
        for line in format_table(estimates[: args.top]):
            print(line)
        verdict = "best" if best.fits else "none fits; least bad"
        print(f"\n{verdict}: {best.layout.label()}\n  " + " ".join(best.layout.overrides()))
        if args.explain:
            print()
            for line in explain(best, kernels):
                print(line)
    for warning in slow_shape_warnings(apply_layout(cfg, best.layout), kernels):
        print(f"cola-plan: warning: {warning}", file=sys.stderr)
    if not kernels.calibrated:
        print(f"cola-plan: note: step times are uncalibrated: {kernels.describe()}", file=sys.stderr)
    outputs = [(kind, path) for kind, path in (("slurm", args.render_slurm), ("k8s", args.render_k8s)) if path]
    if outputs and not best.fits:
        print("cola-plan: not rendering launch files: no layout fits in GPU memory", file=sys.stderr)
        return 1
    for kind, path in outputs:
        command = _command(args, f"--render-{kind}", path)
        values = template_values(best, args.config, cluster, args.job_name or _job_name(args.config), command,
                                 args.device)
        render_launch_file(kind, path, values)
        print(f"cola-plan: wrote {path}", file=sys.stderr)
    return 0 if best.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("cola-plan", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
