"""Byte-level BPE tokenizers (`tokenizers` library) and the adapter megatron's datasets expect."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, Iterator, Optional

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cola_megatron.errors import DataError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Names other tokenizers use for the same roles, tried in order when loading a tokenizer.json.
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < 258 + 2:
        raise DataError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least 260 (256 bytes + "
                        "special tokens + merges). Fix: choose a vocab size of 260 or more (e.g. 8192)")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte representable, lossless decode).

    Ids 0 and 1 are the end-of-document and pad tokens.
    """
    check_bpe_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter(texts), trainer=trainer)
    return tokenizer


def _find_token(tokenizer: Tokenizer, explicit: Optional[str], candidates: Iterable[str]) -> Optional[int]:
    names = [explicit] if explicit else list(candidates)
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class TokenizerAdapter(MegatronTokenizerBase):
    """A `tokenizer.json` with what megatron's GPTDataset asks of a tokenizer (eod, pad, vocab_size)."""

    def __init__(self, path: str, eod_token: Optional[str] = None, pad_token: Optional[str] = None):
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file not found: {path} (train one with cola-preprocess "
                            "--train-tokenizer, or fix data.tokenizer)")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # the Rust side raises a bare Exception
            raise DataError(f"{path} is not a valid tokenizer.json: {error}") from error
        super().__init__(path, {})
        tokenizer.encode_special_tokens = True  # special-token strings in text stay plain text
        self._tokenizer = tokenizer
        self._eod = _find_token(tokenizer, eod_token, EOD_CANDIDATES)
        if self._eod is None:
            raise DataError(f"{path} has no end-of-document token (looked for "
                            f"{[eod_token] if eod_token else list(EOD_CANDIDATES)}); add one")
        self._pad = _find_token(tokenizer, pad_token, PAD_CANDIDATES)
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(path)]),
             ("sha256", self.sha256)]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    @property
    def backend(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        # megatron treats a missing pad as "no padding to mask" (it catches the error).
        if self._pad is None:
            raise AttributeError("tokenizer has no pad token")
        return self._pad

    @property
    def pad_or_eod(self) -> int:
        """An id to fill padding with; padding is masked by position, so eod works if pad is absent."""
        return self._eod if self._pad is None else self._pad

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pre-training tokenizers have no chat template")


class MockTokenizer(MegatronTokenizerBase):
    """Stands in for a tokenizer with mock data: only the vocabulary size and special ids exist."""

    def __init__(self, vocab_size: int):
        if vocab_size < 3:
            raise DataError(f"mock tokenizer needs a vocabulary of at least 3, got {vocab_size}")
        super().__init__("", {})
        self._vocab_size = vocab_size
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("vocab_size", vocab_size)])
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return {}

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    eos = eod

    @property
    def pad(self) -> int:
        return self._vocab_size - 2

    pad_or_eod = pad

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError("the mock tokenizer cannot tokenize text")

    def detokenize(self, ids: Iterator[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids do not all fit the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model_vocab_size}: set model.vocab_size >= {tokenizer.vocab_size} (or retrain the "
            f"tokenizer with --vocab-size <= {model_vocab_size})"
        )
