"""Rewrite a checkpoint from the processes of another TP/PP layout, offline on CPU.

Every torch_dist checkpoint already loads at any layout, so why rewrite it? Because of how it is written: each
process stores the slices it owns, so a checkpoint written by the target layout's ranks has one file per target rank
holding exactly the slices that rank reads back, and every writer holds only 1/(TP·PP) of the model (a 7B model
resharded to TP=8 never needs 11 GB in one process). The ranks are spawned here with gloo (or are the processes of
a ``torchrun --nproc-per-node TP*PP`` launch); each builds its chunks of the target layout, loads them from the
source checkpoint by global keys, and saves them.

Only model weights are carried over; the optimizer state of a checkpoint saved with the distributed optimizer's
``fully_reshardable`` format already loads at another layout by itself.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Optional

from cola_megatron.config import Config
from cola_megatron.convert import megatron_io
from cola_megatron.convert.errors import ConversionError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rank(cfg: Config, source: str, save_dir: str, iteration: int) -> None:
    """This process's part: build its chunks of ``cfg``'s layout, load them from ``source``, save them."""
    megatron_io.initialize(cfg)
    chunks = megatron_io.build_chunks(cfg)
    megatron_io.check_checkpoint_matches(chunks, source, megatron_io.CONFIG_FILE)
    megatron_io.load_into(chunks, source)
    megatron_io.save_from(chunks, cfg, save_dir, iteration)


def _spawned_rank(rank: int, world_size: int, port: int, errors, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        write_rank(*args)
    except ConversionError as e:
        errors.put(str(e))
        raise
    except BaseException:
        errors.put(traceback.format_exc())
        raise
    finally:
        from cola_megatron.parallel import destroy_distributed

        destroy_distributed()


def run_ranks(world_size: int, *args) -> None:
    """``write_rank(*args)`` on ``world_size`` processes: this one when torchrun launched exactly that many, else
    spawned gloo processes on this machine. A rank's ConversionError is re-raised here."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == world_size and world_size > 1:
        write_rank(*args)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_spawned_rank, args=(world_size, _free_port(), errors, args), nprocs=world_size,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        message = errors.get() if not errors.empty() else "a rank failed"
        raise ConversionError(message) from None


def reshard(source: str, save_dir: str, tensor_parallel: int, pipeline_parallel: int,
            virtual_pipeline: Optional[int] = None, cola_tp_scheme: Optional[str] = None,
            config_path: Optional[str] = None) -> str:
    """``source`` (save_dir or iter dir) → ``save_dir/iter_N`` written at the new layout; returns that directory."""
    ckpt = megatron_io.resolve_checkpoint(source)
    cfg = megatron_io.read_config(ckpt, config_path)
    target = megatron_io.with_layout(cfg, tensor_parallel, pipeline_parallel, virtual_pipeline, cola_tp_scheme)
    megatron_io.require_new_output(save_dir)
    iteration = megatron_io.iteration_of(ckpt)
    run_ranks(tensor_parallel * pipeline_parallel, target, ckpt, os.path.abspath(save_dir), iteration)
    return os.path.join(save_dir, megatron_io.iteration_dir_name(iteration))
