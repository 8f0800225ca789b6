"""Checkpoints in megatron's dist-checkpointing format (``torch_dist``): save, resume, reshard, retention.

Layout of ``save_dir``::

    iter_0000100/            a dist_checkpointing directory (any TP/PP/DP layout can load it)
        metadata.json        written by megatron once every rank finished writing
        common.pt, *.distcp  train state, scheduler, config (common); model, optimizer, RNG (sharded)
        cola_config.yaml     the run's config as plain YAML, written last: a checkpoint is complete when it exists
    latest                   the name of the newest complete checkpoint, replaced atomically after every rank wrote

Sharded state dict: ``model`` (``model0``, ``model1``, ... with virtual pipelining) holds each chunk's
``GPTModel.sharded_state_dict()``; its tensor keys are megatron's global keys (e.g.
``decoder.layers.self_attention.linear_qkv.a_weight``, layers stacked along a leading axis), so any layout loads
them. ``optimizer`` is the megatron optimizer's sharded state (the distributed optimizer in its
``fully_reshardable`` form). ``rng_state`` holds every rank's RNG states, restored only at the same layout.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from cola_megatron.config import Config, ConfigError, config_from_dict

CONFIG_FILE = "cola_config.yaml"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_NAME = re.compile(r"^iter_(\d{7})$")
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

# Fields that decide the shape or meaning of the weights: a checkpoint loads only where they all agree.
MODEL_STRUCTURE_FIELDS = ("arch", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                          "num_query_groups", "rank", "vocab_size", "only_lr_act", "lr_act")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names the fix. Nothing on disk is touched."""


# ------------------------------------------------------------------------------------------------------------
# Names, `latest`, completeness


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_iteration(path: str) -> int:
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise CheckpointError(f"{path!r} is not a checkpoint directory name (expected iter_NNNNNNN)")
    return int(match.group(1))


def is_complete_checkpoint(path: str) -> bool:
    """metadata.json is megatron's last write after all ranks; cola_config.yaml is ours, written after it."""
    return os.path.isfile(os.path.join(path, "metadata.json")) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def complete_checkpoints(save_dir: str) -> List[str]:
    """Names of the complete checkpoints in ``save_dir``, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    names = [n for n in os.listdir(save_dir) if _NAME.match(n) and is_complete_checkpoint(os.path.join(save_dir, n))]
    return sorted(names)


def latest_checkpoint(save_dir: str) -> Optional[str]:
    """The checkpoint ``save_dir/latest`` names, or None when there is no ``latest`` file.

    A ``latest`` that names no complete checkpoint raises :class:`CheckpointError` (never silently start over:
    a later save would bury the checkpoints that are there)."""
    pointer = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, "rb") as f:
        raw = f.read(256)
    name = raw.decode("utf-8", errors="replace").strip()
    path = os.path.join(save_dir, name)
    if not _NAME.match(name) or not is_complete_checkpoint(path):
        available = complete_checkpoints(save_dir)
        fix = (f"write the name of a complete checkpoint into it (e.g. `echo {available[-1]} > {pointer}`; "
               f"complete ones: {', '.join(available)})" if available
               else "delete it if the directory holds no checkpoint you need")
        raise CheckpointError(f"{pointer} names {name[:80]!r}, which is not a complete checkpoint directory. "
                              f"Fix: {fix}, or set checkpoint.load_dir to an iter_NNNNNNN directory")
    return path


def write_latest(save_dir: str, name: str) -> None:
    """Replace ``latest`` atomically: a reader sees the old name or the new one, never a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=save_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_config(ckpt_dir: str, cfg: Config) -> None:
    tmp = os.path.join(ckpt_dir, f".{CONFIG_FILE}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, os.path.join(ckpt_dir, CONFIG_FILE))


def read_checkpoint_config(ckpt_dir: str) -> Config:
    """The config a checkpoint was saved with (its ``cola_config.yaml``); ``ckpt_dir`` may also be a save_dir
    (its ``latest`` checkpoint is read)."""
    if os.path.isdir(ckpt_dir) and not os.path.isfile(os.path.join(ckpt_dir, CONFIG_FILE)):
        ckpt_dir = latest_checkpoint(ckpt_dir) or ckpt_dir
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} has no {CONFIG_FILE}: it is not a complete cola-megatron checkpoint. "
                              "Fix: point at an iter_NNNNNNN directory that `latest` names")
    with open(path) as f:
        values = yaml.safe_load(f)
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"{path} is not a valid config ({e}). Fix: restore the file from the run's config")


def resolve_checkpoint(path: str) -> str:
    """``path`` is a checkpoint directory, or a directory whose ``latest`` names one."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist. Fix: give a save_dir holding a `latest` "
                              "file or an iter_NNNNNNN directory")
    if is_complete_checkpoint(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path!r} holds no checkpoint (no `latest` file, no metadata.json). Fix: give a "
                              "save_dir holding a `latest` file or an iter_NNNNNNN directory")
    return found


def model_mismatches(saved: Config, current: Config) -> List[str]:
    """``model.FIELD: checkpoint X, config Y`` for every structural field that differs."""
    out = []
    for name in MODEL_STRUCTURE_FIELDS:
        a, b = _structure_value(saved.model, name), _structure_value(current.model, name)
        if name == "rank" and saved.model.arch == current.model.arch == "dense":
            continue
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


# ------------------------------------------------------------------------------------------------------------
# Sharded state dicts


def _unwrapped(model_chunks):
    """GPTModels under DDP / Float16Module: their sharded keys do not depend on precision or wrapping."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def _model_keys(n_chunks: int) -> List[str]:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def model_sharded_state_dict(model_chunks) -> Dict[str, dict]:
    chunks = _unwrapped(model_chunks)
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}


def _load_model_state(model_chunks, loaded: Dict[str, dict]) -> None:
    chunks = _unwrapped(model_chunks)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        chunk.load_state_dict(loaded[key], strict=True)


def load_model_weights(ckpt_dir: str, model_chunks) -> None:
    """Load only the model weights of a checkpoint into ``model_chunks`` (any layout; megatron's parallel state
    must be initialised for the chunks' layout)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), ckpt_dir)
    _load_model_state(model_chunks, loaded)


def _inner_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield opt.optimizer


def _populate_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state; megatron's sharded_state_dict(is_loading=True) reads it (the distributed
    optimizer asserts on `step`). Zeros are placeholders that the load overwrites."""
    for inner in _inner_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam) and not isinstance(inner, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` for the loaded sharded state.

    With torch's Adam (no apex/TE fused Adam, e.g. on CPU) each parameter's state holds a ``step`` tensor, but
    megatron 0.16's ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` drops ``step`` before
    calling ``_set_main_param_and_optimizer_states``, which then fails with ``KeyError: 'step'``. For this call
    only, that method keeps the existing ``step`` (already set from the checkpoint's param groups)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            original = opt._set_main_param_and_optimizer_states

            def keep_step(model_param, tensors, _opt=opt, _original=original):
                current = _opt._get_main_param_and_optimizer_states(model_param)
                if "step" in current and "step" not in tensors:
                    tensors = {**tensors, "step": current["step"]}
                _original(model_param, tensors)

            opt._set_main_param_and_optimizer_states = keep_step
            patched.append(opt)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    # Megatron's DistributedOptimizer.load_state_dict gives every parameter the *same* `step` tensor; torch's
    # Adam increments each parameter's step in place, so a shared one would advance once per parameter per step.
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _optimizer_kind(cfg: Config) -> str:
    if cfg.parallel.use_distributed_optimizer:
        return "distributed"
    t = cfg.train
    return "mixed-precision" if t.precision in ("bf16", "fp16") and not t.pure_bf16 else "fp32"


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "vp": vp or 1}


def _rng_sharded_object(state=None):
    """Every rank's RNG states as one ShardedObject indexed by (pp, tp, dp) rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = _layout()
    shape = (layout["pp"], layout["tp"], layout["dp"])
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ------------------------------------------------------------------------------------------------------------
# The checkpointer the trainer calls


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(message: str) -> None:
    if _is_rank0():
        print(message, flush=True)


class Checkpointer:
    """Saves every ``checkpoint.save_interval`` iterations and at the end; resumes from ``load_dir`` or
    ``save_dir``. The constructor finds the checkpoint to resume from and checks its model against the config,
    so bad input fails before anything heavy is built."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        c = cfg.checkpoint
        self.save_dir = c.save_dir
        self.resume_path = self._find_resume_checkpoint()
        self.saved_config = check_same_model(self.resume_path, cfg) if self.resume_path else None
        if self.saved_config is not None and c.load_optimizer:
            self._check_has_optimizer_state()
            self._check_same_optimizer_kind()
        self.resumed_iteration: Optional[int] = None
        self.last_saved_iteration: Optional[int] = None
        self._async_queue = None
        self._saves = 0

    def _check_has_optimizer_state(self) -> None:
        """Weights-only checkpoints (e.g. converted from Hugging Face) have no optimizer entry."""
        from megatron.core import dist_checkpointing

        if "optimizer" not in dist_checkpointing.load_common_state_dict(self.resume_path):
            raise CheckpointError(f"{self.resume_path} holds model weights only, no optimizer state. Fix: set "
                                  "checkpoint.load_optimizer=false to start training from these weights")

    def _check_same_optimizer_kind(self) -> None:
        """The distributed optimizer, megatron's mixed-precision optimizer (fp32 master copies) and its fp32
        optimizer store differently named state: switching between them can only load the model."""
        saved, current = _optimizer_kind(self.saved_config), _optimizer_kind(self.cfg)
        if saved != current:
            raise CheckpointError(
                f"{self.resume_path} holds {saved} optimizer state but this config uses the {current} optimizer "
                f"(parallel.use_distributed_optimizer, train.precision). Fix: set "
                f"parallel.use_distributed_optimizer={str(self.saved_config.parallel.use_distributed_optimizer).lower()}"
                f" and train.precision={self.saved_config.train.precision} as in the checkpoint, or "
                "checkpoint.load_optimizer=false to load the model only")

    def _find_resume_checkpoint(self) -> Optional[str]:
        c = self.cfg.checkpoint
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

    # --------------------------------------------------------------------------------------------------------
    # Resume

    def resume(self, trainer) -> None:
        if self.resume_path is None:
            return
        from megatron.core import dist_checkpointing

        path = self.resume_path
        common = dist_checkpointing.load_common_state_dict(path)
        if common.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} has checkpoint format {common.get('format_version')!r}, this version "
                                  f"reads {FORMAT_VERSION}. Fix: resume with the cola-megatron version that wrote it")
        same_layout = common.get("layout") == _layout()
        load_optimizer = self.cfg.checkpoint.load_optimizer

        sharded = model_sharded_state_dict(trainer.model)
        if load_optimizer:
            _populate_optimizer_state(trainer.optimizer)
            sharded["optimizer"] = trainer.optimizer.sharded_state_dict(
                dict(sharded), is_loading=True, metadata=dict(_OPTIMIZER_METADATA))
        if same_layout:
            sharded["rng_state"] = _rng_sharded_object()
        loaded = dist_checkpointing.load(sharded, path)

        _load_model_state(trainer.model, loaded)
        if load_optimizer:
            _load_optimizer_state(trainer.optimizer, loaded["optimizer"])
        # The config defines the LR schedule (a resumed run may extend train_iters); the checkpoint its position.
        trainer.scheduler.num_steps = loaded["scheduler"]["num_steps"]
        trainer.scheduler.step(increment=0)
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        for key, value in loaded["train_state"].items():
            setattr(trainer.state, key, value)
        self.resumed_iteration = trainer.state.iteration
        self.last_saved_iteration = trainer.state.iteration
        note = "" if same_layout else f" (saved at layout {common.get('layout')}; RNG states from train.seed)"
        _say(f"cola-train: resumed from {path} at iteration {trainer.state.iteration}{note}")

    # --------------------------------------------------------------------------------------------------------
    # Save

    def maybe_save(self, trainer) -> None:
        self._finalize_async(blocking=False)
        interval = self.cfg.checkpoint.save_interval
        if self.save_dir and interval and trainer.state.iteration % interval == 0:
            self.save(trainer)

    def save_final(self, trainer, reason: str) -> None:
        if self.save_dir and trainer.state.iteration != self.last_saved_iteration:
            self.save(trainer)
        self._finalize_async(blocking=True)

    def close(self, abort: bool = False) -> None:
        """Finish (or, after an error, abandon) a pending async save; `latest` only moves when it finished."""
        if self._async_queue is not None:
            if not abort:
                self._finalize_async(blocking=True)
            self._async_queue.close(abort=abort)
            self._async_queue = None

    def _check_finite(self, trainer) -> None:
        bad = any(not torch.isfinite(p).all() for chunk in trainer.model for p in chunk.parameters())
        flag = torch.tensor([1.0 if bad else 0.0], device=trainer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            from cola_megatron.trainer import TrainingStopped

            previous = latest_checkpoint(self.save_dir) if os.path.isdir(self.save_dir) else None
            raise TrainingStopped(
                f"model parameters are NaN/inf at iteration {trainer.state.iteration}; refusing to save them. "
                f"Fix: resume from the last good checkpoint ({previous or 'none saved yet'}) with a lower "
                "optimizer.lr or a smaller optimizer.clip_grad")

    def save(self, trainer) -> None:
        from megatron.core import dist_checkpointing

        self._check_finite(trainer)
        it = trainer.state.iteration
        name = checkpoint_name(it)
        path = os.path.join(self.save_dir, name)
        if _is_rank0():
            os.makedirs(self.save_dir, exist_ok=True)
            _clear_target(path)
            os.makedirs(path)
        dist.barrier()

        sharded = model_sharded_state_dict(trainer.model)
        sharded["optimizer"] = trainer.optimizer.sharded_state_dict(dict(sharded),
                                                                    metadata=dict(_OPTIMIZER_METADATA))
        sharded["rng_state"] = _rng_sharded_object(_rng_state())
        sharded["scheduler"] = trainer.scheduler.state_dict()
        s = trainer.state
        sharded["train_state"] = {"iteration": s.iteration, "consumed_samples": s.consumed_samples,
                                  "skipped_steps": s.skipped_steps, "extra": dict(s.extra)}
        sharded["config"] = self.cfg.to_dict()
        sharded["layout"] = _layout()
        sharded["format_version"] = FORMAT_VERSION

        self._saves += 1
        asynchronous = self.cfg.checkpoint.async_save
        request = dist_checkpointing.save(sharded, path, async_sharded_save=asynchronous)
        _maybe_die_for_test(self._saves)

        def commit():
            dist.barrier()  # every rank's files are written (megatron's metadata.json follows them)
            if _is_rank0():
                write_config(path, self.cfg)
                write_latest(self.save_dir, name)
                self._apply_retention(name)
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

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def _finalize_async(self, blocking: bool) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    def _apply_retention(self, newest: str) -> None:
        """Keep the newest ``keep_last`` complete checkpoints, and always the one this run resumed from."""
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return
        newest_it = checkpoint_iteration(newest)
        protected = {newest}
        if self.resume_path and os.path.dirname(os.path.abspath(self.resume_path)) == os.path.abspath(self.save_dir):
            protected.add(os.path.basename(os.path.normpath(self.resume_path)))
        older = [n for n in complete_checkpoints(self.save_dir) if checkpoint_iteration(n) <= newest_it]
        for name in older[:-keep] if len(older) > keep else []:
            if name not in protected:
                shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)


def _clear_target(path: str) -> None:
    """Make room for a new checkpoint at ``path``. An incomplete directory is a leftover of an interrupted save
    (`latest` never named it) and goes; a complete one (a run resumed from an older checkpoint and reached this
    iteration again) is kept under another name, since nothing saved may be lost."""
    if not os.path.exists(path):
        return
    if not is_complete_checkpoint(path):
        shutil.rmtree(path)
        return
    n = 1
    while os.path.exists(f"{path}.replaced-{n}"):
        n += 1
    os.rename(path, f"{path}.replaced-{n}")
    _say(f"cola-train: kept the earlier {os.path.basename(path)} as {os.path.basename(path)}.replaced-{n}")


def _maybe_die_for_test(save_number: int) -> None:
    """Tests simulate a node dying in the middle of a save: ``COLA_TEST_SIGKILL_AT_SAVE=N`` SIGKILLs this process
    after the N-th save wrote its files but before it is committed (cola_config.yaml, `latest`)."""
    target = os.environ.get("COLA_TEST_SIGKILL_AT_SAVE")
    if target and int(target) == save_number:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
