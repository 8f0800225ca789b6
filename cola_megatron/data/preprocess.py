"""`cola-preprocess`: raw text -> (optionally trained) byte-level BPE tokenizer -> megatron .bin/.idx.

    cola-preprocess --input corpus/ more.jsonl --output-prefix data/train \\
        --train-tokenizer data/tokenizer.json --vocab-size 32000 --workers 8
    cola-preprocess --input valid.jsonl --output-prefix data/valid --tokenizer data/tokenizer.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.errors import DataError
from cola_megatron.data.sources import SAMPLE_BY, check_sources, iter_text_batches, resolve_inputs


def _log(message: str) -> None:
    print(f"[cola-preprocess] {message}", file=sys.stderr, flush=True)


def train_tokenizer_on(inputs: list[str], save_path: str, vocab_size: int, *, text_key: str = "text",
                       text_sample_by: str = "document", min_frequency: int = 2,
                       hub_split: str = "train", hub_config: Optional[str] = None) -> str:
    """Train a byte-level BPE on the inputs and save it as a tokenizer.json; returns its path."""
    sources = resolve_inputs(inputs)
    check_sources(sources, text_key, hub_split, hub_config)
    return _train_on(sources, save_path, vocab_size, text_key, text_sample_by, min_frequency,
                     hub_split, hub_config)


def _train_on(sources, save_path, vocab_size, text_key, text_sample_by, min_frequency,
              hub_split, hub_config) -> str:
    from cola_megatron.data.tokenizer import train_bpe_tokenizer

    start = time.time()
    batches = iter_text_batches(sources, text_key, text_sample_by, hub_split=hub_split, hub_config=hub_config)
    tokenizer = train_bpe_tokenizer(batches, vocab_size, min_frequency)
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    tokenizer.save(save_path, pretty=True)
    _log(f"trained a {tokenizer.get_vocab_size()}-token byte-level BPE in {time.time() - start:.1f}s "
         f"-> {save_path}")
    return save_path


def preprocess(inputs: list[str], output_prefix: str, *, tokenizer: Optional[str] = None,
               train_tokenizer: Optional[str] = None, vocab_size: int = 32000, min_frequency: int = 2,
               text_key: str = "text", text_sample_by: str = "document", workers: int = 2,
               batch_size: int = 256, hub_split: str = "train", hub_config: Optional[str] = None,
               append_eod: bool = True, progress: bool = True):
    """Tokenize `inputs` into `output_prefix.bin/.idx` (+ `.meta.json`); returns an `IndexInfo`.

    Give either `tokenizer` (an existing tokenizer.json) or `train_tokenizer` (where to save one
    trained on these inputs with `vocab_size` tokens).
    """
    if (tokenizer is None) == (train_tokenizer is None):
        raise DataError("give exactly one of --tokenizer (existing tokenizer.json) or "
                        "--train-tokenizer (where to save a new one)")
    if workers < 1 or batch_size < 1:
        raise DataError(f"--workers and --batch-size must be >= 1, got {workers} and {batch_size}")
    if text_sample_by not in SAMPLE_BY:
        raise DataError(f"--text-sample-by must be one of {SAMPLE_BY}, got {text_sample_by!r}")
    sources = resolve_inputs(inputs)
    check_sources(sources, text_key, hub_split, hub_config)
    if train_tokenizer is not None:
        tokenizer = _train_on(sources, train_tokenizer, vocab_size, text_key, text_sample_by,
                              min_frequency, hub_split, hub_config)

    from tqdm.auto import tqdm

    from cola_megatron.data.encode import encode_batches
    from cola_megatron.data.indexed import IndexedWriter
    from cola_megatron.data.tokenizer import TokenizerAdapter

    adapter = TokenizerAdapter(tokenizer)
    batches = iter_text_batches(sources, text_key, text_sample_by, batch_size, hub_split, hub_config)
    writer = IndexedWriter(output_prefix, adapter.vocab_size)
    start = time.time()
    bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for arrays in encode_batches(batches, adapter.backend.to_str(), adapter.eod, workers, append_eod):
            for ids in arrays:
                writer.add_document(ids)
            bar.update(len(arrays))
            elapsed = max(time.time() - start, 1e-9)
            bar.set_postfix(tokens=writer.num_tokens, tok_per_s=f"{writer.num_tokens / elapsed:,.0f}",
                            refresh=False)
        meta = {"tokenizer": os.path.abspath(tokenizer), "tokenizer_sha256": adapter.sha256,
                "vocab_size": adapter.vocab_size, "eod_id": adapter.eod, "append_eod": append_eod,
                "inputs": list(inputs), "text_key": text_key, "text_sample_by": text_sample_by}
        info = writer.finalize(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    elapsed = max(time.time() - start, 1e-9)
    _log(f"{info.num_documents} documents, {info.num_tokens} tokens in {elapsed:.1f}s "
         f"({info.num_documents / elapsed:,.0f} docs/s, {info.num_tokens / elapsed:,.0f} tokens/s) "
         f"-> {output_prefix}.bin/.idx")
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cola-preprocess",
        description="Tokenize raw text into megatron .bin/.idx files (one document per record; "
                    "an end-of-document token is appended to each).")
    parser.add_argument("--input", nargs="+", required=True,
                        help="files or folders (.jsonl .json .parquet .txt, optionally .gz) or a "
                             "Hugging Face hub dataset name")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="an existing tokenizer.json")
    tok.add_argument("--train-tokenizer", metavar="PATH",
                     help="train a byte-level BPE on the inputs and save it here")
    parser.add_argument("--vocab-size", type=int, default=32000, help="for --train-tokenizer")
    parser.add_argument("--min-frequency", type=int, default=2, help="for --train-tokenizer")
    parser.add_argument("--text-key", default="text", help="field holding the text in json/parquet")
    parser.add_argument("--text-sample-by", choices=SAMPLE_BY, default="document",
                        help="what one document is in plain-text files")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--batch-size", type=int, default=256, help="documents per worker task")
    parser.add_argument("--hub-split", default="train")
    parser.add_argument("--hub-config", default=None)
    parser.add_argument("--no-eod", action="store_true", help="do not append end-of-document tokens")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _main(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_args(argv)
    preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer,
               train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size,
               min_frequency=args.min_frequency, text_key=args.text_key,
               text_sample_by=args.text_sample_by, workers=args.workers,
               batch_size=args.batch_size, hub_split=args.hub_split, hub_config=args.hub_config,
               append_eod=not args.no_eod, progress=not args.no_progress)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command("cola-preprocess", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
