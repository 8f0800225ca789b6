"""Throughput, MFU and the sinks a training run reports to: stdout, metrics.jsonl, TensorBoard, W&B."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, Dict, Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = (
    ("GB200", 2450.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
)


def peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """Per-device peak for MFU: the override, else looked up from the GPU's name; None on CPU or unknown GPUs."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: the process's peak resident set (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float,
               peak: Optional[float], hardware_flops_per_token: Optional[float] = None) -> Dict[str, Optional[float]]:
    """MFU from model FLOPs; HFU from hardware FLOPs (model FLOPs plus recomputation), when given."""
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


def format_train_line(m: Dict[str, Any], train_iters: int) -> str:
    parts = [
        f"iter {m['iteration']:>7d}/{train_iters}",
        f"tokens {m['tokens']:.4g}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.3e}",
        f"grad_norm {m['grad_norm']:.3f}",
        f"tok/s {m['tokens_per_s']:.4g} ({m['tokens_per_s_per_gpu']:.4g}/gpu)",
        f"TFLOP/s/gpu {m['tflops_per_gpu']:.2f}",
        f"MFU {m['mfu']:.1f}%" if m.get("mfu") is not None else "MFU n/a",
        f"HFU {m['hfu']:.1f}%" if m.get("hfu") is not None else "HFU n/a",
        f"peak_mem {m['peak_mem_gib']:.2f}GiB",
    ]
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return " | ".join(parts)


class MetricsSink:
    """Writes on the logging rank only; other ranks get a sink that drops everything."""

    def __init__(self, log_dir: Optional[str], enabled: bool, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=log_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("logging.wandb_project is set but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, config=run_config, dir=log_dir)

    def log(self, kind: str, record: Dict[str, Any], line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        record = {"kind": kind, **{k: v for k, v in record.items() if v is not None}}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        step = record["iteration"]
        scalars = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(scalars, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        for sink in (self._jsonl, self._tb):
            if sink:
                sink.close()
        if self._wandb:
            self._wandb.finish()
