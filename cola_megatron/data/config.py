"""The `data` section of the configuration tree."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from cola_megatron.errors import DataError

LAYOUTS = ("packed", "padded")

Blend = tuple[list[str], Optional[list[float]]]


@dataclass
class DataConfig:
    """Where the tokenized data lives and how samples are cut from it.

    Blends are megatron-style lists: either dataset prefixes (`["dir/a", "dir/b"]`, weighted by
    their size) or weights and prefixes alternating (`["0.7", "dir/a", "0.3", "dir/b"]`). A prefix
    names the `.bin`/`.idx` pair written by `cola-preprocess`. A single string is split on spaces.
    """

    paths: list[str] = field(default_factory=list)
    """One blend that is split into train/valid/test by `split`."""

    split: str = "969,30,1"
    """Train,valid,test weights used with `paths` (by documents, as in megatron)."""

    train_paths: list[str] = field(default_factory=list)
    """Separate blends per split; when any is set, `paths` and `split` must be empty/unused."""

    valid_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)

    tokenizer: Optional[str] = None
    """Path to the `tokenizer.json` the data was tokenized with."""

    layout: str = "packed"
    """`packed`: documents concatenated with end-of-document tokens and cut into full sequences
    (megatron's GPTDataset). `padded`: one document per sample, truncated or padded to the
    sequence length, pads masked out of the loss (the CoLA reference's C4 pipeline)."""

    mock: bool = False
    """Synthetic tokens instead of files (megatron's MockGPTDataset), for tests and benchmarks."""

    cache_dir: Optional[str] = None
    """Where the sample/shuffle indices are cached; default `index-cache/` beside the first data file."""

    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    """Return an explicit causal mask in each sample (not needed with causal SDPA kernels)."""

    mmap_bin_files: bool = True
    num_workers: int = 2
    """DataLoader worker processes."""

    def validate(self) -> None:
        """Raise `DataError` for settings that cannot work, before any file is opened."""
        if self.layout not in LAYOUTS:
            raise DataError(f"data.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.mock:
            return
        per_split = any(_as_list(p) for p in (self.train_paths, self.valid_paths, self.test_paths))
        if per_split and _as_list(self.paths):
            raise DataError("set either data.paths (with data.split) or data.train_paths/"
                            "valid_paths/test_paths, not both")
        if per_split and not _as_list(self.train_paths):
            raise DataError("data.train_paths is empty: name the training data prefixes")
        if not per_split and not _as_list(self.paths):
            raise DataError("no training data: set data.paths (or data.train_paths), "
                            "or data.mock=true for synthetic data")
        if not per_split:
            weights = parse_split(self.split)
            if weights[0] == 0:
                raise DataError(f"data.split={self.split!r} gives the training split no data")
        for name in ("paths", "train_paths", "valid_paths", "test_paths"):
            parse_blend(getattr(self, name), f"data.{name}")

    def blend(self) -> Optional[Blend]:
        return parse_blend(self.paths, "data.paths")

    def blend_per_split(self) -> Optional[list[Optional[Blend]]]:
        if not any(_as_list(p) for p in (self.train_paths, self.valid_paths, self.test_paths)):
            return None
        return [parse_blend(getattr(self, f"{s}_paths"), f"data.{s}_paths")
                for s in ("train", "valid", "test")]

    def all_prefixes(self) -> list[str]:
        blends = [self.blend()] + (self.blend_per_split() or [])
        return [p for b in blends if b is not None for p in b[0]]

    def resolved_cache_dir(self) -> Optional[str]:
        if self.cache_dir:
            return self.cache_dir
        prefixes = self.all_prefixes()
        return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache") if prefixes else None


def _as_list(value: Union[str, list, tuple, None]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(value: Union[str, list, tuple, None], name: str = "blend") -> Optional[Blend]:
    """`["a", "b"]` -> (["a", "b"], None); `["0.7", "a", "0.3", "b"]` -> (["a", "b"], [0.7, 0.3])."""
    items = _as_list(value)
    if not items:
        return None
    if not _is_number(items[0]):
        numbers = [i for i in items if _is_number(i)]
        if numbers:
            raise DataError(f"{name}: give a weight before every prefix or none at all, got {items}")
        return items, None
    if len(items) % 2:
        raise DataError(f"{name}: weights and prefixes must alternate (weight prefix ...), got {items}")
    weights, prefixes = [float(w) for w in items[0::2]], items[1::2]
    bad = [p for p in prefixes if _is_number(p)]
    if bad or any(w <= 0 for w in weights):
        raise DataError(f"{name}: expected 'weight prefix' pairs with positive weights, got {items}")
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """"969,30,1" -> [0.969, 0.03, 0.001] (padded with zeros to three entries)."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"data.split must be up to three non-negative weights like '969,30,1', got {split!r}")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]
