"""Raw text inputs for preprocessing: local jsonl/json/parquet/plain-text files or folders, or a
Hugging Face hub dataset name, read as a stream of documents with the `datasets` library.

Local files are checked (exists, not empty, valid UTF-8, has the text field) before any heavy work.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from cola_megatron.errors import DataError

# File suffix -> `datasets` builder. `.gz` variants of the text formats are read transparently.
BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
            ".txt": "text", ".text": "text", ".md": "text"}
SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class Source:
    """One `datasets.load_dataset` call: local files of one format, or a hub dataset."""

    builder: str  # json | parquet | text | hub
    files: list[str] = field(default_factory=list)
    hub_name: Optional[str] = None
    opened: Any = None  # the hub dataset, once opened by `check_sources`


def _builder_for(path: str) -> Optional[str]:
    name = path[:-3] if path.endswith(".gz") else path
    return BUILDERS.get(Path(name).suffix.lower())


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or _builder_for(text) is not None


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand folders (sorted, recursive) and group consecutive files of one format."""
    if not inputs:
        raise DataError("no input given: pass files, folders or a hub dataset name")
    sources: list[Source] = []
    for raw in inputs:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and _builder_for(str(p)))
            if not files:
                raise DataError(f"folder {raw} holds no readable files (expected "
                                f"{', '.join(sorted(BUILDERS))}, optionally .gz)")
        elif os.path.isfile(path):
            if _builder_for(path) is None:
                raise DataError(f"cannot tell the format of {raw}: name it with one of "
                                f"{', '.join(sorted(BUILDERS))} (optionally .gz)")
            files = [path]
        elif _looks_like_path(raw):
            raise DataError(f"input not found: {raw} (check the path)")
        else:
            sources.append(Source("hub", hub_name=raw))
            continue
        for f in files:
            builder = _builder_for(f)
            if sources and sources[-1].builder == builder:
                sources[-1].files.append(f)
            else:
                sources.append(Source(builder, [f]))
    return sources


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def check_utf8(path: str, chunk_size: int = 1 << 20) -> None:
    """Raise `DataError` naming the first invalid byte (offset and line) of a text file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with _open_binary(path) as f:
        while True:
            chunk = f.read(chunk_size)
            pending = decoder.getstate()[0]  # an incomplete character carried over from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = pending + chunk
                bad = offset - len(pending) + error.start
                line = lines + data[:error.start].count(b"\n") + 1
                raise DataError(f"{path} is not valid UTF-8: byte {bad} (line {line}) is "
                                f"{data[error.start:error.start + 1]!r}; re-encode the file as UTF-8 "
                                "(e.g. iconv -f latin1 -t utf-8)") from None
            if not chunk:
                return
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _check_json_lines(path: str, text_key: str) -> None:
    with _open_binary(path) as f:
        for line in f:
            if line.strip():
                break
        else:
            raise DataError(f"{path} holds no records")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: the first line is not JSON ({error}); "
                        "jsonl files need one JSON object per line") from None
    if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}: records have no {text_key!r} field (found {keys}); "
                        "pass --text-key NAME")


def _check_parquet(path: str, text_key: str) -> None:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:
        raise DataError(f"{path} is not a readable parquet file: {error}") from None
    if text_key not in schema.names:
        raise DataError(f"{path}: no column {text_key!r} (found {schema.names}); pass --text-key NAME")


def check_sources(sources: list[Source], text_key: str, hub_split: str = "train",
                  hub_config: Optional[str] = None) -> None:
    """Cheap checks of every local file (and opening hub datasets), so bad input fails before
    tokenizer training."""
    for source in sources:
        if source.builder == "hub":
            source.opened = _load(source, "document", hub_split, hub_config)
        for path in source.files:
            if os.path.getsize(path) == 0:
                raise DataError(f"input file is empty: {path} (remove it or fill it)")
            if source.builder == "parquet":
                _check_parquet(path, text_key)
                continue
            check_utf8(path)
            if source.builder == "json" and not path.endswith((".json", ".json.gz")):
                _check_json_lines(path, text_key)


def _load(source: Source, text_sample_by: str, hub_split: str, hub_config: Optional[str]):
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # reader errors are re-raised as one DataError
    datasets.disable_progress_bars()
    if source.builder == "hub":
        if source.opened is not None:
            return source.opened
        try:
            return datasets.load_dataset(source.hub_name, hub_config, split=hub_split, streaming=True)
        except Exception as error:
            raise DataError(f"could not open {source.hub_name!r}: it is not a local file or folder, "
                            f"and loading it from the Hugging Face hub failed ({error}). "
                            "Check the path, or the hub name and network access.") from None
    kwargs = {"sample_by": text_sample_by} if source.builder == "text" else {}
    return datasets.load_dataset(source.builder, data_files=source.files, split="train",
                                 streaming=True, **kwargs)


def _first_bad_line(lines) -> Optional[str]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not a JSON record ({error.msg}, column {error.colno})"
            except UnicodeDecodeError as error:
                return f"line {number} is not UTF-8 ({error.reason})"
    return None


def _json_error(path: str) -> Optional[str]:
    """Where a JSON input first fails to parse ('line N is not ...'), or None when it parses."""
    with _open_binary(path) as f:
        if not path.endswith((".json", ".json.gz")):  # JSON Lines: one record per line
            return _first_bad_line(f)
        text = f.read()
    try:
        json.loads(text)
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        lines = text.splitlines()
        first = next((line for line in lines if line.strip()), b"")
        try:
            json.loads(first)  # the first line is a record by itself: JSON Lines in a .json file
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"line {getattr(error, 'lineno', '?')} is not valid JSON ({error})"
        return _first_bad_line(lines)


def _read_error(source: Source, error: Exception) -> DataError:
    """A reader's failure (e.g. pyarrow's 'JSON parse error ... in row 50') as one line naming file and line."""
    if source.builder == "json":
        for path in source.files:
            where = _json_error(path)
            if where:
                return DataError(f"{path}: {where}; fix or remove that line")
    what = source.hub_name or ", ".join(source.files[:3])
    return DataError(f"could not read {what}: {' '.join(str(error).split())[:300]}; check that the input is "
                     f"valid {source.builder}")


def iter_text_batches(sources: list[Source], text_key: str = "text", text_sample_by: str = "document",
                      batch_size: int = 256, hub_split: str = "train",
                      hub_config: Optional[str] = None, skipped: Optional[dict] = None) -> Iterator[list[str]]:
    """Yield lists of non-blank documents, in input order (deterministic).

    ``skipped`` (a dict) counts the records left out: ``null`` (no text) and ``blank`` (whitespace only).
    """
    if text_sample_by not in SAMPLE_BY:
        raise DataError(f"text_sample_by must be one of {SAMPLE_BY}, got {text_sample_by!r}")
    counts = skipped if skipped is not None else {}
    counts.setdefault("null", 0)
    counts.setdefault("blank", 0)
    for source in sources:
        dataset = _load(source, text_sample_by, hub_split, hub_config)
        column = "text" if source.builder == "text" else text_key
        where = source.hub_name or ", ".join(source.files[:3])
        batches = iter(dataset.iter(batch_size=batch_size))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as error:  # pyarrow / datasets reader errors carry no file name or line
                raise _read_error(source, error) from None
            if column not in batch:
                raise DataError(f"{where}: no field {column!r} (found {sorted(batch)}); pass --text-key NAME")
            texts = []
            for text in batch[column]:
                if text is None:
                    counts["null"] += 1
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{where}: field {column!r} holds {type(text).__name__}, not text; "
                                    "pass --text-key NAME of the text field")
                if text.strip():
                    texts.append(text)
                else:
                    counts["blank"] += 1
            if texts:
                yield texts
