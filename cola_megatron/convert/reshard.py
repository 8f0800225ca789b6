"""Rewrite a checkpoint from the processes of another TP/PP layout, offline on CPU.

Every torch_dist checkpoint already loads at any layout, so why rewrite it? Because of how it is written: each
process stores the slices it owns, so a checkpoint written by the target layout's ranks has one file per target rank
holding exactly the slices that rank reads back, every writer holds only 1/(TP·PP) of the model (a 7B model
resharded to TP=8 never needs its 11 GB of fp32 weights in one process), and the RNG states saved are those of the
target layout's ranks, which a resume at that layout restores. The ranks are spawned here with gloo (or are the
processes of a ``torchrun --nproc-per-node TP*PP`` launch).

A run's checkpoint keeps its whole training state: each rank builds the trainer of the target layout (model,
optimizer, scheduler), resumes it from the source with :class:`cola_megatron.training.checkpoint.CheckpointManager` and saves it
again, so the run continues at the new layout where it stopped (and so needs the memory of that trainer). A
weights-only checkpoint (written by conversion) stays weights-only and streams: each rank builds its model on the
meta device, reads only its slices into file-backed scratch and writes them, so the ranks together need a few
hundred MB each whatever the model size. A rank that dies (the kernel's OOM killer, a signal) ends the command in
one line naming it, and the output is removed: no ``latest`` is left to pass for a complete checkpoint.
"""

from __future__ import annotations

import copy
import os
import shutil
import traceback
from typing import Optional

from cola_megatron.training import checkpoint as ckpt_lib
from cola_megatron.config import Config, ConfigError, config_from_dict
from cola_megatron.convert import megatron_io
from cola_megatron.errors import ConversionError
from cola_megatron.training.distributed import free_port



def _with_checkpoint_dirs(cfg: Config, load_dir: Optional[str], save_dir: Optional[str]) -> Config:
    values = copy.deepcopy(cfg.to_dict())
    values["checkpoint"].update(load_dir=load_dir, save_dir=save_dir, async_save=False, save_interval=0)
    return config_from_dict(values)


def _reshard_training_state(cfg: Config, source: str, save_dir: str) -> None:
    """Model, optimizer, scheduler and data position through the trainer of the target layout."""
    import torch

    from cola_megatron.training.trainer import Trainer

    load_cfg = _with_checkpoint_dirs(cfg, source, None)
    trainer = Trainer(load_cfg, torch.device("cpu"), log=False, resume=ckpt_lib.plan_resume(load_cfg))
    trainer.checkpoint.load()
    ckpt_lib.CheckpointManager(_with_checkpoint_dirs(cfg, None, save_dir), model_parts=trainer.model,
                               optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                               train_state=trainer.state).save()


def _reshard_weights(cfg: Config, source: str, save_dir: str) -> None:
    """This rank's slices read straight from the source into file-backed scratch tensors and written again: no
    model in memory, so the ranks together need little more than their interpreters."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(source)
    metadata = storage.read_metadata()
    storage.set_up_storage_reader(metadata, is_coordinator=True)

    def fill(state):
        megatron_io.check_checkpoint_matches(state, source)
        for entries in state.values():
            megatron_io.read_sharded_tensors(storage, metadata, entries)

    common = dist_checkpointing.load_common_state_dict(source)
    megatron_io.write_weights(cfg, save_dir, megatron_io.stored_dtype(source), fill, common.get("train_state"),
                              common.get(megatron_io.SPECIAL_TOKENS))


def write_rank(cfg: Config, source: str, save_dir: str) -> None:
    """This process's part of writing ``source`` again at ``cfg``'s layout."""
    megatron_io.initialize(cfg)
    if megatron_io.is_weights_only(source):
        _reshard_weights(cfg, source, save_dir)
    else:
        _reshard_training_state(cfg, source, save_dir)


def _spawned_rank(rank: int, world_size: int, port: int, errors, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from cola_megatron.convert.memory import return_freed_buffers

    return_freed_buffers()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the ranks share this machine's cores
    try:
        write_rank(*args)
    except (ConversionError, ConfigError) as e:
        errors.put(str(e))
        raise
    except BaseException:
        errors.put(traceback.format_exc())
        raise
    finally:
        from cola_megatron.training.distributed import destroy_distributed

        destroy_distributed()


def run_ranks(world_size: int, *args) -> None:
    """``write_rank(*args)`` on ``world_size`` processes: this one when torchrun launched exactly that many, else
    spawned gloo processes on this machine. A rank's error for bad input is re-raised here."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == world_size and world_size > 1:
        write_rank(*args)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_spawned_rank, args=(world_size, free_port(), errors, args), nprocs=world_size,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        message = errors.get() if not errors.empty() else "a rank failed"
        raise ConversionError(message) from None
    except mp.ProcessExitedException as e:
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise ConversionError(
            f"rank {e.error_index} of {world_size} {how} while writing the checkpoint; nothing was kept. Fix: if the "
            "kernel's out-of-memory killer stopped it, free memory or run on a host with more (the ranks together "
            "need a few GB whatever the model size; a run's checkpoint with its optimizer state needs its size "
            "again), then run the same command") from None


def reshard(source: str, save_dir: str, tensor_parallel: int, pipeline_parallel: int,
            virtual_pipeline: Optional[int] = None, cola_tp_scheme: Optional[str] = None) -> str:
    """``source`` (save_dir or iter dir) → ``save_dir/iter_N`` written at the new layout; returns that directory."""
    ckpt = ckpt_lib.resolve_checkpoint(source)
    cfg = ckpt_lib.read_checkpoint_config(ckpt)
    target = megatron_io.with_layout(cfg, tensor_parallel, pipeline_parallel, virtual_pipeline, cola_tp_scheme)
    megatron_io.require_new_output(save_dir)
    existed = os.path.isdir(save_dir)
    try:
        run_ranks(tensor_parallel * pipeline_parallel, target, os.path.abspath(ckpt), os.path.abspath(save_dir))
    except BaseException:  # no half-written checkpoint is left to pass for a complete one
        if existed:
            for entry in os.listdir(save_dir):
                shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
        else:
            shutil.rmtree(save_dir, ignore_errors=True)
        raise
    return ckpt_lib.resolve_checkpoint(save_dir)
