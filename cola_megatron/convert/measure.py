"""Measuring conversions: random checkpoints in the reference implementation's layout, and the memory a command
needs (``tools/bench_convert.py`` and the tests that bound conversion memory share both).

Memory is what the kernel cannot reclaim, summed over a command's processes and sampled while it runs:
``Pss_Anon + Pss_Shmem`` of ``/proc/PID/smaps_rollup`` (proportional, so memory shared between processes counts
once; file pages, such as memory-mapped reads or written-back scratch, do not count).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# The reference implementation's CoLA-7B (cola_7b.json): 32 layers, d=4096, ffn 11008, rank d/4, LLaMA vocabulary.
SIZES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, rank=1024),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
               num_attention_heads=32, rank=512),
    "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, rank=128),
}


def reference_config(size: str = "7b", layers: Optional[int] = None, **overrides) -> Dict:
    """config.json fields of a CoLA model of the reference's shape ``size`` (``layers`` to shorten it)."""
    fields = dict(SIZES[size], model_type="cola", architectures=["ColaForCausalLM"], only_lr_act=False,
                  lr_act_type="silu", hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, initializer_range=0.02, tie_word_embeddings=False, **overrides)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return fields


def write_random_reference(out_dir: str, fields: Dict, dtype: torch.dtype = torch.bfloat16,
                           max_shard_size: str = "2GB", seed: int = 0) -> int:
    """A random CoLA checkpoint as the reference saves it (config.json, safetensors shards + index), written one
    tensor at a time; returns its weight bytes."""
    import json

    from cola_megatron.convert.hf_io import SafetensorsShards, parse_size
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import expected_parameter_shapes

    os.makedirs(out_dir, exist_ok=True)
    config = ColaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    layout = list(expected_parameter_shapes(config).items())
    shards = SafetensorsShards(out_dir, layout, dtype, parse_size(max_shard_size))
    generator = torch.Generator().manual_seed(seed)
    for name, shape in layout:
        shards.write(name, torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02))
    shards.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(fields, torch_dtype=str(dtype).replace("torch.", "")), f, indent=2)
    return shards.total_bytes


# --------------------------------------------------------------------------------------------------------------
# Memory of a process tree


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (files replaced while it walks are skipped)."""
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


def _children() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def children_of(pid: int) -> List[int]:
    return _children().get(pid, [])


def process_tree(pid: int) -> List[int]:
    """``pid`` and all its descendants."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def unreclaimable_bytes(pid: int) -> int:
    """``Pss_Anon + Pss_Shmem`` of one process (0 once it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


class PeakMemory:
    """Samples the summed memory of a process tree every ``interval`` seconds from a thread; ``peak`` is the most.

    Transients (a tensor read, reordered and freed) last tens of milliseconds, so sampling is frequent; the tree
    itself (a walk over /proc) is listed again only every ``tree_every`` samples."""

    def __init__(self, pid: int, interval: float = 0.01, tree_every: int = 10):
        self.pid, self.interval, self.tree_every, self.peak, self.processes = pid, interval, tree_every, 0, 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        samples, pids = 0, [self.pid]
        while not self._stop.is_set():
            if samples % self.tree_every == 0:
                pids = process_tree(self.pid)
                self.processes = max(self.processes, len(pids))
            samples += 1
            self.peak = max(self.peak, sum(unreclaimable_bytes(p) for p in pids))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                 timeout: Optional[float] = None) -> Tuple[subprocess.CompletedProcess, int, float]:
    """Run a command; returns (completed process with its output, peak memory of its processes in bytes, wall s)."""
    start = time.monotonic()
    process = subprocess.Popen(list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakMemory(process.pid)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        peak = sampler.stop()
    return subprocess.CompletedProcess(list(argv), process.returncode, out, err), peak, time.monotonic() - start
