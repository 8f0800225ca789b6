"""``cola-bench``: compare model variants side by side in one process with full training steps.

Each variant is a real :class:`~cola_megatron.training.trainer.Trainer` (megatron schedule, DDP, optimizer with fp32 master
weights, bf16 compute on GPU) on mock data, built one after the other in the same process on the same device; a
step is forward, backward and the optimizer update. Reported per variant: step time, tokens/s, model TFLOP/s, MFU,
HFU (recomputation counted) and peak memory, then each variant's ratios to the baseline (the first variant).

    cola-bench --config configs/cola/llama_1b.yaml --variants cola,dense,cola_m --layers 8 --micro-batch 32
    cola-bench --tiny                        # CPU smoke run of the harness
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.config import Config, ConfigError, config_from_dict, load_config

# variant name -> overrides applied on top of the base config's model section
VARIANTS = {
    "cola": {"arch": "cola", "recompute": "none"},
    "cola_compile": {"arch": "cola", "recompute": "none", "torch_compile": True},
    "dense_compile": {"arch": "dense", "recompute": "none", "torch_compile": True},
    "dense": {"arch": "dense", "recompute": "none"},
    "cola_m": {"arch": "cola", "recompute": "cola_m"},
    "cola_m_compile": {"arch": "cola", "recompute": "cola_m", "torch_compile": True},
    "cola_full": {"arch": "cola", "recompute": "full"},
    "dense_full": {"arch": "dense", "recompute": "full"},
}

TINY_MODEL = dict(hidden_size=64, ffn_hidden_size=176, num_layers=2, num_attention_heads=4, rank=16,
                  vocab_size=512, seq_length=64)


@dataclass
class Result:
    variant: str
    step_ms: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: Optional[float]
    hfu: Optional[float]
    """Hardware FLOP utilisation: model FLOPs plus recomputation (models.accounting.hardware_flops_per_token)."""
    peak_mem_gib: Optional[float]
    """CUDA's peak allocation during this variant; None on CPU, where only the process-wide peak is known."""
    peak_reserved_gib: Optional[float]
    """CUDA's peak reserved (allocated plus cached) memory during this variant; None on CPU."""
    params_m: float
    losses: List[float]


def variant_config(base: Config, variant: str, micro_batch: int, steps: int, layers: Optional[int],
                   precision: Optional[str], ffn_multiple_of: Optional[int]) -> Config:
    if variant not in VARIANTS:
        raise ConfigError(f"--variants: unknown variant {variant!r}. Fix: choose from {', '.join(VARIANTS)}")
    values = base.to_dict()
    variant_values = dict(VARIANTS[variant])
    values["train"]["torch_compile"] = variant_values.pop("torch_compile", False)
    values["model"].update(variant_values)
    if layers is not None:
        values["model"]["num_layers"] = layers
    if ffn_multiple_of is not None:
        values["model"]["ffn_multiple_of"] = ffn_multiple_of
    values["parallel"] = {**values["parallel"], "tensor_parallel": 1, "pipeline_parallel": 1,
                          "virtual_pipeline": None, "sequence_parallel": False}
    values["train"].update(micro_batch_size=micro_batch, global_batch_size=micro_batch, train_iters=steps,
                           eval_iters=0, eval_interval=0, exit_duration_minutes=None)
    if precision is not None:
        values["train"]["precision"] = precision
    values["optimizer"].update(warmup_iters=0, decay_iters=None)
    values["data"] = {"mock": True}
    values["checkpoint"] = {}
    values["logging"] = {"log_interval": 10**9}
    return config_from_dict(values, world_size=1)


def _timer(device: torch.device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return lambda: (end.record(), torch.cuda.synchronize(device), start.elapsed_time(end) / 1e3)[-1]
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def bench_variant(cfg: Config, variant: str, device: torch.device, warmup: int, steps: int) -> Result:
    from cola_megatron.models.accounting import count_parameters
    from cola_megatron.training import metrics
    from cola_megatron.training.run import build_data
    from cola_megatron.training.trainer import Trainer

    metrics.reset_peak_memory(device)
    trainer = Trainer(cfg, device, log=False)
    _, train_ds, _ = build_data(cfg)
    trainer.attach_data(train_ds)
    for _ in range(warmup):
        trainer.train_step()
    stop = _timer(device)
    for _ in range(steps):
        trainer.train_step()
    seconds = stop()
    tokens = steps * cfg.train.global_batch_size * cfg.model.seq_length
    rates = metrics.throughput(tokens, seconds, 1, trainer.flops_per_token,
                               metrics.peak_tflops(cfg.logging.peak_tflops, device), trainer.hardware_flops_per_token)
    # Only a peak since this variant's reset is the variant's own (on CPU only the process-wide one is known).
    memory = metrics.peak_memory(device)
    result = Result(
        variant=variant,
        step_ms=1e3 * seconds / steps,
        tokens_per_s=rates["tokens_per_s"],
        tflops_per_gpu=rates["tflops_per_gpu"],
        mfu=rates["mfu"],
        hfu=rates["hfu"],
        peak_mem_gib=memory.allocated_gib if memory.since_reset else None,
        peak_reserved_gib=memory.reserved_gib if memory.since_reset else None,
        params_m=count_parameters(cfg.model).total / 1e6,
        losses=list(trainer.history),
    )
    del trainer
    gc.collect()
    return result


def format_report(results: List[Result], header: Dict[str, str]) -> List[str]:
    lines = [" | ".join(f"{k} {v}" for k, v in header.items()), ""]
    lines.append(f"{'variant':<15}{'params':>10}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU %':>8}"
                 f"{'HFU %':>8}{'peak GiB':>10}")
    for r in results:
        mfu = f"{r.mfu:.1f}" if r.mfu is not None else "n/a"
        hfu = f"{r.hfu:.1f}" if r.hfu is not None else "n/a"
        mem = f"{r.peak_mem_gib:.2f}" if r.peak_mem_gib is not None else "n/a"
        lines.append(f"{r.variant:<15}{r.params_m:>9.1f}M{r.step_ms:>10.1f}{r.tokens_per_s:>12.0f}"
                     f"{r.tflops_per_gpu:>10.2f}{mfu:>8}{hfu:>8}{mem:>10}")
    base = results[0]
    lines.append("")
    for r in results[1:]:
        line = f"ratio {r.variant}/{base.variant}: throughput {r.tokens_per_s / base.tokens_per_s:.2f}x"
        if r.peak_mem_gib is not None and base.peak_mem_gib:
            line += f", peak memory {r.peak_mem_gib / base.peak_mem_gib:.2f}x"
        lines.append(line)
    return lines


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cola-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base config (its model shape is used; arch/recompute come from --variants)")
    p.add_argument("--tiny", action="store_true", help="a tiny model for a CPU smoke run")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where the variants run (default: CUDA when available)")
    p.add_argument("--variants", default="cola,dense", help=f"comma list from {', '.join(VARIANTS)}; first = baseline")
    p.add_argument("--layers", type=int, help="override the number of layers (fit large shapes on one GPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: the config's)")
    p.add_argument("--seq", type=int, help="override the sequence length")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--ffn-multiple-of", type=int, help="pad ffn_hidden_size to a multiple of this")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    from cola_megatron.training.distributed import destroy_distributed, initialize_distributed, resolve_device

    args = _parser().parse_args(argv)
    if not args.config and not args.tiny:
        raise ConfigError("nothing to benchmark. Fix: give --config CONFIG or --tiny")
    on_gpu = resolve_device(args.device).type == "cuda"
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    overrides = list(args.overrides) + ["data.mock=true"]
    if args.seq:
        overrides.append(f"model.seq_length={args.seq}")
    if args.tiny:
        base = load_config(None, [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + overrides)
    else:
        base = load_config(args.config, overrides + ["data.train_paths=[]", "data.valid_paths=[]",
                                                     "data.tokenizer=null"])
    micro = args.micro_batch or base.train.micro_batch_size
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    configs = [variant_config(base, v, micro, args.warmup + args.steps, args.layers, precision,
                              args.ffn_multiple_of) for v in names]
    device = initialize_distributed(seed=base.train.seed, device=args.device)
    try:
        # One discarded run first: process-wide first-use costs (kernel selection, allocator growth, lazy
        # initialisation) would otherwise be charged to whichever variant happens to be first.
        bench_variant(configs[0], names[0], device, args.warmup, 1)
        results = [bench_variant(cfg, name, device, args.warmup, args.steps) for cfg, name in zip(configs, names)]
    finally:
        destroy_distributed()
    m = configs[0].model
    header = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
        "megatron-core": _megatron_version(),
        "shape": f"d={m.hidden_size} ffn={m.padded_ffn_hidden_size} r={m.rank} layers={m.num_layers} "
                 f"heads={m.num_attention_heads} seq={m.seq_length} micro_batch={micro} {precision}",
    }
    lines = format_report(results, header)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("cola-bench", _main, argv)


def _megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


if __name__ == "__main__":
    sys.exit(main())
