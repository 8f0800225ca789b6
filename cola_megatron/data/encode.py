"""Tokenizing batches of documents, in this process or in worker processes, in input order."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

_encoder: Optional["DocumentEncoder"] = None  # one per worker process


class DocumentEncoder:
    """Text -> token ids (int32) with the end-of-document id appended."""

    def __init__(self, tokenizer_json: str, eod_id: int, append_eod: bool = True):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # Text that happens to contain "<|endoftext|>" must not produce a real end-of-document id.
        self.tokenizer.encode_special_tokens = True
        self.eod_id = eod_id
        self.append_eod = append_eod

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids + [self.eod_id] if self.append_eod else encoding.ids
            out.append(np.asarray(ids, dtype=np.int32))
        return out


def _init_worker(tokenizer_json: str, eod_id: int, append_eod: bool) -> None:
    global _encoder
    _encoder = DocumentEncoder(tokenizer_json, eod_id, append_eod)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encoder.encode_batch(texts)


def encode_batches(batches: Iterable[list[str]], tokenizer_json: str, eod_id: int, workers: int,
                   append_eod: bool = True) -> Iterator[list[np.ndarray]]:
    """Yield the token arrays of each batch, in input order, using `workers` processes.

    At most a few batches per worker are in flight, so memory stays bounded for any corpus size.
    """
    if workers <= 1:
        encoder = DocumentEncoder(tokenizer_json, eod_id, append_eod)
        for texts in batches:
            yield encoder.encode_batch(texts)
        return
    # fork: workers start instantly without re-importing the caller; each encodes single-threaded
    # (the Rust thread pool is not fork-safe, and processes already give the parallelism).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        context = multiprocessing.get_context(method)
        with context.Pool(workers, _init_worker, (tokenizer_json, eod_id, append_eod)) as pool:
            pending: deque = deque()
            for texts in batches:
                pending.append(pool.apply_async(_encode_in_worker, (texts,)))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
