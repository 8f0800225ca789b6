"""``cola-train``: pre-train a CoLA (or dense baseline) model on megatron-core.

    torchrun --nproc-per-node 8 -m cola_megatron.train --config configs/cola/llama_1b.yaml train.train_iters=1000
    cola-train --config configs/cola/llama_7b.yaml --dry-run      # validate, count, plan; allocates nothing
    cola-train --config configs/demo.yaml --print-config          # the resolved config as YAML
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.config import Config, load_config
from cola_megatron.training.preflight import preflight, warn_all


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cola-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (a path, or a shipped one such as cola/llama_1b.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print parameter count, FLOPs per token and layout, check the data, "
                        "tokenizer and output directories, then exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (the cola_config.yaml a checkpoint gets), then exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.train_iters=100")
    return p


def describe_layout(cfg: Config, world_size: Optional[int] = None) -> List[str]:
    p = cfg.parallel
    lines = [
        f"tensor_parallel={p.tensor_parallel} pipeline_parallel={p.pipeline_parallel} "
        f"virtual_pipeline={p.virtual_pipeline} sequence_parallel={p.sequence_parallel} "
        f"cola_tp_scheme={p.cola_tp_scheme}"
    ]
    if world_size:
        dp = p.data_parallel_size(world_size)
        micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        lines.append(f"world_size={world_size} data_parallel={dp} micro_batches_per_step={micro}")
    return lines


def dry_run(cfg: Config, world_size: Optional[int]) -> None:
    from cola_megatron.models.accounting import count_parameters, kv_cache_elements_per_token, training_flops_per_token

    n = count_parameters(cfg.model)
    m = cfg.model
    print(f"config ok: {m.arch} d={m.hidden_size} ffn={m.padded_ffn_hidden_size} layers={m.num_layers} "
          f"heads={m.num_attention_heads}"
          + (f" query_groups={m.num_query_groups}" if m.num_query_groups not in (None, m.num_attention_heads) else "")
          + (f" rank={m.rank} only_lr_act={m.only_lr_act}" if m.arch == "cola" else ""))
    print(f"KV cache per token: {kv_cache_elements_per_token(m):,} elements (k and v of "
          f"{m.num_query_groups or m.num_attention_heads} heads x {m.num_layers} layers)")
    print(f"parameters: {n.total:,} ({n.total / 1e6:.1f}M; embedding {n.embedding / 1e6:.1f}M, "
          f"output layer {n.output_layer / 1e6:.1f}M, blocks {n.layers / 1e6:.1f}M)")
    print(f"training FLOPs per token: {training_flops_per_token(m):.4g}")
    for line in describe_layout(cfg, world_size):
        print(line)
    print(f"recompute={m.recompute} precision={cfg.train.precision} global_batch={cfg.train.global_batch_size} "
          f"micro_batch={cfg.train.micro_batch_size} seq_length={m.seq_length}")


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    checking = args.dry_run or args.print_config
    cfg = load_config(args.config, args.overrides, world_size=world_size or (None if checking else 1))
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    if args.dry_run:
        dry_run(cfg, world_size)
        warn_all(preflight(cfg))  # the files: data, tokenizer, output directories (the same checks a run makes)
        return 0
    from cola_megatron.training.run import run

    try:
        trainer = run(cfg)
    finally:
        if "torch.distributed" in sys.modules:  # not when the up-front checks stopped the run before torch
            from cola_megatron.training.distributed import destroy_distributed

            destroy_distributed()
    # launch/train.sh names this file to learn that the run stopped (signal, time limit) before train_iters; it then
    # exits with its STOPPED_EXIT_CODE, so that an orchestrator retries rather than counts the job as done.
    marker = os.environ.get("COLA_STOPPED_MARKER")
    if marker and trainer.state.iteration < cfg.train.train_iters:
        open(marker, "a").close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    if __name__ == "__main__" or os.environ.get("COLA_STOPPED_MARKER"):  # a process of its own (not a test caller)
        from cola_megatron.training.stop import catch_early_sigterm

        catch_early_sigterm()  # a stop during start-up (imports, rendezvous, loading) still ends in a checkpoint
    return run_command("cola-train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
