"""Throughput, MFU and the sinks a training run reports to: stdout, metrics.jsonl, TensorBoard, W&B."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import resource
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by torch.cuda.get_device_name(device), e.g. "NVIDIA H100 80GB
# HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB". Patterns match
# whole words, so "H200" is not "GH200" nor "H20", and "L4" is not "L40S"; first match wins, so a form factor
# (PCIe, NVL) comes before its chip's SXM entry.
PEAK_BF16_TFLOPS = (
    (r"\bGB200\b", 2450.0),
    (r"\bB200\b", 2250.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.0),
    (r"\bH800\b.*\bPCIe\b", 756.0),
    (r"\bH800\b", 989.0),
    (r"\bH20\b", 148.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX 4090\b", 165.0),
    (r"\bV100\b", 125.0),
)


def peak_tflops_of(name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by the name torch reports for it; None when unknown."""
    for pattern, value in PEAK_BF16_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return value
    return None


def peak_tflops(override: Optional[float] = None, device: Optional[torch.device] = None) -> Optional[float]:
    """Per-device peak for MFU: the override, else looked up from the name of the GPU the work runs on; None for
    work on a CPU (also on a machine that has a GPU) and for unknown GPUs."""
    if override:
        return override
    if device is None or device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of the device the work runs on: the one record the trainer, cola-bench and the GPU check use.

    On CUDA: the caching allocator's peak allocated and reserved bytes since the last :func:`reset_peak_memory`,
    so ``since_reset`` is True and one run's peak can be told from another's in one process. On CPU the process's
    peak resident set stands for "allocated" (never reset, so ``since_reset`` is False), and there is no allocator
    cache: ``reserved_gib`` is None."""

    allocated_gib: float
    reserved_gib: Optional[float]
    since_reset: bool

    def record(self) -> Dict[str, Optional[float]]:
        """The fields of a metrics.jsonl ``train`` record."""
        return {"peak_mem_gib": self.allocated_gib, "peak_mem_reserved_gib": self.reserved_gib}


def peak_memory(device: torch.device) -> PeakMemory:
    if device.type == "cuda":
        return PeakMemory(allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                          reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30, since_reset=True)
    # Linux reports KiB.
    return PeakMemory(allocated_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, reserved_gib=None,
                      since_reset=False)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: what an earlier run in this process freed is collected and its cached blocks returned, so
    the next :func:`peak_memory` is the next run's own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float,
               peak: Optional[float], hardware_flops_per_token: Optional[float] = None) -> Dict[str, Optional[float]]:
    """Rates over ``seconds`` of training time (evaluation and checkpoint time already taken out). MFU from model
    FLOPs; HFU from hardware FLOPs (model FLOPs plus recomputation), when given."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    tflops_per_gpu = tokens_per_s * flops_per_token / world_size / 1e12
    hardware = hardware_flops_per_token or flops_per_token
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world_size,
        "tflops_per_gpu": tflops_per_gpu,
        "mfu": 100.0 * tflops_per_gpu / peak if peak else None,
        "hfu": 100.0 * tokens_per_s * hardware / world_size / 1e12 / peak if peak else None,
    }


def utc_timestamp(seconds: Optional[float] = None) -> str:
    """ISO 8601 in UTC with milliseconds: the ``timestamp`` of every record."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_duration(seconds: float) -> str:
    """H:MM:SS (days when long: 2d 03:04:05)."""
    if not math.isfinite(seconds):
        return "?"
    total = int(round(max(seconds, 0.0)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}")


def console_prefix(timestamp: str) -> str:
    """``[2026-01-31 12:00:00Z]`` from a record's timestamp."""
    return f"[{timestamp[:19].replace('T', ' ')}Z]"


def new_run_id() -> str:
    """Time-ordered and unique enough to tell runs in one log directory apart: 20260131-120000-3fa2c1."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def config_hash(config_yaml: str) -> str:
    """The first 12 hex digits of the resolved config's SHA-256: equal hashes, equal configs."""
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:12]


def software_versions() -> Dict[str, str]:
    import importlib.metadata

    import cola_megatron

    try:
        megatron = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        from megatron.core import package_info

        megatron = package_info.__version__
    return {"torch": torch.__version__, "megatron-core": megatron, "cola-megatron": cola_megatron.__version__}


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


MFU_UNKNOWN = "n/a (peak unknown: set logging.peak_tflops)"


def _flop_fraction(name: str, value: Optional[float]) -> str:
    return f"{name} {value:.1f}%" if value is not None else f"{name} {MFU_UNKNOWN}"


def format_train_line(m: Dict[str, Any], train_iters: int) -> str:
    parts = [
        f"{console_prefix(m['timestamp'])} iter {m['iteration']:>7d}/{train_iters}",
        f"elapsed {format_duration(m['elapsed_s'])}",
        f"{m['ms_per_iter']:.1f} ms/iter (data {m['data_ms_per_iter']:.1f} ms)",
        f"ETA {format_duration(m['eta_s'])}",
        f"tokens {m['tokens']:.4g}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.3e}",
        f"grad_norm {m['grad_norm']:.3f}",
        f"tok/s {m['tokens_per_s']:.4g} ({m['tokens_per_s_per_gpu']:.4g}/gpu)",
        f"TFLOP/s/gpu {m['tflops_per_gpu']:.2f}",
        _flop_fraction("MFU", m.get("mfu")),
    ]
    if "hfu" in m:  # hardware FLOPs (with recomputation), next to MFU
        parts.append(_flop_fraction("HFU", m["hfu"]))
    reserved = m.get("peak_mem_reserved_gib")
    parts.append(f"peak mem {m['peak_mem_gib']:.2f} GiB alloc / "
                 + (f"{reserved:.2f} GiB reserved" if reserved is not None else "n/a reserved (CPU: peak RSS)"))
    parts.append(f"skipped {m['skipped']}")
    if m.get("loss_scale") is not None:  # fp16 only
        parts.append(f"loss_scale {m['loss_scale']:.6g}")
    if (m.get("excluded_s") or 0) >= 0.01:
        parts.append(f"excl. {m['excluded_s']:.2f} s eval/save")
    if m.get("profile_dir"):
        parts.append(f"profiler trace -> {m['profile_dir']}")
    return " | ".join(parts)


class MetricsSink:
    """Writes on the logging rank only; other ranks get a sink that drops everything.

    ``metrics.jsonl`` is appended to, one JSON object per line; every start or resume first writes a ``run`` record
    (:meth:`start_run`) so segments and separate runs in one file can be told apart. Values that cannot be computed
    are written as null, non-finite losses as NaN. TensorBoard gets the numeric fields as ``<kind>/<key>`` scalars
    and the run record and resolved config as text; a resumed run purges the events its earlier segment logged past
    the checkpoint (``purge_step``), so each curve is drawn once.
    """

    def __init__(self, log_dir: Optional[str], enabled: bool, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.log_dir = log_dir
        self._tensorboard = tensorboard
        self._jsonl = self._tb = self._wandb = None
        self.appended_to_earlier = False  # metrics.jsonl already held records when this run opened it
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "metrics.jsonl")
            self.appended_to_earlier = os.path.isfile(path) and os.path.getsize(path) > 0
            self._jsonl = open(path, "a", buffering=1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("logging.wandb_project is set but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, config=run_config, dir=log_dir)

    def _writer(self, purge_step: Optional[int] = None):
        if self._tb is None and self.log_dir and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
        return self._tb

    def start_run(self, record: Dict[str, Any], config_yaml: str, line: Optional[str] = None) -> None:
        """The header of a start or resume: one ``run`` record, and the record and config as TensorBoard text."""
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        self._write_jsonl({"kind": "run", **record})
        # Events of steps after the resumed iteration belong to a segment that was cut off: TensorBoard hides them.
        tb = self._writer(purge_step=record["resumed_iteration"] + 1)
        if tb:
            step = record["resumed_iteration"]
            # Indented: TensorBoard renders text as Markdown, and indented lines as preformatted.
            tb.add_text("run", _indent(json.dumps(record, indent=2)), step)
            tb.add_text("config", _indent(config_yaml), step)
            tb.flush()

    def log(self, kind: str, record: Dict[str, Any], line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        record = {"kind": kind, **record}
        self._write_jsonl(record)
        step = record["iteration"]
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        tb = self._writer()
        if tb:
            for tag, value in scalars.items():
                tb.add_scalar(tag, value, step)
            tb.flush()
        if self._wandb:
            self._wandb.log(scalars, step=step)

    def _write_jsonl(self, record: Dict[str, Any]) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        for sink in (self._jsonl, self._tb):
            if sink:
                sink.close()
        self._jsonl = self._tb = None
        if self._wandb:
            self._wandb.finish()
            self._wandb = None


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
