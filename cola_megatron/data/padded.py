"""The `padded` sample layout: one document per sample, cut or padded to a fixed length.

This is the CoLA reference's C4 pipeline (tokenize each document to `max_length`, pad, ignore pads
in the loss) expressed as a megatron dataset, so megatron's builder still does the blending and
the train/valid/test split. Samples have megatron's keys: tokens, labels, loss_mask, position_ids
(and attention_mask when asked for).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from cola_megatron.errors import DataError


class PaddedDocumentDataset(MegatronDataset):
    """Sample i is a whole document (with its end-of-document token) of at most
    `sequence_length + 1` tokens; shorter documents are padded and the pads carry no loss.

    The order is a fresh permutation of the split's documents per epoch, drawn from the seed, so
    it is deterministic without a cache; the length is a whole number of epochs covering
    `num_samples`.
    """

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: Optional[str],
                 indexed_indices: np.ndarray, num_samples: Optional[int], index_split: Split,
                 config: GPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.documents = np.asarray(indexed_indices, dtype=np.int64)
        if len(self.documents) == 0:
            raise DataError(f"the {index_split.name} split of {dataset_path} has no documents; "
                            "change data.split or add data")
        self.num_epochs = max(1, math.ceil((num_samples or 0) / len(self.documents)))
        self.fill_id = _fill_id(config.tokenizer)
        self._permutations: dict[int, np.ndarray] = {}
        length = config.sequence_length
        self._position_ids = torch.arange(length, dtype=torch.long)
        self._attention_mask = (
            ~torch.tril(torch.ones(length, length, dtype=torch.bool)).unsqueeze(0)
            if config.create_attention_mask else None
        )

    numel_low_level_dataset = GPTDataset.numel_low_level_dataset
    build_low_level_dataset = GPTDataset.build_low_level_dataset

    def __len__(self) -> int:
        return self.num_epochs * len(self.documents)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.clear()
            rng = np.random.RandomState([self.config.random_seed, self.index_split.value, epoch])
            self._permutations[epoch] = rng.permutation(len(self.documents))
        return self._permutations[epoch]

    def document_of(self, idx: int) -> int:
        """The indexed-dataset document id that sample `idx` holds."""
        epoch, position = divmod(int(idx), len(self.documents))
        return int(self.documents[self._permutation(epoch)[position]])

    def __getitem__(self, idx: Optional[int]) -> dict[str, torch.Tensor]:
        length = self.config.sequence_length
        document = self.document_of(0 if idx is None else idx)
        used = min(int(self.dataset.sequence_lengths[document]), length + 1)
        ids = np.full(length + 1, self.fill_id, dtype=np.int64)
        ids[:used] = self.dataset.get(document, offset=0, length=used)
        ids = torch.from_numpy(ids)
        tokens, labels = ids[:-1].contiguous(), ids[1:].contiguous()
        loss_mask = torch.zeros(length, dtype=torch.float)
        loss_mask[: used - 1] = 1.0  # a label is real exactly when it lies inside the document
        if self.config.eod_mask_loss:
            loss_mask[labels == self.config.tokenizer.eod] = 0.0
        if idx is None:  # megatron asks for a padding sample this way
            loss_mask.zero_()
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                  "position_ids": self._position_ids.clone()}
        if self._attention_mask is not None:
            sample["attention_mask"] = self._attention_mask
        return sample


def _fill_id(tokenizer) -> int:
    """Pad with the pad id; a tokenizer without one pads with eod (pads are masked by position)."""
    try:
        return int(tokenizer.pad)
    except (AttributeError, NotImplementedError):
        return int(tokenizer.eod)
