"""One training run from a config to its end: up-front checks, process groups, data, trainer, checkpoints."""

from __future__ import annotations

from cola_megatron.config import Config


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
    from cola_megatron.training.preflight import preflight, warn_all

    # Files, data and memory are checked before megatron-core is imported or anything is built.
    warn_all(preflight(cfg))
    from cola_megatron.errors import TrainingStopped
    from cola_megatron.training.checkpoint import plan_resume
    from cola_megatron.training.distributed import initialize_distributed
    from cola_megatron.training.trainer import Trainer

    p = cfg.parallel
    # Finds the checkpoint to resume from and checks it against the config before anything heavy is built.
    resume = plan_resume(cfg)
    device = initialize_distributed(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline,
                                    seed=cfg.train.seed, device=cfg.train.device)
    _, train_ds, valid_ds = build_data(cfg)
    trainer = Trainer(cfg, device, log=log, resume=resume)
    trainer.attach_data(train_ds, valid_ds)
    checkpoint = trainer.checkpoint
    if checkpoint is not None:
        checkpoint.load()
    try:
        trainer.train()
    except TrainingStopped:
        if checkpoint is not None:
            checkpoint.close()  # every rank stops here together: a pending async save can still commit
        raise
    finally:
        if checkpoint is not None:
            checkpoint.close(abort=True)  # after any other error a pending save is abandoned; `latest` stays
    return trainer
