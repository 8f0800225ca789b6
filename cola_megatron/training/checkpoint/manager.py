"""The checkpoint manager: saves and restores a run's explicit parts in megatron's ``torch_dist`` format.

Layout of ``save_dir``::

    iter_0000100/            a dist_checkpointing directory (any TP/PP/DP layout can load it)
        metadata.json        written by megatron once every rank finished writing
        common.pt, *.distcp  train state, scheduler, config (common); model, optimizer, RNG (sharded)
        cola_config.yaml     the run's config as plain YAML, written last: a checkpoint is complete when it exists
    latest                   the name of the newest complete checkpoint, replaced atomically after every rank wrote

The parts are given to the manager by whoever owns them (the trainer): model chunks, optimizer, LR scheduler and a
train state with ``state_dict()`` / ``load_state_dict()`` (iteration and data position). RNG states are the
process's own. :func:`plan_resume` runs before anything heavy is built: it finds the checkpoint to resume from and
refuses one that cannot be used, so bad input fails in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from cola_megatron import faults
from cola_megatron.compat.megatron import load_optimizer_state, populate_optimizer_state
from cola_megatron.config import Config
from cola_megatron.errors import CheckpointError, TrainingStopped
from cola_megatron.training.checkpoint.paths import (
    LATEST_FILE,
    apply_retention,
    checkpoint_name,
    clear_target,
    complete_checkpoints,
    latest_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
    write_config,
    write_latest,
)
from cola_megatron.training.checkpoint.state import (
    OPTIMIZER_METADATA,
    current_layout,
    load_model_state,
    model_sharded_state_dict,
    optimizer_kind,
    rng_sharded_object,
    rng_state,
    set_rng_state,
)

FORMAT_VERSION = 1

# Fields that decide the shape or meaning of the weights: a checkpoint loads only where they all agree.
MODEL_STRUCTURE_FIELDS = ("arch", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                          "num_query_groups", "rank", "vocab_size", "only_lr_act", "lr_act")


# ------------------------------------------------------------------------------------------------------------
# Up-front checks


def model_mismatches(saved: Config, current: Config) -> List[str]:
    """``model.FIELD: checkpoint X, config Y`` for every structural field that differs."""
    out = []
    for name in MODEL_STRUCTURE_FIELDS:
        a, b = _structure_value(saved.model, name), _structure_value(current.model, name)
        if name in ("rank", "only_lr_act") and saved.model.arch == current.model.arch == "dense":
            continue  # CoLA-only fields: a dense config may inherit them from the CoLA config it includes
        if a != b:
            out.append(f"model.{name}: checkpoint {a!r}, config {b!r}")
    return out


def _structure_value(m, name):
    if name == "ffn_hidden_size":
        return m.padded_ffn_hidden_size
    if name == "num_query_groups":
        return m.num_query_groups or m.num_attention_heads
    return getattr(m, name)


def check_same_model(ckpt_dir: str, cfg: Config) -> Config:
    """Refuse (before any heavy work) a checkpoint whose model differs from ``cfg``; returns its config."""
    saved = read_checkpoint_config(ckpt_dir)
    diffs = model_mismatches(saved, cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt_dir} was saved for another model shape: {'; '.join(diffs)}. "
                              "Fix: set these model fields to the checkpoint's values, or start a new run with "
                              "another checkpoint.save_dir and no checkpoint.load_dir")
    return saved


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from and the config it was saved with."""

    path: str
    saved_config: Config


def plan_resume(cfg: Config) -> Optional[ResumePoint]:
    """The checkpoint this run resumes from (``checkpoint.load_dir``, else ``save_dir``'s ``latest``), checked
    against the config; None for a fresh start."""
    c = cfg.checkpoint
    path = _find_resume_checkpoint(cfg)
    if path is None:
        return None
    saved = check_same_model(path, cfg)
    if c.load_optimizer:
        _check_has_optimizer_state(path)
        _check_same_optimizer_kind(path, saved, cfg)
    return ResumePoint(path, saved)


def _find_resume_checkpoint(cfg: Config) -> Optional[str]:
    c = cfg.checkpoint
    if c.load_dir:
        if not os.path.exists(c.load_dir):
            raise CheckpointError(f"checkpoint.load_dir={c.load_dir!r} does not exist. Fix: point it at a "
                                  "save_dir holding a `latest` file or at an iter_NNNNNNN directory, or set "
                                  "checkpoint.load_dir=null to start from scratch")
        return resolve_checkpoint(c.load_dir)
    if not c.save_dir or not os.path.isdir(c.save_dir):
        return None
    found = latest_checkpoint(c.save_dir)
    if found is None and complete_checkpoints(c.save_dir):
        names = complete_checkpoints(c.save_dir)
        raise CheckpointError(
            f"{c.save_dir} holds checkpoints ({', '.join(names)}) but no `latest` file. Fix: write the name of "
            f"the one to resume from into it (`echo {names[-1]} > {os.path.join(c.save_dir, LATEST_FILE)}`), "
            "or use another checkpoint.save_dir")
    return found


def _check_has_optimizer_state(path: str) -> None:
    """Weights-only checkpoints (e.g. converted from Hugging Face) have no optimizer entry."""
    from megatron.core import dist_checkpointing

    if "optimizer" not in dist_checkpointing.load_common_state_dict(path):
        raise CheckpointError(f"{path} holds model weights only, no optimizer state. Fix: set "
                              "checkpoint.load_optimizer=false to start training from these weights")


def _check_same_optimizer_kind(path: str, saved: Config, cfg: Config) -> None:
    """The distributed optimizer, megatron's mixed-precision optimizer (fp32 master copies) and its fp32
    optimizer store differently named state: switching between them can only load the model."""
    before, now = optimizer_kind(saved), optimizer_kind(cfg)
    if before != now:
        raise CheckpointError(
            f"{path} holds {before} optimizer state but this config uses the {now} optimizer "
            f"(parallel.use_distributed_optimizer, train.precision). Fix: set "
            f"parallel.use_distributed_optimizer={str(saved.parallel.use_distributed_optimizer).lower()}"
            f" and train.precision={saved.train.precision} as in the checkpoint, or "
            "checkpoint.load_optimizer=false to load the model only")


# ------------------------------------------------------------------------------------------------------------
# The manager


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(message: str) -> None:
    if _is_rank0():
        print(message, flush=True)


class CheckpointManager:
    """Saves the given parts every ``checkpoint.save_interval`` iterations and at the end; restores them from a
    :class:`ResumePoint`."""

    def __init__(self, cfg: Config, *, model_parts: Sequence[torch.nn.Module], optimizer, scheduler, train_state,
                 resume: Optional[ResumePoint] = None):
        self.cfg = cfg
        self.save_dir = cfg.checkpoint.save_dir
        self.model_parts = list(model_parts)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_state = train_state
        self.resume_point = resume
        self.last_saved_iteration: Optional[int] = None
        self._async_queue = None

    @property
    def resume_path(self) -> Optional[str]:
        return self.resume_point.path if self.resume_point else None

    @property
    def _device(self) -> torch.device:
        return next(self.model_parts[0].parameters()).device

    # --------------------------------------------------------------------------------------------------------
    # Resume

    def load(self) -> None:
        """Restore every part from the resume point (nothing to do for a fresh start)."""
        if self.resume_point is None:
            return
        from megatron.core import dist_checkpointing

        path = self.resume_point.path
        common = dist_checkpointing.load_common_state_dict(path)
        if common.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} has checkpoint format {common.get('format_version')!r}, this version "
                                  f"reads {FORMAT_VERSION}. Fix: resume with the cola-megatron version that wrote it")
        same_layout = common.get("layout") == current_layout()
        load_optimizer = self.cfg.checkpoint.load_optimizer

        sharded = model_sharded_state_dict(self.model_parts)
        if load_optimizer:
            populate_optimizer_state(self.optimizer)
            sharded["optimizer"] = self.optimizer.sharded_state_dict(
                dict(sharded), is_loading=True, metadata=dict(OPTIMIZER_METADATA))
        if same_layout:
            sharded["rng_state"] = rng_sharded_object()
        loaded = dist_checkpointing.load(sharded, path)

        load_model_state(self.model_parts, loaded)
        if load_optimizer:
            load_optimizer_state(self.optimizer, loaded["optimizer"])
        # The config defines the LR schedule (a resumed run may extend train_iters); the checkpoint its position.
        self.scheduler.num_steps = loaded["scheduler"]["num_steps"]
        self.scheduler.step(increment=0)
        if same_layout:
            set_rng_state(loaded["rng_state"])
        self.train_state.load_state_dict(loaded["train_state"])
        self.last_saved_iteration = self.train_state.iteration
        note = "" if same_layout else f" (saved at layout {common.get('layout')}; RNG states from train.seed)"
        _say(f"cola-train: resumed from {path} at iteration {self.train_state.iteration}{note}")

    # --------------------------------------------------------------------------------------------------------
    # Save

    def maybe_save(self) -> None:
        """Save when the iteration is a multiple of ``checkpoint.save_interval``."""
        self._finalize_async(blocking=False)
        interval = self.cfg.checkpoint.save_interval
        if self.save_dir and interval and self.train_state.iteration % interval == 0:
            self.save()

    def finish(self) -> None:
        """The end of a run (finished, signalled or timed out): save unless this iteration is saved, and wait."""
        if self.save_dir and self.train_state.iteration != self.last_saved_iteration:
            self.save()
        self._finalize_async(blocking=True)

    def close(self, abort: bool = False) -> None:
        """Finish (or, after an error, abandon) a pending async save; `latest` only moves when it finished."""
        if self._async_queue is not None:
            if not abort:
                self._finalize_async(blocking=True)
            self._async_queue.close(abort=abort)
            self._async_queue = None

    def _check_finite(self) -> None:
        bad = any(not torch.isfinite(p).all() for chunk in self.model_parts for p in chunk.parameters())
        flag = torch.tensor([1.0 if bad else 0.0], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            previous = latest_checkpoint(self.save_dir) if os.path.isdir(self.save_dir) else None
            raise TrainingStopped(
                f"model parameters are NaN/inf at iteration {self.train_state.iteration}; refusing to save them. "
                f"Fix: resume from the last good checkpoint ({previous or 'none saved yet'}) with a lower "
                "optimizer.lr or a smaller optimizer.clip_grad")

    def save(self) -> None:
        from megatron.core import dist_checkpointing

        self._check_finite()
        it = self.train_state.iteration
        name = checkpoint_name(it)
        path = os.path.join(self.save_dir, name)
        if _is_rank0():
            os.makedirs(self.save_dir, exist_ok=True)
            kept = clear_target(path)
            if kept:
                _say(f"cola-train: kept the earlier {name} as {kept}")
            os.makedirs(path)
        dist.barrier()

        sharded = model_sharded_state_dict(self.model_parts)
        sharded["optimizer"] = self.optimizer.sharded_state_dict(dict(sharded), metadata=dict(OPTIMIZER_METADATA))
        sharded["rng_state"] = rng_sharded_object(rng_state())
        sharded["scheduler"] = self.scheduler.state_dict()
        sharded["train_state"] = self.train_state.state_dict()
        sharded["config"] = self.cfg.to_dict()
        sharded["layout"] = current_layout()
        sharded["format_version"] = FORMAT_VERSION

        asynchronous = self.cfg.checkpoint.async_save
        request = dist_checkpointing.save(sharded, path, async_sharded_save=asynchronous)
        faults.point("save_written")

        def commit():
            dist.barrier()  # every rank's files are written (megatron's metadata.json follows them)
            if _is_rank0():
                write_config(path, self.cfg)
                write_latest(self.save_dir, name)
                apply_retention(self.save_dir, name, self.cfg.checkpoint.keep_last, self._protected())
            dist.barrier()
            self.last_saved_iteration = it
            _say(f"cola-train: saved checkpoint {path}")

        if asynchronous:
            self._finalize_async(blocking=True)  # at most one save in flight
            request.add_finalize_fn(commit)
            self._queue().schedule_async_request(request)
            self.last_saved_iteration = it
        else:
            commit()

    def _protected(self) -> List[str]:
        """The checkpoint this run resumed from, when it lives in save_dir, is never pruned."""
        path = self.resume_path
        if path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.save_dir):
            return [os.path.basename(os.path.normpath(path))]
        return []

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def _finalize_async(self, blocking: bool) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)
