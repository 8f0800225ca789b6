"""Reading and writing megatron ``torch_dist`` checkpoints for conversion, on top of :mod:`cola_megatron.training.checkpoint`.

A checkpoint's tensors carry megatron's global keys, so building a model of *any* layout and loading its sharded
state dict gets the right slices; conversion reads at TP=1/PP=1 in one process and so gets the unsplit tensors.

Converted weights (from Hugging Face or a dense model) are written as a *weights-only* checkpoint: the model, the
run config, and a train state at iteration 0, but no optimizer, scheduler or RNG state. ``cola-train`` continues from
one with ``checkpoint.load_dir=DIR checkpoint.load_optimizer=false`` (fresh optimizer, schedule from the start).
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional, Sequence

import torch

from cola_megatron.training import checkpoint as ckpt_lib
from cola_megatron.config import Config, ConfigError, config_from_dict
from cola_megatron.errors import ConversionError

WEIGHTS_ONLY = "weights"
"""``contents`` entry of a weights-only checkpoint's common state (training checkpoints have none)."""
SPECIAL_TOKENS = "special_tokens"
"""Common-state entry of converted weights: the bos/eos/pad ids of the source config, for an export without a
tokenizer to write again."""


def with_layout(cfg: Config, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                virtual_pipeline: Optional[int] = None, cola_tp_scheme: Optional[str] = None) -> Config:
    """A copy of ``cfg`` at another model-parallel layout (everything else kept), validated."""
    values = copy.deepcopy(cfg.to_dict())
    values["parallel"] = dict(
        values["parallel"],
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        virtual_pipeline=virtual_pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel and tensor_parallel > 1,
        cola_tp_scheme=cola_tp_scheme or cfg.parallel.cola_tp_scheme,
    )
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConversionError(f"the model cannot be laid out at TP={tensor_parallel} PP={pipeline_parallel}"
                              f"{f' VP={virtual_pipeline}' if virtual_pipeline else ''}: {e}") from None


def unsplit(cfg: Config) -> Config:
    """``cfg`` at TP=1, PP=1: one process holds every tensor whole."""
    return with_layout(cfg, 1, 1, None)


def require_new_output(path: str) -> None:
    """Conversions never write into an existing checkpoint or export: nothing already saved may be lost."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"output {path} already exists and is not empty: choose a new directory")


# --------------------------------------------------------------------------------------------------------------
# Models of a layout inside an initialised process group


def initialize(cfg: Config) -> None:
    """Process groups for ``cfg``'s layout (one process when not launched by torchrun), always on CPU."""
    from cola_megatron.training.distributed import initialize_distributed

    p = cfg.parallel
    initialize_distributed(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline, seed=cfg.train.seed,
                           device="cpu")


def build_chunks(cfg: Config) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), as the trainer builds them, unwrapped."""
    from megatron.core import parallel_state as ps

    from cola_megatron.models.build import build_model, transformer_config

    tconfig = transformer_config(cfg, use_cpu_initialization=True)
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_model(cfg, tconfig, pre_process=pre, post_process=post, vp_stage=vp_stage))
    return chunks


def check_checkpoint_matches(chunks: Sequence[torch.nn.Module], ckpt_dir: str) -> None:
    """Every tensor these chunks need is in the checkpoint with the same global shape, else one clear error
    (before megatron reads any data)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    problems = set()
    for entries in ckpt_lib.model_sharded_state_dict(chunks).values():
        for entry in entries.values():
            if not isinstance(entry, ShardedTensor):
                continue
            have = stored.get(entry.key)
            if have is None:
                problems.add(f"{entry.key} is missing")
            elif tuple(have.global_shape) != tuple(entry.global_shape):
                problems.add(f"{entry.key}: checkpoint {tuple(have.global_shape)}, config {tuple(entry.global_shape)}")
    if problems:
        listed = sorted(problems)
        raise ConversionError(
            f"{ckpt_dir} does not hold the model its {ckpt_lib.CONFIG_FILE} describes ({len(listed)} problems, e.g. "
            f"{listed[:4]}): model.num_layers, hidden_size, ffn_hidden_size, rank or vocab_size differ from the "
            f"weights. Restore the {ckpt_lib.CONFIG_FILE} the run saved."
        )


def is_weights_only(ckpt_dir: str) -> bool:
    """True for checkpoints without training state (written by conversion), False for a run's checkpoints."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    return common.get("contents") == WEIGHTS_ONLY or "optimizer" not in common


def save_weights(chunks: Sequence[torch.nn.Module], cfg: Config, save_dir: str,
                 train_state: Optional[dict] = None, special_tokens: Optional[dict] = None) -> str:
    """Write this rank's chunks as a weights-only checkpoint ``save_dir/iter_NNNNNNN`` (every rank calls it).

    The common entries are those ``CheckpointManager.load`` reads, for a run that starts from these weights: the
    train state (iteration 0 unless given), the schedule at its start, and no layout, so that no RNG state is
    expected; ``contents`` marks the missing optimizer state.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    train_state = dict(train_state or {"iteration": 0, "consumed_samples": 0, "skipped_steps": 0, "extra": {}})
    name = ckpt_lib.checkpoint_name(train_state["iteration"])
    ckpt_dir = os.path.join(save_dir, name)
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    sharded = ckpt_lib.model_sharded_state_dict(chunks)
    sharded.update(
        contents=WEIGHTS_ONLY,
        train_state=train_state,
        scheduler={"num_steps": 0},
        config=cfg.to_dict(),
        layout=None,
        format_version=ckpt_lib.FORMAT_VERSION,
    )
    if special_tokens:
        sharded[SPECIAL_TOKENS] = dict(special_tokens)
    dist_checkpointing.save(sharded, ckpt_dir)
    dist.barrier()  # every rank's files are written before the checkpoint is declared complete
    if dist.get_rank() == 0:
        ckpt_lib.write_config(ckpt_dir, cfg)
        ckpt_lib.write_latest(save_dir, name)
    dist.barrier()
    return ckpt_dir


# --------------------------------------------------------------------------------------------------------------
# The unsplit model in this process


def read_full_state(ckpt_dir: str, cfg: Config) -> Dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint of any layout, unsplit, by its TP=1 state-dict name."""
    cfg = unsplit(cfg)
    initialize(cfg)
    (model,) = build_chunks(cfg)
    check_checkpoint_matches([model], ckpt_dir)
    ckpt_lib.load_model_weights(ckpt_dir, [model])
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def read_special_tokens(ckpt_dir: str) -> Optional[dict]:
    """The bos/eos/pad ids converted weights recorded (None for a run's checkpoint or when none were known)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(ckpt_dir).get(SPECIAL_TOKENS)


def write_full_state(state: Dict[str, torch.Tensor], cfg: Config, save_dir: str,
                     special_tokens: Optional[dict] = None) -> str:
    """Write unsplit tensors as a weights-only checkpoint from this one process (loadable at any layout)."""
    cfg = unsplit(cfg)
    initialize(cfg)
    (model,) = build_chunks(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    wrong = [f"{k}: got {tuple(state[k].shape)}, expected {shape}" for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or extra:
        raise ConversionError(f"weights do not fit the model of the config (wrong shape: {wrong[:4]}, missing: "
                              f"{missing[:4]}, unexpected: {extra[:4]})")
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in state:
                param.copy_(state[name])
    return save_weights([model], cfg, save_dir, special_tokens=special_tokens)
