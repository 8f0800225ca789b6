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
from cola_megatron.filesystem import existing_ancestor
from cola_megatron.data.indexed import bin_path, idx_path, meta_path
from cola_megatron.data.sources import SAMPLE_BY, check_sources, iter_text_batches, resolve_inputs


def _log(message: str) -> None:
    print(f"[cola-preprocess] {message}", file=sys.stderr, flush=True)


def _writable_parent(path: str, flag: str) -> None:
    """The directory ``path`` goes into exists and is writable, or can be created."""
    probe = existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(probe):
        raise DataError(f"{flag} {path}: {probe} is a file, not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: {probe} is not writable; choose a writable location")


def check_outputs(output_prefix: Optional[str], train_tokenizer: Optional[str], overwrite: bool) -> None:
    """Refuse to replace existing outputs unless asked (a corpus or tokenizer can take hours to rebuild)."""
    if output_prefix is not None:
        if output_prefix.endswith((".bin", ".idx")) or os.path.isdir(output_prefix):
            raise DataError(f"--output-prefix {output_prefix}: give a prefix such as data/train (PREFIX.bin and "
                            "PREFIX.idx are written), not a file name or directory")
        _writable_parent(output_prefix, "--output-prefix")
        existing = [p for p in (bin_path(output_prefix), idx_path(output_prefix), meta_path(output_prefix))
                    if os.path.lexists(p)]
        if existing and not overwrite:
            raise DataError(f"--output-prefix {output_prefix}: {', '.join(existing)} already exist; pass "
                            "--overwrite to replace them, or choose another prefix")
    if train_tokenizer is not None:
        if os.path.isdir(train_tokenizer):
            raise DataError(f"--train-tokenizer {train_tokenizer} is a directory; give the tokenizer.json path")
        _writable_parent(train_tokenizer, "--train-tokenizer")
        if os.path.lexists(train_tokenizer) and not overwrite:
            raise DataError(f"--train-tokenizer {train_tokenizer} already exists; pass --overwrite to replace it, "
                            "use it with --tokenizer, or choose another path")


def train_tokenizer_on(inputs: list[str], save_path: str, vocab_size: int, *, text_key: str = "text",
                       text_sample_by: str = "document", min_frequency: int = 2,
                       hub_split: str = "train", hub_config: Optional[str] = None,
                       overwrite: bool = False) -> str:
    """Train a byte-level BPE on the inputs and save it as a tokenizer.json; returns its path."""
    check_outputs(None, save_path, overwrite)
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
               append_eod: bool = True, progress: bool = True, overwrite: bool = False):
    """Tokenize `inputs` into `output_prefix.bin/.idx` (+ `.meta.json`); returns an `IndexInfo`.

    Give either `tokenizer` (an existing tokenizer.json) or `train_tokenizer` (where to save one
    trained on these inputs with `vocab_size` tokens). Existing outputs are replaced only with `overwrite`.
    """
    if (tokenizer is None) == (train_tokenizer is None):
        raise DataError("give exactly one of --tokenizer (existing tokenizer.json) or "
                        "--train-tokenizer (where to save a new one)")
    if workers < 1 or batch_size < 1:
        raise DataError(f"--workers and --batch-size must be >= 1, got {workers} and {batch_size}")
    if text_sample_by not in SAMPLE_BY:
        raise DataError(f"--text-sample-by must be one of {SAMPLE_BY}, got {text_sample_by!r}")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise DataError(f"--tokenizer {tokenizer} does not exist; give an existing tokenizer.json, or train one "
                        "with --train-tokenizer PATH")
    check_outputs(output_prefix, train_tokenizer, overwrite)
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
    skipped: dict = {}
    batches = iter_text_batches(sources, text_key, text_sample_by, batch_size, hub_split, hub_config, skipped)
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
                "inputs": list(inputs), "text_key": text_key, "text_sample_by": text_sample_by,
                "max_token_id": writer.max_token_id, "skipped_null_records": skipped["null"],
                "skipped_blank_records": skipped["blank"]}
        info = writer.finalize(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if skipped["null"]:
        _log(f"skipped {skipped['null']} records whose {text_key!r} is null (recorded in "
             f"{meta_path(output_prefix)}); check the input, or pass --text-key if the text is in another field")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.bin/.idx/.meta.json and --train-tokenizer file")
    return parser


def _main(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_args(argv)
    preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer,
               train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size,
               min_frequency=args.min_frequency, text_key=args.text_key,
               text_sample_by=args.text_sample_by, workers=args.workers,
               batch_size=args.batch_size, hub_split=args.hub_split, hub_config=args.hub_config,
               append_eod=not args.no_eod, progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command("cola-preprocess", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
