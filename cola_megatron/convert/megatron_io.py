"""Reading and writing megatron ``torch_dist`` checkpoints for conversion.

A checkpoint is ``save_dir/iter_NNNNNNN/``: a megatron dist-checkpointing directory whose tensors carry megatron's
global keys (layers stacked along a leading axis), plus ``cola_config.yaml`` with the run's config; ``save_dir/latest``
names the newest complete one. Because the keys are global, building a model of *any* layout and asking
dist-checkpointing for its sharded state dict loads the right slices; conversion reads at TP=1/PP=1 in one process
and gets the unsplit tensors.

Conversion writes model weights only (no optimizer, scheduler or RNG state): a run continuing from a converted
checkpoint starts a fresh optimizer (``checkpoint.load_optimizer=false``).
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional, Sequence

import torch
import yaml

from cola_megatron.config import Config, ConfigError, config_from_dict
from cola_megatron.convert.errors import ConversionError

CONFIG_FILE = "cola_config.yaml"
LATEST_FILE = "latest"
DIST_METADATA_FILE = "metadata.json"  # written by megatron dist-checkpointing into every checkpoint directory


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _is_dist_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DIST_METADATA_FILE))


def resolve_checkpoint(path: str) -> str:
    """A run's ``save_dir`` (follows ``latest``) or one ``iter_NNNNNNN`` directory → the checkpoint directory."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path} does not exist or is not a directory: pass a run's checkpoint.save_dir or "
                              "one of its iter_NNNNNNN directories")
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        target = os.path.join(path, name)
        if not _is_dist_checkpoint(target):
            raise ConversionError(f"{latest} names {name!r}, which is not a complete checkpoint; pass one of the "
                                  f"iter_NNNNNNN directories in {path} explicitly")
        return target
    if _is_dist_checkpoint(path):
        return path
    raise ConversionError(f"{path} is not a megatron torch_dist checkpoint (no {DIST_METADATA_FILE}) and holds no "
                          f"'{LATEST_FILE}' file: pass a run's checkpoint.save_dir or an iter_NNNNNNN directory in it")


def iteration_of(ckpt_dir: str) -> int:
    name = os.path.basename(os.path.normpath(ckpt_dir))
    try:
        return int(name.split("_", 1)[1]) if name.startswith("iter_") else 0
    except ValueError:
        return 0


def read_config(ckpt_dir: str, config_path: Optional[str] = None) -> Config:
    """The run config stored with a checkpoint (or the YAML given instead)."""
    path = config_path or os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{ckpt_dir} holds no {CONFIG_FILE}: pass --config with the YAML the run was trained "
                              "with")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        return config_from_dict(values)
    except (ConfigError, yaml.YAMLError) as e:
        raise ConversionError(f"{path} is not a usable run config: {e}") from None


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


# --------------------------------------------------------------------------------------------------------------
# Models of a layout inside an initialised process group


def initialize(cfg: Config) -> None:
    """Process groups for ``cfg``'s layout (one process when not launched by torchrun), always on CPU."""
    from cola_megatron.parallel import initialize_distributed

    p = cfg.parallel
    initialize_distributed(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline, seed=cfg.train.seed,
                           device="cpu")


def build_chunks(cfg: Config) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), as the trainer builds them, unwrapped."""
    from megatron.core import parallel_state as ps

    from cola_megatron.model import build_model, transformer_config

    tconfig = transformer_config(cfg, use_cpu_initialization=True)
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_model(cfg, tconfig, pre_process=pre, post_process=post, vp_stage=vp_stage))
    return chunks


def sharded_model_state(chunks: Sequence[torch.nn.Module]) -> Dict[str, dict]:
    """The checkpoint's model entries: ``model``, or ``model0``, ``model1`` … with virtual pipelining."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def check_checkpoint_matches(chunks: Sequence[torch.nn.Module], ckpt_dir: str, config_source: str) -> None:
    """Every tensor these chunks need is in the checkpoint with the same global shape, else one clear error."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    problems = []
    for entries in sharded_model_state(chunks).values():
        for entry in entries.values():
            if not isinstance(entry, ShardedTensor):
                continue
            have = stored.get(entry.key)
            if have is None:
                problems.append(f"{entry.key} is missing")
            elif tuple(have.global_shape) != tuple(entry.global_shape):
                problems.append(f"{entry.key}: checkpoint {tuple(have.global_shape)}, config "
                                f"{tuple(entry.global_shape)}")
    if problems:
        unique = sorted(set(problems))
        raise ConversionError(
            f"{ckpt_dir} does not hold the model {config_source} describes ({len(unique)} problems, e.g. "
            f"{unique[:4]}): model.num_layers, hidden_size, ffn_hidden_size, rank or vocab_size differ. Convert with the "
            "config the checkpoint was trained with (--config)."
        )


def load_into(chunks: Sequence[torch.nn.Module], ckpt_dir: str) -> None:
    """Fill this rank's chunks from a checkpoint of any layout."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(sharded_model_state(chunks), ckpt_dir)
    for chunk, key in zip(chunks, sharded_model_state_keys(len(chunks))):
        chunk.load_state_dict(loaded[key], strict=True)


def sharded_model_state_keys(num_chunks: int) -> List[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def save_from(chunks: Sequence[torch.nn.Module], cfg: Config, save_dir: str, iteration: int) -> str:
    """Write this rank's chunks as ``save_dir/iter_NNNNNNN`` (all ranks call it), then the config and ``latest``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = os.path.join(save_dir, iteration_dir_name(iteration))
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), ckpt_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        tmp = os.path.join(save_dir, LATEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(iteration_dir_name(iteration) + "\n")
        os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
    dist.barrier()
    return ckpt_dir


def require_new_output(path: str) -> None:
    """Conversions never write into an existing checkpoint: nothing already saved may be lost."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"output {path} already exists and is not empty: choose a new directory")


# --------------------------------------------------------------------------------------------------------------
# The unsplit model in this process


def unsplit(cfg: Config) -> Config:
    """``cfg`` at TP=1, PP=1: one process holds every tensor whole."""
    return with_layout(cfg, 1, 1, None)


def read_full_state(ckpt_dir: str, cfg: Config, config_source: str = CONFIG_FILE) -> Dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint of any layout, unsplit, by its TP=1 state-dict name."""
    cfg = unsplit(cfg)
    initialize(cfg)
    (model,) = build_chunks(cfg)
    check_checkpoint_matches([model], ckpt_dir, config_source)
    load_into([model], ckpt_dir)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def write_full_state(state: Dict[str, torch.Tensor], cfg: Config, save_dir: str, iteration: int = 0) -> str:
    """Write unsplit tensors as a checkpoint from this one process (loadable at any layout)."""
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
    return save_from([model], cfg, save_dir, iteration)
