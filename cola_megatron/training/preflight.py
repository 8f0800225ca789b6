"""Up-front checks of a run's inputs and outputs, before anything heavy is imported or built.

A problem that would otherwise surface hours into a run (the first save into an unwritable directory) or as a
traceback at step 1 (a token id outside the embedding table) is raised here as one :class:`ColaError` naming the
fix. Nothing is created or written. Checked, in order:

- memory: one micro-batch's activations at the config's layout fit some accelerator;
- the tokenizer file, and that its vocabulary fits the model's;
- every ``.bin``/``.idx`` pair: header, sizes, document table and byte offsets; its ``.meta.json`` readable and
  made with ``data.tokenizer`` (sha256); every token id below the vocabulary;
- output directories (``checkpoint.save_dir``, ``logging.log_dir``, the data index cache) writable or creatable.

Warnings (returned, not raised): GEMM widths that run slowly on GPUs (``cost/shapes.py``: the width, its predicted
cost from measured kernels and the fix); too little free disk for the checkpoints the run keeps; a training set the
run would repeat many times.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
from typing import List, Optional

from cola_megatron.config import Config
from cola_megatron.errors import ConfigError, DataError
from cola_megatron.filesystem import existing_ancestor

# The most memory one accelerator has (NVIDIA B300, AMD MI355X: 288 GB). A micro-batch whose activations alone
# exceed it cannot run at that layout on any hardware.
LARGEST_ACCELERATOR_GIB = 288
# Token ids are scanned when a run's files are at most this large; above it the count in .meta.json is used.
SCAN_LIMIT_BYTES = 4 << 30
# More passes over the training data than this is unusual for pre-training and worth a word.
EPOCH_WARNING = 10


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(path: str, key: str, what: str = "") -> None:
    """``path`` is a writable directory, or one that can be created (its nearest existing ancestor is a
    writable directory). ``what`` says what goes there, for the message."""
    path = os.path.abspath(path)
    probe = existing_ancestor(path)
    label = f"{key}={path}" + (f" ({what})" if what else "")
    if not os.path.isdir(probe):
        raise ConfigError(f"{label}: {probe} is a file, not a directory, so it cannot hold or create the "
                          f"directory. Fix: point {key} at a directory path")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise ConfigError(f"{label} {where}. Fix: make it writable or set {key} to a writable directory")


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes of one checkpoint: the weights and the optimizer state (gradients are not saved)."""
    from cola_megatron.cost.memory import state_bytes_per_parameter
    from cola_megatron.models.accounting import count_parameters

    weights, _, optimizer = state_bytes_per_parameter(cfg)
    return count_parameters(cfg.model).total * (weights + optimizer)


def _checkpoints_kept(cfg: Config) -> int:
    c, t = cfg.checkpoint, cfg.train
    saves = (t.train_iters // c.save_interval if c.save_interval else 0) + 1  # + the save at the end
    # While a new checkpoint is written the oldest kept one still exists.
    return min(saves, c.keep_last + 1) if c.keep_last else saves


def free_space_warning(cfg: Config) -> Optional[str]:
    save_dir = cfg.checkpoint.save_dir
    if not save_dir:
        return None
    need = checkpoint_bytes(cfg) * _checkpoints_kept(cfg)
    free = shutil.disk_usage(existing_ancestor(os.path.abspath(save_dir))).free
    if free >= need:
        return None
    return (f"checkpoint.save_dir={save_dir}: {free / 1e9:.3g} GB free, but the {_checkpoints_kept(cfg)} "
            f"checkpoints this run keeps at once need about {need / 1e9:.3g} GB "
            f"({checkpoint_bytes(cfg) / 1e9:.3g} GB each); free space, lower checkpoint.keep_last or save elsewhere")


def check_memory(cfg: Config) -> None:
    """Refuse a layout whose micro-batch cannot fit any accelerator (cola-plan's activation model, which counts
    the tensors autograd keeps; e.g. model.seq_length=10000000)."""
    from cola_megatron.cost.layout import layout_of
    from cola_megatron.cost.memory import GIB, peak_memory

    if cfg.model.arch == "cola" and cfg.parallel.cola_tp_scheme != "bottleneck":
        return  # the activation model describes the default scheme only
    p = cfg.parallel
    memory = peak_memory(cfg, layout_of(cfg, p.tensor_parallel * p.pipeline_parallel))
    need = (memory.activations + memory.workspace) / GIB
    if need > LARGEST_ACCELERATOR_GIB:
        m = cfg.model
        raise ConfigError(
            f"model.seq_length={m.seq_length}, train.micro_batch_size={cfg.train.micro_batch_size}: one "
            f"micro-batch's activations need about {need:,.0f} GiB per GPU at this layout (cola-plan's memory "
            f"model), more than any accelerator holds ({LARGEST_ACCELERATOR_GIB} GiB). Fix: lower model.seq_length "
            "or train.micro_batch_size, or recompute/split more (see cola-plan)")


class _TokenizerFile:
    """What the checks need of data.tokenizer, read with the tokenizers library (no megatron-core import)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer={path} does not exist. Fix: give the tokenizer.json the data was "
                            "tokenized with (cola-preprocess --train-tokenizer writes one)")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # the Rust side raises a bare Exception
            raise DataError(f"data.tokenizer={path} is not a valid tokenizer.json ({error}). Fix: give the "
                            "tokenizer.json the data was tokenized with") from None
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.sha256 = _sha256(path)


def check_tokenizer(cfg: Config) -> Optional[_TokenizerFile]:
    if not cfg.data.tokenizer:
        return None
    tokenizer = _TokenizerFile(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size}. Fix: set model.vocab_size >= {tokenizer.vocab_size} (or retrain "
                        f"the tokenizer with --vocab-size <= {cfg.model.vocab_size})")
    return tokenizer


def check_data(cfg: Config, tokenizer: Optional[_TokenizerFile]) -> dict:
    """Check every data file; returns {prefix: IndexInfo}."""
    from cola_megatron.data.indexed import inspect_indexed_dataset, meta_path, read_meta, token_id_range

    d = cfg.data
    if d.mock:
        return {}
    if tokenizer is None:
        raise DataError("data.tokenizer is not set. Fix: give the tokenizer.json the data was tokenized with")
    infos = {}
    for prefix in dict.fromkeys(d.all_prefixes()):
        info = inspect_indexed_dataset(prefix)
        meta = read_meta(prefix) or {}
        made_with = meta.get("tokenizer_sha256")
        if made_with and made_with != tokenizer.sha256:
            raise DataError(
                f"{prefix} was tokenized with {meta.get('tokenizer', 'another tokenizer')} (sha256 "
                f"{made_with[:12]}…, {meta_path(prefix)}) but data.tokenizer={tokenizer.path} is a different file "
                f"(sha256 {tokenizer.sha256[:12]}…). Fix: set data.tokenizer to the tokenizer the data was made "
                "with, or re-run cola-preprocess with this one")
        infos[prefix] = info
    limit = min(tokenizer.vocab_size, cfg.model.vocab_size)
    scan = sum(os.path.getsize(f"{p}.bin") for p in infos) <= SCAN_LIMIT_BYTES
    for prefix, info in infos.items():
        if scan:
            low, high = token_id_range(prefix, info.dtype)
        else:
            meta = read_meta(prefix) or {}
            low, high = 0, meta.get("max_token_id", -1)
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            raise DataError(
                f"{prefix}.bin holds token id {bad}, outside the vocabulary (data.tokenizer has "
                f"{tokenizer.vocab_size} tokens, model.vocab_size={cfg.model.vocab_size}): the file is corrupt or "
                f"was made with another tokenizer. Fix: re-run cola-preprocess for {prefix}")
    return infos


def _train_epochs(cfg: Config, infos: dict) -> Optional[float]:
    from cola_megatron.data.config import parse_split

    d, t = cfg.data, cfg.train
    per_split = d.blend_per_split()
    if per_split is not None:
        prefixes, share = per_split[0][0], 1.0
    else:
        prefixes, share = d.blend()[0], parse_split(d.split)[0]
    samples = t.train_iters * t.global_batch_size
    if d.layout == "padded":  # one document per sample
        have, need = share * sum(infos[p].num_documents for p in prefixes), samples
    else:  # packed samples of seq_length tokens (+1 overlapping for the label)
        have, need = share * sum(infos[p].num_tokens for p in prefixes), samples * cfg.model.seq_length
    return need / have if have else None


def epoch_warning(cfg: Config, infos: dict) -> Optional[str]:
    if not infos:
        return None
    epochs = _train_epochs(cfg, infos)
    if epochs is None or epochs <= EPOCH_WARNING:
        return None
    unit = "documents" if cfg.data.layout == "padded" else "tokens"
    return (f"train.train_iters={cfg.train.train_iters} x global_batch_size={cfg.train.global_batch_size} passes "
            f"over the training data about {math.floor(epochs):,} times (epochs, counted in {unit}); add data or "
            "lower train.train_iters if that is not intended")


def check_outputs(cfg: Config) -> None:
    if cfg.checkpoint.save_dir:
        check_output_dir(cfg.checkpoint.save_dir, "checkpoint.save_dir", "checkpoints")
    if cfg.logging.log_dir:
        check_output_dir(cfg.logging.log_dir, "logging.log_dir", "metrics and TensorBoard events")
    d = cfg.data
    if not d.mock and d.all_prefixes():
        cache = d.resolved_cache_dir()
        what = "the dataset index cache" + ("" if d.cache_dir else ", beside the data by default")
        check_output_dir(cache, "data.cache_dir", what)


def preflight(cfg: Config) -> List[str]:
    """Run every check; raise the first problem as a ColaError, return the warnings."""
    check_memory(cfg)
    tokenizer = check_tokenizer(cfg)
    infos = check_data(cfg, tokenizer)
    check_outputs(cfg)
    from cola_megatron.cost.shapes import slow_shape_warnings

    return slow_shape_warnings(cfg) + [w for w in (free_space_warning(cfg), epoch_warning(cfg, infos)) if w]


def warn_all(warnings: List[str], prog: str = "cola-train") -> None:
    """Print warnings once per job (rank 0 of a torchrun launch)."""
    if os.environ.get("RANK", "0") == "0":
        for warning in warnings:
            print(f"{prog}: warning: {warning}", file=sys.stderr, flush=True)
