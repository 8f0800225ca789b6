"""Train/valid/test datasets for the trainer, through megatron-core's BlendedMegatronDatasetBuilder.

    tokenizer = load_tokenizer(cfg.data, model_vocab_size)
    train_ds, valid_ds, test_ds = build_datasets(cfg.data, seq_length, seed, (n_train, n_valid, n_test), tokenizer)

Works in a plain process and under torch.distributed (call it on every rank: rank 0 builds the
index cache first, the others then read it).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

from cola_megatron.compat.megatron import plain_process_rank
from cola_megatron.data.config import DataConfig, parse_split
from cola_megatron.data.indexed import IndexInfo, bin_path, idx_path, inspect_indexed_dataset, read_meta
from cola_megatron.data.tokenizer import MockTokenizer, TokenizerAdapter, check_vocab
from cola_megatron.errors import DataError

SPLITS = ("train", "valid", "test")


def load_tokenizer(data_cfg: DataConfig, model_vocab_size: Optional[int] = None):
    """The tokenizer named by `data.tokenizer` (a mock one for mock data), checked against the model."""
    if data_cfg.tokenizer:
        tokenizer = TokenizerAdapter(data_cfg.tokenizer)
    elif data_cfg.mock:
        if model_vocab_size is None:
            raise DataError("mock data without data.tokenizer needs the model's vocabulary size")
        tokenizer = MockTokenizer(model_vocab_size)
    else:
        raise DataError("data.tokenizer is not set: give the tokenizer.json the data was tokenized with")
    if model_vocab_size is not None:
        check_vocab(tokenizer, model_vocab_size)
    return tokenizer


def _check_files(data_cfg: DataConfig, tokenizer) -> dict[str, IndexInfo]:
    infos = {}
    for prefix in data_cfg.all_prefixes():
        info = inspect_indexed_dataset(prefix)
        meta = read_meta(prefix) or {}
        if "vocab_size" in meta and meta["vocab_size"] > tokenizer.vocab_size:
            raise DataError(f"{prefix} was tokenized with a {meta['vocab_size']}-token vocabulary but "
                            f"data.tokenizer has {tokenizer.vocab_size}: use the tokenizer it was made with "
                            f"({meta.get('tokenizer')})")
        if "eod_id" in meta and meta["eod_id"] != tokenizer.eod:
            raise DataError(f"{prefix} uses end-of-document id {meta['eod_id']} but data.tokenizer's is "
                            f"{tokenizer.eod}: use the tokenizer it was made with ({meta.get('tokenizer')})")
        infos[prefix] = info
    return infos


def _check_split_sizes(data_cfg: DataConfig, infos: dict[str, IndexInfo]) -> None:
    """megatron loops forever on a weighted split that gets no document; refuse it up front."""
    if data_cfg.blend_per_split() is not None:
        return
    bounds = [0.0]
    for weight in parse_split(data_cfg.split):
        bounds.append(bounds[-1] + weight)
    for prefix in data_cfg.blend()[0]:
        n = infos[prefix].num_documents
        for name, begin, end in zip(SPLITS, bounds[:-1], bounds[1:]):
            if end > begin and int(round(end * n)) - int(round(begin * n)) == 0:
                raise DataError(f"data.split={data_cfg.split!r} gives the {name} split none of the {n} "
                                f"documents of {prefix}: give {name} weight 0, a larger share, or "
                                "use separate data.train_paths/valid_paths")


def _fingerprint(prefixes: Sequence[str], layout: str) -> str:
    """Changes whenever a data file is rewritten, so a re-preprocessed corpus never meets a stale index."""
    digest = hashlib.sha1(layout.encode())
    for prefix in prefixes:
        stat_idx, stat_bin = os.stat(idx_path(prefix)), os.stat(bin_path(prefix))
        digest.update(f"{os.path.abspath(prefix)}|{stat_idx.st_size}|{stat_idx.st_mtime_ns}|"
                      f"{stat_bin.st_size}|{stat_bin.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_datasets(data_cfg: DataConfig, seq_length: int, seed: int,
                   num_samples: Sequence[Optional[int]], tokenizer,
                   is_built_on_rank: Optional[Callable[[], bool]] = None):
    """Return (train, valid, test) datasets; a split without data is None.

    num_samples: samples wanted per split (e.g. train_iters * global_batch); the datasets hold at
    least that many. Samples are dicts with tokens, labels, loss_mask, position_ids (and
    attention_mask if data.create_attention_mask). is_built_on_rank: e.g. "tensor-parallel rank 0"
    in a distributed job (other ranks then get None); default every rank.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    from cola_megatron.data.padded import PaddedDocumentDataset

    data_cfg.validate()
    if seq_length < 1:
        raise DataError(f"sequence length must be >= 1, got {seq_length}")
    if len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples):
        raise DataError(f"num_samples must be (train, valid, test) counts >= 0, got {num_samples}")

    blend, blend_per_split, split, cache = None, None, None, None
    if data_cfg.mock:
        if data_cfg.layout != "packed":
            raise DataError("data.mock=true supports only data.layout=packed")
        cls = MockGPTDataset
    else:
        infos = _check_files(data_cfg, tokenizer)
        blend, blend_per_split = data_cfg.blend(), data_cfg.blend_per_split()
        if blend is not None:
            split = data_cfg.split
            _check_split_sizes(data_cfg, infos)
        cls = GPTDataset if data_cfg.layout == "packed" else PaddedDocumentDataset
        cache = os.path.join(data_cfg.resolved_cache_dir(),
                             _fingerprint(data_cfg.all_prefixes(), data_cfg.layout))

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache,
        mmap_bin_files=data_cfg.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        create_attention_mask=data_cfg.create_attention_mask,
    )
    builder = BlendedMegatronDatasetBuilder(cls, list(num_samples), is_built_on_rank or (lambda: True), config)
    with plain_process_rank():
        train, valid, test = builder.build()
    return train, valid, test
