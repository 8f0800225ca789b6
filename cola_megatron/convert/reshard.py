"""Rewrite a checkpoint from the processes of another TP/PP layout, offline on CPU.

Every torch_dist checkpoint already loads at any layout, so why rewrite it? Because of how it is written: each
process stores the slices it owns, so a checkpoint written by the target layout's ranks has one file per target rank
holding exactly the slices that rank reads back, every writer holds only 1/(TP·PP) of the model, and the RNG states
saved are those of the target layout's ranks, which a resume at that layout restores. The ranks are spawned here
with gloo (or are the processes of a ``torchrun --nproc-per-node TP*PP`` launch).

Nothing is built to hold weights: each rank builds the target layout's model on the meta device, which says which
slice of which stored tensor it owns, reads just those slices into file-backed scratch and writes them again, so
the ranks together need a few hundred MB each whatever the model size. A run's checkpoint keeps its whole training
state the same way: each optimizer tensor (Adam's moments, fp32 main weights) is stored under its parameter's key
with the parameter's shape (megatron's model-space layout, which both optimizers save here), so it is laid out as
its parameter; the optimizer's param groups and step, the schedule and the data position are carried over as they
are, and each rank records the RNG state a run at the new layout starts with. A checkpoint holding anything else is
refused rather than rewritten without it. A weights-only checkpoint (written by conversion) stays weights-only.

A rank that dies (the kernel's OOM killer, a signal) ends the command in one line naming it, and the output is
removed: no ``latest`` is left to pass for a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import traceback
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from cola_megatron.training import checkpoint as ckpt_lib
from cola_megatron.config import Config, ConfigError
from cola_megatron.convert import megatron_io
from cola_megatron.errors import ConversionError
from cola_megatron.training.distributed import free_port

if TYPE_CHECKING:
    import torch

_OPTIMIZER = "optimizer."
_RNG_OBJECT = "rng_state/"


def _stored_keys(state: Dict[str, dict]) -> set:
    """The checkpoint keys ``state``'s entries are stored under (a factory stores its built parts)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    built = {chunk: dict(entries) for chunk, entries in state.items()}
    apply_factories(built)
    return {entry.key for entry in nested_values(built)}


def optimizer_layout(model: Dict[str, dict], metadata) -> Dict[str, Tuple[Dict[str, dict], "torch.dtype"]]:
    """``{prefix: (state, dtype)}``: for each kind of optimizer tensor the source stores (``optimizer.state.exp_avg.``
    and so on), this rank's model entries under that prefix. Found from the stored keys: ``prefix + parameter key``."""
    model_keys = _stored_keys(model)
    prefixes = {}
    for key, stored in metadata.state_dict_metadata.items():
        if not key.startswith(_OPTIMIZER):
            continue
        for i, char in enumerate(key):
            if char == "." and key[i + 1:] in model_keys:
                prefixes.setdefault(key[:i + 1], stored.properties.dtype)
                break
    return {prefix: ({chunk: {name: dataclasses.replace(entry, key=prefix + entry.key)
                              for name, entry in entries.items()} for chunk, entries in model.items()}, dtype)
            for prefix, dtype in sorted(prefixes.items())}


def _require_everything_kept(states, metadata, source: str) -> None:
    """Every tensor and object of the source is written again by some rank of the target layout."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    mine = set().union(*(_stored_keys(state) for state in states))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    kept = set().union(*gathered)
    left = sorted(k for k, stored in metadata.state_dict_metadata.items() if k not in kept and not (
        k.startswith(_RNG_OBJECT) and not isinstance(stored, TensorStorageMetadata)))
    if left:
        raise ConversionError(
            f"{source} holds {len(left)} entries reshard does not know how to lay out (e.g. {left[:3]}), so they "
            "would be lost. Fix: resume the run at the new layout straight from this checkpoint instead "
            "(cola-train ... checkpoint.load_dir=CKPT): every torch_dist checkpoint loads at any layout")


def _read_all(storage, metadata, state: Dict[str, dict], progress) -> None:
    for entries in state.values():
        for name, entry in entries.items():
            megatron_io.read_sharded_tensors(storage, metadata, {name: entry})
            progress(entry.data.numel() * entry.data.element_size())


def _reshard(cfg: Config, source: str, save_dir: str, progress) -> None:
    """This rank's slices (and its slices of the optimizer state) read into file-backed scratch, written again."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    from cola_megatron.training.checkpoint.state import current_layout, rng_sharded_object, rng_state

    storage = FileSystemReader(source)
    metadata = storage.read_metadata()
    storage.set_up_storage_reader(metadata, is_coordinator=True)
    common = dist_checkpointing.load_common_state_dict(source)
    weights_only = megatron_io.is_weights_only(source)

    model = megatron_io.model_layout_state(cfg)
    megatron_io.check_checkpoint_matches(model, source)
    optimizer = {} if weights_only else optimizer_layout(model, metadata)
    _require_everything_kept([model] + [state for state, _ in optimizer.values()], metadata, source)

    scratch = megatron_io.ScratchTensors(save_dir)
    try:
        model = megatron_io.with_scratch(model, scratch, megatron_io.stored_dtype(source))
        optimizer = {prefix: megatron_io.with_scratch(state, scratch, dtype)
                     for prefix, (state, dtype) in optimizer.items()}
        progress.planned(sum(entry.data.numel() * entry.data.element_size()
                             for state in [model, *optimizer.values()] for entries in state.values()
                             for entry in entries.values()))
        for state in [model, *optimizer.values()]:
            _read_all(storage, metadata, state, progress)
        sharded = megatron_io.writable(model, scratch)
        if weights_only:
            megatron_io.save_weights(sharded, cfg, save_dir, common.get("train_state"),
                                     common.get(megatron_io.SPECIAL_TOKENS))
            return
        # The optimizer tensors sit beside the source's param groups and step; the nesting is dropped with them.
        sharded["optimizer"] = dict(common["optimizer"], model_space=megatron_io.writable(optimizer, scratch))
        sharded.update({k: v for k, v in common.items() if k != "optimizer"})
        sharded.update(config=cfg.to_dict(), layout=current_layout(), rng_state=rng_sharded_object(rng_state()))
        megatron_io.save_sharded(sharded, cfg, save_dir, common["train_state"]["iteration"], manifest=True)
    finally:
        scratch.close()


class _NoProgress:
    def planned(self, nbytes: int) -> None:
        pass

    def __call__(self, nbytes: int) -> None:
        pass


class _SharedProgress:
    """A rank's side of the progress bar: bytes it plans to read and has read, added to counters the launching
    process shows."""

    def __init__(self, planned, done):
        self.planned_bytes, self.done_bytes = planned, done

    def planned(self, nbytes: int) -> None:
        with self.planned_bytes.get_lock():
            self.planned_bytes.value += nbytes

    def __call__(self, nbytes: int) -> None:
        with self.done_bytes.get_lock():
            self.done_bytes.value += nbytes


def write_rank(cfg: Config, source: str, save_dir: str, progress=None) -> None:
    """This process's part of writing ``source`` again at ``cfg``'s layout."""
    megatron_io.initialize(cfg)
    _reshard(cfg, source, save_dir, progress or _NoProgress())


def _spawned_rank(rank: int, world_size: int, port: int, errors, counters, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from cola_megatron.convert.memory import return_freed_buffers

    return_freed_buffers()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the ranks share this machine's cores
    try:
        write_rank(*args, progress=_SharedProgress(*counters))
    except (ConversionError, ConfigError) as e:
        errors.put(str(e))
        raise
    except BaseException:
        errors.put(traceback.format_exc())
        raise
    finally:
        from cola_megatron.training.distributed import destroy_distributed

        destroy_distributed()


def _show_progress(counters, source: str, save_dir: str, enabled: bool, stop: threading.Event) -> None:
    """The launching process's bar: bytes the ranks have read, then bytes in the output, against what they plan
    to read plus the source's size (about what they write)."""
    from cola_megatron.convert.measure import tree_bytes
    from cola_megatron.convert.progress import Progress

    planned, done = counters
    write_estimate = tree_bytes(source)
    progress = Progress(write_estimate, 0, "reshard", enabled)
    while not stop.wait(0.5):
        progress.show(done.value + tree_bytes(save_dir), planned.value + write_estimate,
                      "reading" if done.value < planned.value or not planned.value else "writing")
    progress.close()


def run_ranks(world_size: int, target: Config, source: str, save_dir: str, show_progress: bool = False) -> None:
    """``write_rank`` on ``world_size`` processes: this one when torchrun launched exactly that many, else spawned
    gloo processes on this machine (with a progress bar). A rank's error for bad input is re-raised here."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == world_size and world_size > 1:
        write_rank(target, source, save_dir)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    stop = threading.Event()
    shown = threading.Thread(target=_show_progress, args=(counters, source, save_dir, show_progress, stop),
                             daemon=True)
    shown.start()
    try:
        mp.start_processes(_spawned_rank, args=(world_size, free_port(), errors, counters,
                                                (target, source, save_dir)),
                           nprocs=world_size, join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        message = errors.get() if not errors.empty() else "a rank failed"
        raise ConversionError(message) from None
    except mp.ProcessExitedException as e:
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise ConversionError(
            f"rank {e.error_index} of {world_size} {how} while writing the checkpoint; nothing was kept. Fix: if the "
            "kernel's out-of-memory killer stopped it, free memory or run on a host with more (the ranks together "
            "need a few hundred MB each whatever the model size), then run the same command") from None
    finally:
        stop.set()
        shown.join()


def reshard(source: str, save_dir: str, tensor_parallel: int, pipeline_parallel: int,
            virtual_pipeline: Optional[int] = None, cola_tp_scheme: Optional[str] = None,
            show_progress: bool = False) -> str:
    """``source`` (save_dir or iter dir) → ``save_dir/iter_N`` written at the new layout; returns that directory."""
    ckpt = ckpt_lib.resolve_checkpoint(source)
    cfg = ckpt_lib.read_checkpoint_config(ckpt)
    target = megatron_io.with_layout(cfg, tensor_parallel, pipeline_parallel, virtual_pipeline, cola_tp_scheme)
    megatron_io.require_new_output(save_dir)
    existed = os.path.isdir(save_dir)
    try:
        run_ranks(tensor_parallel * pipeline_parallel, target, os.path.abspath(ckpt), os.path.abspath(save_dir),
                  show_progress)
    except BaseException:  # no half-written checkpoint is left to pass for a complete one
        if existed:
            for entry in os.listdir(save_dir):
                shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
        else:
            shutil.rmtree(save_dir, ignore_errors=True)
        raise
    return ckpt_lib.resolve_checkpoint(save_dir)
