"""The checkpoint manager: saves and restores a run's explicit parts in megatron's ``torch_dist`` format.

Layout of ``save_dir``::

    iter_0000100/            a dist_checkpointing directory (any TP/PP/DP layout can load it)
        metadata.json        written by megatron once every rank finished writing
        common.pt, *.distcp  train state, scheduler, config (common); model, optimizer, RNG (sharded)
        manifest.json        every file's size and CRC-32, checked before the checkpoint is used
        cola_config.yaml     the run's config as plain YAML, written last: a checkpoint is complete when it exists
    latest                   the name of the newest complete checkpoint, replaced atomically after every rank wrote

The parts are given to the manager by whoever owns them (the trainer): model chunks, optimizer, LR scheduler and a
train state with ``state_dict()`` / ``load_state_dict()`` (iteration and data position). RNG states are the
process's own. :func:`plan_resume` runs before anything heavy is built: it finds the checkpoint to resume from and
refuses one that cannot be used, so bad input fails in seconds.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from cola_megatron import faults
from cola_megatron.compat.megatron import load_optimizer_state, populate_optimizer_state
from cola_megatron.config import Config
from cola_megatron.errors import CheckpointError, TrainingStopped
from cola_megatron.training.checkpoint.manifest import (
    checksum_problems,
    raise_damaged,
    read_manifest,
    size_problems,
    write_manifest_from_all_ranks,
)
from cola_megatron.training.checkpoint.paths import (
    LATEST_FILE,
    apply_retention,
    checkpoint_iteration,
    checkpoint_name,
    clear_target,
    complete_checkpoints,
    latest_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
    write_config,
    write_latest,
)
from cola_megatron.training.checkpoint.writers import install as install_writer_guard
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
    raise_damaged(path, size_problems(path))
    if c.load_optimizer:
        _check_has_optimizer_state(path)
        _check_same_optimizer_kind(path, saved, cfg)
        _check_same_run(path, saved, cfg)
        _settle_schedule(path, saved, cfg)
    return ResumePoint(path, saved)


# What decides which samples a run reads, in which order: a checkpoint continues only the run that made it.
RUN_IDENTITY_FIELDS = ("train.seed", "data.paths", "data.split", "data.train_paths", "data.valid_paths",
                       "data.test_paths", "data.tokenizer", "data.layout", "data.mock", "data.reset_position_ids",
                       "data.reset_attention_mask", "data.eod_mask_loss")


def _field(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name, None)


def _check_same_run(path: str, saved: Config, cfg: Config) -> None:
    """A config pointed at another run's save_dir (or load_dir) with another seed or data would continue that
    run's data position in a different sample stream."""
    if cfg.checkpoint.allow_different_run:
        return
    diffs = [f"{k}: checkpoint {_field(saved, k)!r}, config {_field(cfg, k)!r}" for k in RUN_IDENTITY_FIELDS
             if _field(saved, k) != _field(cfg, k)]
    if diffs:
        raise CheckpointError(
            f"{path} was saved by a run with another seed or data ({'; '.join(diffs)}). Fix: use another "
            "checkpoint.save_dir for a new run, set these back to the checkpoint's values, or set "
            "checkpoint.allow_different_run=true to continue this checkpoint with them")


def _decay_length(cfg: Config) -> int:
    o = cfg.optimizer
    return o.decay_iters if o.decay_iters is not None else cfg.train.train_iters


def schedule_differences(saved: Config, cfg: Config) -> List[str]:
    """``optimizer.FIELD: checkpoint X, config Y`` for every optimizer/schedule setting that differs; the decay
    length is compared as used (a null decay_iters follows train.train_iters, so raising train_iters would
    silently re-stretch the schedule)."""
    out = []
    for f in dataclasses.fields(cfg.optimizer):
        if f.name == "decay_iters":
            a, b = _decay_length(saved), _decay_length(cfg)
            if a != b:
                out.append(f"optimizer.decay_iters (null follows train.train_iters): checkpoint {a}, config {b}")
            continue
        a, b = getattr(saved.optimizer, f.name), getattr(cfg.optimizer, f.name)
        if a != b:
            out.append(f"optimizer.{f.name}: checkpoint {a!r}, config {b!r}")
    return out


def _settle_schedule(path: str, saved: Config, cfg: Config) -> None:
    """Decide whose optimizer and schedule settings a resumed run uses (``checkpoint.scheduler_from``); with
    'checkpoint', ``cfg.optimizer`` takes the checkpoint's values (its decay length pinned)."""
    diffs = schedule_differences(saved, cfg)
    if not diffs:
        return
    choice = cfg.checkpoint.scheduler_from
    if choice == "checkpoint":
        cfg.optimizer = dataclasses.replace(saved.optimizer, decay_iters=_decay_length(saved))
        _say(f"cola-train: using the checkpoint's optimizer settings ({'; '.join(diffs)})")
    elif choice == "config":
        _say(f"cola-train: applying the config's optimizer settings ({'; '.join(diffs)})")
    else:
        raise CheckpointError(
            f"the optimizer or LR-schedule settings differ from checkpoint {path}: {'; '.join(diffs)}. Fix: set "
            "checkpoint.scheduler_from=config to apply the config's values, or checkpoint.scheduler_from="
            "checkpoint to keep the checkpoint's (to train longer on the same schedule, set "
            "optimizer.decay_iters to the checkpoint's value)")


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
    if not dist.is_initialized():  # plan_resume runs before the process group exists
        return os.environ.get("RANK", "0") == "0"
    return dist.get_rank() == 0


def _say(message: str) -> None:
    if _is_rank0():
        print(message, flush=True)


class CheckpointManager:
    """Saves the given parts every ``checkpoint.save_interval`` iterations and at the end; restores them from a
    :class:`ResumePoint`.

    A checkpoint is known good once the step run from its weights was applied (finite loss and gradient norm).
    Retention never deletes the newest known-good checkpoint, so a NaN streak that begins right after a save
    still leaves the checkpoint before it; :meth:`fall_back` points ``latest`` there when such a streak stops
    the run."""

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
        # Checkpoints this run saved or resumed from, by iteration, and the iteration whose weights made the
        # newest applied step: a checkpoint at or before it (and after any streak) is known good.
        self._known: Dict[int, str] = {}
        self._good_iteration: Optional[int] = None
        self._newest_committed: Optional[str] = None
        if resume is not None:
            self._known[checkpoint_iteration(resume.path)] = os.path.abspath(resume.path)
        if self.save_dir:
            install_writer_guard()

    @property
    def resume_path(self) -> Optional[str]:
        return self.resume_point.path if self.resume_point else None

    @property
    def _device(self) -> torch.device:
        return next(self.model_parts[0].parameters()).device

    # --------------------------------------------------------------------------------------------------------
    # Resume

    def _verify_checksums(self, path: str) -> None:
        """Every rank checks its share of the files against the manifest; all ranks raise the same error."""
        files = sorted(read_manifest(path) or {})
        world, rank = dist.get_world_size(), dist.get_rank()
        problems = checksum_problems(path, files[rank::world])
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        raise_damaged(path, sorted(p for rank_problems in gathered for p in rank_problems))

    def load(self) -> None:
        """Restore every part from the resume point (nothing to do for a fresh start)."""
        if self.resume_point is None:
            return
        from megatron.core import dist_checkpointing

        path = self.resume_point.path
        self._verify_checksums(path)
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
        try:
            loaded = dist_checkpointing.load(sharded, path)
        except (EOFError, OSError, RuntimeError) as e:
            # Damage the size check cannot see (a checkpoint without a manifest): name what failed.
            raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e)[:200]}). "
                                  "Fix: resume from an earlier checkpoint (checkpoint.load_dir=SAVE_DIR/"
                                  "iter_NNNNNNN)") from None

        load_model_state(self.model_parts, loaded)
        if load_optimizer:
            settings = _param_group_settings(self.optimizer)
            load_optimizer_state(self.optimizer, loaded["optimizer"])
            # The checkpoint's param groups carry its max/min LR, betas, eps and weight decay, which megatron's
            # scheduler would follow: the config's (as settled by plan_resume) apply.
            _restore_param_group_settings(self.optimizer, settings)
        # The config defines the LR schedule; the checkpoint its position.
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

    def maybe_save(self, allowed: bool = True) -> None:
        """Save when the iteration is a multiple of ``checkpoint.save_interval`` (never when ``allowed`` is false:
        the trainer is inside a streak of non-finite steps)."""
        self._finalize_async(blocking=False)
        interval = self.cfg.checkpoint.save_interval
        if allowed and self.save_dir and interval and self.train_state.iteration % interval == 0:
            self.save()

    def finish(self, allowed: bool = True) -> None:
        """The end of a run (finished, signalled or timed out): save unless this iteration is saved, and wait.
        The run ended on an applied step, so its last checkpoint counts as good."""
        if allowed:
            self._good_iteration = self.train_state.iteration
            if self.save_dir and self.train_state.iteration != self.last_saved_iteration:
                self.save()
        self._finalize_async(blocking=True)
        if allowed:
            self._retain()

    def close(self, abort: bool = False) -> None:
        """Finish (or, after an error, abandon) a pending async save; `latest` only moves when it finished."""
        if self._async_queue is not None:
            if not abort:
                self._finalize_async(blocking=True)
            self._async_queue.close(abort=abort)
            self._async_queue = None

    def note_step(self, start_iteration: int, applied: bool) -> None:
        """After every step: an applied step proves the weights it started from; checkpoints before the newest
        proven one may then go."""
        if applied:
            self._good_iteration = start_iteration
            self._retain()

    def _newest_good(self) -> Optional[str]:
        if self._good_iteration is None:
            return None
        good = [it for it in self._known if it <= self._good_iteration]
        return self._known[max(good)] if good else None

    def fall_back(self) -> str:
        """After a streak of non-finite steps stopped the run: point ``latest`` at the newest known-good checkpoint
        (the newer ones hold the weights that produced the streak and stay on disk). Returns a sentence for the
        stop message saying where a rerun resumes."""
        self._finalize_async(blocking=True)  # a save still in flight commits first, so `latest` ends here
        good = self._newest_good()
        bad = [p for it, p in sorted(self._known.items()) if self._good_iteration is None or it > self._good_iteration]
        kept = f" ({', '.join(os.path.basename(p) for p in bad)} kept for inspection)" if bad else ""
        if good is None:
            where = (f"; no checkpoint before the streak exists{kept}. Fix: start a new run (another "
                     "checkpoint.save_dir) with a lower optimizer.lr")
            return where
        name = os.path.basename(good)
        in_save_dir = self.save_dir and os.path.dirname(good) == os.path.abspath(self.save_dir)
        if in_save_dir:
            if _is_rank0():
                write_latest(self.save_dir, name)
            dist.barrier()
            return (f"; `latest` now names {name}, the newest checkpoint whose next step was finite{kept}. Fix: "
                    "rerun with a lower optimizer.lr and checkpoint.scheduler_from=config (so the new value "
                    "applies), or a positive optimizer.clip_grad")
        return (f"; the newest checkpoint whose next step was finite is {good}{kept}. Fix: rerun with "
                f"checkpoint.load_dir={good}, a lower optimizer.lr and checkpoint.scheduler_from=config")

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
        self._finalize_async(blocking=True)  # at most one save in flight; the previous one commits first
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
        faults.point("save_start")

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
            faults.point("save_committing")
            write_manifest_from_all_ranks(path)
            if _is_rank0():
                write_config(path, self.cfg)
                write_latest(self.save_dir, name, before_replace=lambda: faults.point("save_before_latest"))
            self._known[it] = os.path.abspath(path)
            self._newest_committed = name
            self._retain()
            dist.barrier()
            self.last_saved_iteration = it
            _say(f"cola-train: saved checkpoint {path}")

        if asynchronous:
            request.add_finalize_fn(commit)
            self._queue().schedule_async_request(request)
            self.last_saved_iteration = it
        else:
            commit()

    def _retain(self) -> None:
        """keep_last, sparing the checkpoint this run resumed from (when it lives in save_dir) and the newest
        known-good one; superseded checkpoints go in any case. Rank 0 only (no collective: called after single
        steps)."""
        keep = self.cfg.checkpoint.keep_last
        if not (self._newest_committed and _is_rank0()):
            return
        save_dir = os.path.abspath(self.save_dir)
        spared = [p for p in (self.resume_path and os.path.abspath(self.resume_path), self._newest_good())
                  if p and os.path.dirname(p) == save_dir]
        apply_retention(self.save_dir, self._newest_committed, keep, [os.path.basename(p) for p in spared])

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def _finalize_async(self, blocking: bool) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)


_GROUP_SETTINGS = ("max_lr", "min_lr", "betas", "eps", "weight_decay", "lr", "wd_mult", "lr_mult")


def _inner_param_groups(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield opt.optimizer.param_groups


def _param_group_settings(optimizer) -> List[List[dict]]:
    return [[{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in groups] for groups in _inner_param_groups(optimizer)]


def _restore_param_group_settings(optimizer, settings: List[List[dict]]) -> None:
    for groups, saved in zip(_inner_param_groups(optimizer), settings):
        for group, values in zip(groups, saved):
            group.update(values)
