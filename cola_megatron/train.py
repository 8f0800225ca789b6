"""``cola-train``: pre-train a CoLA (or dense baseline) model on megatron-core.

    torchrun --nproc-per-node 8 -m cola_megatron.train --config configs/cola/llama_1b.yaml train.train_iters=1000
    cola-train --config configs/cola/llama_7b.yaml --dry-run      # validate, count, plan; allocates nothing
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from cola_megatron.compat import quiet_megatron_notices
from cola_megatron.config import Config, ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cola-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print parameter count, FLOPs per token and layout, then exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.train_iters=100")
    return p


def dry_run(cfg: Config, world_size: Optional[int]) -> None:
    from cola_megatron.model import count_parameters, describe_layout, training_flops_per_token

    n = count_parameters(cfg.model)
    m = cfg.model
    print(f"config ok: {m.arch} d={m.hidden_size} ffn={m.padded_ffn_hidden_size} layers={m.num_layers} "
          f"heads={m.num_attention_heads}" + (f" rank={m.rank} only_lr_act={m.only_lr_act}" if m.arch == "cola" else ""))
    print(f"parameters: {n.total:,} ({n.total / 1e6:.1f}M; embedding {n.embedding / 1e6:.1f}M, "
          f"output layer {n.output_layer / 1e6:.1f}M, blocks {n.layers / 1e6:.1f}M)")
    print(f"training FLOPs per token: {training_flops_per_token(m):.4g}")
    for line in describe_layout(cfg, world_size):
        print(line)
    print(f"recompute={m.recompute} precision={cfg.train.precision} global_batch={cfg.train.global_batch_size} "
          f"micro_batch={cfg.train.micro_batch_size} seq_length={m.seq_length}")


def build_data(cfg: Config):
    """Tokenizer and train/valid datasets sized for the run."""
    from cola_megatron.data.build import build_datasets, load_tokenizer

    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    t = cfg.train
    n_train = t.train_iters * t.global_batch_size
    n_valid = t.eval_iters * t.global_batch_size
    train_ds, valid_ds, _ = build_datasets(cfg.data, cfg.model.seq_length, t.seed, (n_train, n_valid, 0), tokenizer)
    return tokenizer, train_ds, valid_ds


def run(cfg: Config, log: bool = True):
    """Train under an initialised (or single-process) torch.distributed environment; returns the Trainer."""
    from cola_megatron.checkpoint import Checkpointer
    from cola_megatron.parallel import initialize_distributed
    from cola_megatron.trainer import Trainer, TrainingStopped

    p = cfg.parallel
    # Finds the checkpoint to resume from and checks its model shape before anything heavy is built.
    checkpointer = Checkpointer(cfg) if (cfg.checkpoint.save_dir or cfg.checkpoint.load_dir) else None
    device = initialize_distributed(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline,
                                    seed=cfg.train.seed, device=cfg.train.device)
    _, train_ds, valid_ds = build_data(cfg)
    trainer = Trainer(cfg, device, log=log)
    trainer.attach_data(train_ds, valid_ds)
    if checkpointer is not None:
        checkpointer.resume(trainer)
        trainer.attach_checkpointer(checkpointer)
    try:
        trainer.train()
    except TrainingStopped:
        if checkpointer is not None:
            checkpointer.close()  # every rank stops here together: a pending async save can still commit
        raise
    finally:
        if checkpointer is not None:
            checkpointer.close(abort=True)  # after any other error a pending save is abandoned; `latest` stays
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_megatron_notices()
    args = build_parser().parse_args(argv)
    world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size or (None if args.dry_run else 1))
    except ConfigError as e:
        print(f"cola-train: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(cfg, world_size)
        return 0
    from cola_megatron.checkpoint import CheckpointError
    from cola_megatron.data.errors import DataError
    from cola_megatron.trainer import TrainingStopped

    try:
        run(cfg)
    except DataError as e:
        print(f"cola-train: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"cola-train: checkpoint error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"cola-train: {e.message}", file=sys.stderr)
        return 1
    finally:
        from cola_megatron.parallel import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
