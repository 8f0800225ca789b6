"""Reading and writing megatron ``torch_dist`` checkpoints for conversion, on top of :mod:`cola_megatron.training.checkpoint`.

A checkpoint's tensors carry megatron's global keys, so building a model of *any* layout and loading its sharded
state dict gets the right slices; conversion reads at TP=1/PP=1 in one process and so gets the unsplit tensors.

Converted weights (from Hugging Face or a dense model) are written as a *weights-only* checkpoint: the model, the
run config, and a train state at iteration 0, but no optimizer, scheduler or RNG state. ``cola-train`` continues from
one with ``checkpoint.load_dir=DIR checkpoint.load_optimizer=false`` (fresh optimizer, schedule from the start).
"""

from __future__ import annotations

import contextlib
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


def check_checkpoint_matches(model_state: Dict[str, dict], ckpt_dir: str) -> None:
    """Every tensor of a model sharded state dict (:func:`model_layout_state`) is in the checkpoint with the same
    global shape, else one clear error (before any data is read)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    problems = set()
    for entries in model_state.values():
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


@contextlib.contextmanager
def _without_zip_checksums():
    """torch's distributed-checkpoint writer stores each tensor with ``torch.save``, whose zip records carry a CRC-32
    that ``torch.load`` never checks; computing it makes the write several times slower (1.0 against 3.3 GB/s for
    an 800 MB tensor on a 2-core x86 host, torch 2.13). Conversion skips it (torch >= 2.6 has the switch); a run's
    checkpoints get their checksums from the manifest."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def save_sharded(sharded: dict, cfg: Config, save_dir: str, iteration: int, manifest: bool = False) -> str:
    """Write this rank's sharded state dict as ``save_dir/iter_NNNNNNN`` (every rank calls it), then the config and,
    once every rank's files are in place, ``latest``. With ``manifest``, the ranks checksum the files first, as a
    run's checkpoint has them checked before it is resumed."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from cola_megatron.training.checkpoint.manifest import write_manifest_from_all_ranks

    name = ckpt_lib.checkpoint_name(iteration)
    ckpt_dir = os.path.join(save_dir, name)
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    with _without_zip_checksums():
        dist_checkpointing.save(sharded, ckpt_dir)
    dist.barrier()  # every rank's files are written before the checkpoint is declared complete
    if manifest:
        write_manifest_from_all_ranks(ckpt_dir)
    if dist.get_rank() == 0:
        ckpt_lib.write_config(ckpt_dir, cfg)
        ckpt_lib.write_latest(save_dir, name)
    dist.barrier()
    return ckpt_dir


def save_weights(model_state: Dict[str, dict], cfg: Config, save_dir: str,
                 train_state: Optional[dict] = None, special_tokens: Optional[dict] = None) -> str:
    """Write this rank's model sharded state dict (:func:`filled_model_state`) as a weights-only checkpoint
    ``save_dir/iter_NNNNNNN`` (every rank calls it).

    The common entries are those ``CheckpointManager.load`` reads, for a run that starts from these weights: the
    train state (iteration 0 unless given), the schedule at its start, and no layout, so that no RNG state is
    expected; ``contents`` marks the missing optimizer state.
    """
    train_state = dict(train_state or {"iteration": 0, "consumed_samples": 0, "skipped_steps": 0, "extra": {}})
    sharded = dict(model_state)
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
    return save_sharded(sharded, cfg, save_dir, train_state["iteration"])


# --------------------------------------------------------------------------------------------------------------
# Streaming: sharded state dicts without a model in memory


def model_layout_state(cfg: Config) -> Dict[str, dict]:
    """This rank's model sharded state dict for ``cfg``'s layout, built on the meta device: every entry's key,
    shape, offsets and TP split, and no data. Conversion attaches data one group of tensors at a time."""
    with torch.device("meta"):
        chunks = build_chunks(cfg)
    state = ckpt_lib.model_sharded_state_dict(chunks)
    return {chunk: {k: v for k, v in entries.items() if _is_tensor_entry(v)} for chunk, entries in state.items()}


def _is_tensor_entry(entry) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(entry, (ShardedTensor, ShardedTensorFactory))


def with_data(entry, data: torch.Tensor):
    """``entry`` (a ShardedTensor or ShardedTensorFactory) holding ``data`` instead of its placeholder."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(entry, ShardedTensor):
        return dataclasses.replace(entry, data=data, dtype=data.dtype)
    return dataclasses.replace(entry, data=data)


def stored_dtype(ckpt_dir: str) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (a run's parameter dtype; converted weights' source dtype)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    entry = metadata.get("embedding.word_embeddings.weight") or next(
        v for k, v in metadata.items() if k.startswith("decoder.layers."))
    return entry.dtype


class CheckpointReader:
    """Unsplit tensors of a ``torch_dist`` checkpoint of any layout, by TP=1 state-dict name, read a few at a time
    in this one process (no collectives).

    The model's sharded state dict (built on the meta device) says which region of which stored tensor each name
    is; torch's distributed-checkpoint reader reads just the stored chunks overlapping it. (megatron's own
    ``dist_checkpointing.load`` of a part of the model cannot run in a one-process group: it describes the parts
    it does not read as another rank's.)
    """

    def __init__(self, ckpt_dir: str, cfg: Config):
        from torch.distributed.checkpoint import FileSystemReader

        self.ckpt_dir = ckpt_dir
        self.cfg = unsplit(cfg)
        initialize(self.cfg)
        state = model_layout_state(self.cfg)
        check_checkpoint_matches(state, ckpt_dir)
        (self.entries,) = state.values()
        self.dtype = stored_dtype(ckpt_dir)
        self.storage = FileSystemReader(ckpt_dir)
        self.metadata = self.storage.read_metadata()
        self.storage.set_up_storage_reader(self.metadata, is_coordinator=True)

    def read(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        request = {n: with_data(self.entries[n], torch.empty(self.entries[n].data.shape, dtype=self.dtype))
                   for n in names}
        read_sharded_tensors(self.storage, self.metadata, request)
        return {n: entry.data for n, entry in request.items()}


def read_sharded_tensors(storage, metadata, request: Dict[str, object]) -> None:
    """Fill the data of ``request``'s ShardedTensors (and factories) from a checkpoint, reading only the stored
    chunks that overlap them."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    import copy as copy_lib

    built = copy_lib.copy(request)
    apply_factories(built)
    targets, items = {}, []
    for entry in nested_values(built):
        stored = metadata.state_dict_metadata.get(entry.key)
        if stored is None or tuple(stored.size) != tuple(entry.global_shape):
            raise ConversionError(f"the checkpoint does not hold {entry.key} of shape {tuple(entry.global_shape)} "
                                  f"(it holds {tuple(stored.size) if stored else 'nothing'} there): it is not a "
                                  "checkpoint of the model its config describes")
        offsets = tuple(entry.global_offset)
        shape = (1,) * entry.prepend_axis_num + tuple(entry.local_shape)
        targets[(entry.key, offsets)] = entry.data.view(shape)
        items += create_read_items_for_chunk_list(entry.key, stored, [ChunkStorageMetadata(offsets, shape)])
    storage.read_data(LoadPlan(items), _IntoTensors(targets)).wait()
    for name, entry in request.items():
        if isinstance(entry, ShardedTensorFactory):  # e.g. [gate; up] stored as two tensors
            parts = dict_list_map_inplace(lambda e: e.data, built[name])
            entry.data.copy_(entry.merge_fn(parts))


class _IntoTensors:
    """The part of torch's LoadPlanner the storage reader calls: where each read chunk goes."""

    def __init__(self, targets):
        self.targets = targets

    def resolve_tensor(self, item):
        tensor = self.targets[(item.dest_index.fqn, tuple(item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, item, tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:
        raise ConversionError(f"unexpected non-tensor entry {item.dest_index.fqn} among the weights")


class ScratchTensors:
    """Tensors in file-backed shared mappings of unlinked files under ``directory``.

    megatron's writer resolves every tensor of a rank before it writes the first; holding them in file pages
    instead of anonymous memory lets the kernel write them back and reclaim them under memory pressure, so the
    resident memory a conversion needs does not grow with the model. The files are unlinked at once: nothing is
    left behind, even by a killed process.
    """

    def __init__(self, directory: str):
        import tempfile

        os.makedirs(directory, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix=".scratch-", dir=directory)
        self.count = 0

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        if numel == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        path = os.path.join(self.directory, str(self.count))
        self.count += 1
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(tuple(shape))
        os.unlink(path)
        return tensor

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def with_scratch(state: Dict[str, dict], scratch: ScratchTensors, dtype: torch.dtype) -> Dict[str, dict]:
    """``state`` (``{chunk: {name: entry}}``, on the meta device) with an empty scratch tensor of ``dtype`` in each
    entry, for a ``fill`` to write into."""
    return {chunk: {name: with_data(entry, scratch.empty(entry.data.shape, dtype)) for name, entry in entries.items()}
            for chunk, entries in state.items()}


def writable(state: dict, scratch: ScratchTensors) -> dict:
    """A filled sharded state dict as megatron's writer takes it: factories applied, and each tensor a storage of
    its own (the writer would otherwise copy a view's whole storage)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import apply_factories

    apply_factories(state)

    def own_storage(entry):
        data = getattr(entry, "data", None)
        if not isinstance(data, torch.Tensor) or data.untyped_storage().nbytes() == data.numel() * data.element_size():
            return entry
        own = scratch.empty(data.shape, data.dtype)  # a view (a factory's part): its own file
        own.copy_(data)
        return with_data(entry, own)

    dict_list_map_inplace(own_storage, state)
    return state


def filled_model_state(cfg: Config, scratch: ScratchTensors, dtype: torch.dtype, fill) -> Dict[str, dict]:
    """This rank's model sharded state dict with scratch tensors of ``dtype`` that ``fill(entries_by_chunk)``
    fills, ready for megatron's writer."""
    state = with_scratch(model_layout_state(cfg), scratch, dtype)
    fill(state)
    return writable(state, scratch)


def write_weights(cfg: Config, save_dir: str, dtype: torch.dtype, fill, train_state: Optional[dict] = None,
                  special_tokens: Optional[dict] = None) -> str:
    """A weights-only checkpoint of ``cfg``'s layout written by this rank (every rank of the layout calls it);
    ``fill(state)`` puts the tensors into this rank's sharded state dict ``{chunk: {name: entry}}``."""
    initialize(cfg)
    scratch = ScratchTensors(save_dir)
    try:
        state = filled_model_state(cfg, scratch, dtype, fill)
        return save_weights(state, cfg, save_dir, train_state, special_tokens)
    finally:
        scratch.close()


def read_special_tokens(ckpt_dir: str) -> Optional[dict]:
    """The bos/eos/pad ids converted weights recorded (None for a run's checkpoint or when none were known)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(ckpt_dir).get(SPECIAL_TOKENS)


def write_full_state(state: Dict[str, torch.Tensor], cfg: Config, save_dir: str,
                     special_tokens: Optional[dict] = None) -> str:
    """Write unsplit tensors held in memory as a weights-only checkpoint from this one process (small models)."""
    cfg = unsplit(cfg)
    dtype = next(iter(state.values())).dtype

    def fill(sharded):
        (entries,) = sharded.values()
        missing, extra = sorted(set(entries) - set(state)), sorted(set(state) - set(entries))
        wrong = [f"{k}: got {tuple(state[k].shape)}, expected {tuple(e.data.shape)}" for k, e in entries.items()
                 if k in state and tuple(state[k].shape) != tuple(e.data.shape)]
        if wrong or missing or extra:
            raise ConversionError(f"weights do not fit the model of the config (wrong shape: {wrong[:4]}, missing: "
                                  f"{missing[:4]}, unexpected: {extra[:4]})")
        for name, entry in entries.items():
            entry.data.copy_(state[name])

    return write_weights(cfg, save_dir, dtype, fill, special_tokens=special_tokens)
