"""Megatron `.bin`/`.idx` indexed datasets: writing them atomically and checking them cheaply.

The writer is megatron-core's `IndexedDatasetBuilder`; the check reads only the `.idx` header and
sizes, so a truncated or corrupted pair fails with one clear message before training starts.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from cola_megatron.errors import DataError
from cola_megatron.filesystem import existing_ancestor

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron's DType codes (megatron.core.datasets.indexed_dataset.DType), repeated so that a
# check does not import megatron-core.
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def meta_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


@dataclass
class IndexInfo:
    prefix: str
    dtype: str
    num_documents: int
    num_tokens: int


def _rerun_hint(prefix: str) -> str:
    return f"re-run cola-preprocess for {prefix} (or copy the .bin/.idx pair again)"


def inspect_indexed_dataset(prefix: str) -> IndexInfo:
    """Validate a `.bin`/`.idx` pair by sizes and header; return its document and token counts."""
    idx, binary = idx_path(prefix), bin_path(prefix)
    missing = [p for p in (idx, binary) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"data file missing: {', '.join(missing)} (prefix {prefix!r}); "
                        "name the prefix without .bin/.idx, or run cola-preprocess first")
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    if len(header) < _IDX_HEADER_BYTES or header[:9] != _IDX_MAGIC:
        raise DataError(f"{idx} is not a megatron index (bad or short header); {_rerun_hint(prefix)}")
    version, code, num_sequences, doc_count = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{idx}: unsupported index version {version} / dtype code {code}; "
                        f"{_rerun_hint(prefix)}")
    expected_idx = _IDX_HEADER_BYTES + 12 * num_sequences + 8 * doc_count
    if idx_size not in (expected_idx, expected_idx + num_sequences):  # + per-sequence modes
        raise DataError(f"{idx} is truncated or corrupt: it has {idx_size} bytes, its header "
                        f"describes {expected_idx}; {_rerun_hint(prefix)}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_IDX_HEADER_BYTES, shape=(num_sequences,))
    doc_indices = np.memmap(idx, dtype=np.int64, mode="r", shape=(doc_count,),
                            offset=_IDX_HEADER_BYTES + 12 * num_sequences)
    if (doc_count == 0 or doc_indices[0] != 0 or doc_indices[-1] != num_sequences
            or (num_sequences and lengths.min() < 0) or np.any(np.diff(doc_indices) < 0)):
        raise DataError(f"{idx} is corrupt (inconsistent document table); {_rerun_hint(prefix)}")
    num_tokens = int(lengths.sum(dtype=np.int64))
    dtype = np.dtype(_DTYPES[code])
    # megatron reads each sequence at its stored byte offset: they must be the running sum of the lengths.
    pointers = np.memmap(idx, dtype=np.int64, mode="r", shape=(num_sequences,),
                         offset=_IDX_HEADER_BYTES + 4 * num_sequences)
    expected = np.zeros(num_sequences, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
    bad = np.flatnonzero(pointers != expected * dtype.itemsize)
    if bad.size:
        raise DataError(f"{idx} is corrupt: the byte offset of sequence {int(bad[0])} is {int(pointers[bad[0]])}, "
                        f"its lengths give {int(expected[bad[0]]) * dtype.itemsize} ({bad.size} bad offsets); "
                        f"{_rerun_hint(prefix)}")
    expected_bin = num_tokens * dtype.itemsize
    bin_size = os.path.getsize(binary)
    if bin_size != expected_bin:
        state = "truncated" if bin_size < expected_bin else "longer than its index"
        raise DataError(f"{binary} is {state}: it has {bin_size} bytes, the index describes "
                        f"{expected_bin} ({num_tokens} tokens); {_rerun_hint(prefix)}")
    if num_tokens == 0:
        raise DataError(f"{prefix} holds no tokens; preprocess a non-empty corpus")
    return IndexInfo(prefix, dtype.name, doc_count - 1, num_tokens)


def read_meta(prefix: str) -> Optional[dict]:
    """The preprocessing record written beside the pair, if any; a damaged one is refused, not ignored."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is corrupt ({error}); {_rerun_hint(prefix)}, or delete {path} to use the "
                        "pair without its record") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} is corrupt (not a JSON object); {_rerun_hint(prefix)}, or delete {path} to "
                        "use the pair without its record")
    return meta


def token_id_range(prefix: str, dtype: str, chunk_tokens: int = 1 << 26) -> tuple[int, int]:
    """(smallest, largest) token id in ``prefix.bin``, read in chunks (memory-bandwidth bound)."""
    data = np.memmap(bin_path(prefix), dtype=np.dtype(dtype), mode="r")
    low, high = 0, 0
    for start in range(0, len(data), chunk_tokens):
        chunk = data[start:start + chunk_tokens]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    return low, high


class IndexedWriter:
    """Write documents through megatron's IndexedDatasetBuilder into temporary files that replace
    `prefix.bin/.idx` only when everything was written (an interrupted run leaves no valid-looking pair)."""

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = prefix
        folder = os.path.dirname(os.path.abspath(prefix))
        self._existed = existing_ancestor(folder)  # what abort() leaves standing
        os.makedirs(folder, exist_ok=True)
        self.dtype = DType.optimal_dtype(vocab_size)
        self._tmp_bin, self._tmp_idx = f"{prefix}.bin.tmp", f"{prefix}.idx.tmp"
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id = -1
        """Recorded in .meta.json: the training checks read it where scanning the .bin would take too long."""

    def add_document(self, token_ids: np.ndarray) -> None:
        self._builder.add_document(token_ids, [len(token_ids)])
        self.num_documents += 1
        self.num_tokens += len(token_ids)
        if len(token_ids):
            self.max_token_id = max(self.max_token_id, int(token_ids.max()))

    def finalize(self, meta: dict) -> IndexInfo:
        if self.num_documents == 0:
            self.abort()
            raise DataError("the inputs hold no non-blank documents; nothing to write")
        self._builder.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        info = inspect_indexed_dataset(self.prefix)
        with open(meta_path(self.prefix), "w") as f:
            json.dump({**meta, **asdict(info)}, f, indent=2, sort_keys=True)
            f.write("\n")
        return info

    def abort(self) -> None:
        self._builder.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        folder = os.path.dirname(os.path.abspath(self.prefix))
        while folder != self._existed:  # a failed run leaves the tree as it found it
            try:
                os.rmdir(folder)
            except OSError:  # not empty: something else wrote there meanwhile
                break
            folder = os.path.dirname(folder)
