"""Data pipeline: preprocessing, megatron datasets in both layouts, determinism, bad input, the R
reader and the sample-corpus logic. Everything runs on small synthetic text in temporary folders;
only the last test reads the cached sample corpus, when it is there."""

import bz2
import gzip
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cola_megatron.data.corpus import sample_corpus
from cola_megatron.data.build import build_datasets, load_tokenizer
from cola_megatron.data.config import DataConfig, parse_blend
from cola_megatron.errors import DataError
from cola_megatron.data.indexed import inspect_indexed_dataset
from cola_megatron.data.preprocess import main as preprocess_main
from cola_megatron.data.preprocess import preprocess
from cola_megatron.data.corpus.rdata import read_lazyload_db
from cola_megatron.data.corpus.sample_corpus import FetchError, Work, fetch_raw_corpus, split_documents
from cola_megatron.data.tokenizer import TokenizerAdapter, check_vocab

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400
WORDS = ("the quick brown fox jumps over a lazy dog; naïve café — zoë's “quoted” 数据 words, "
         "numbers 12 345 and\ttabs").split(" ")


def synthetic_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 120))]
        text = " ".join(words)
        if rng.random() < 0.3:
            text = text.replace(" and", "\n\nand")  # paragraphs inside a document
        docs.append(text)
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 + 40 synthetic documents, a trained tokenizer and two preprocessed prefixes."""
    root = tmp_path_factory.mktemp("corpus")
    docs_a, docs_b = synthetic_documents(80, seed=1), synthetic_documents(40, seed=2)
    raw_a, raw_b = write_jsonl(root / "a.jsonl", docs_a), write_jsonl(root / "b.jsonl", docs_b)
    tokenizer = str(root / "tokenizer.json")
    preprocess([str(raw_a)], str(root / "a"), train_tokenizer=tokenizer, vocab_size=VOCAB,
               workers=2, batch_size=16, progress=False)
    preprocess([str(raw_b)], str(root / "b"), tokenizer=tokenizer, workers=1, progress=False)
    return {"root": root, "docs_a": docs_a, "docs_b": docs_b, "raw_a": raw_a,
            "tokenizer": tokenizer, "a": str(root / "a"), "b": str(root / "b")}


def encoded(tokenizer: TokenizerAdapter, text: str) -> list[int]:
    return tokenizer.tokenize(text) + [tokenizer.eod]


# --- preprocessing ---------------------------------------------------------------------------

def test_preprocessing_is_byte_identical_across_runs_and_worker_counts(corpus, tmp_path):
    again = tmp_path / "again"
    preprocess([str(corpus["raw_a"])], str(again), train_tokenizer=str(tmp_path / "tok.json"),
               vocab_size=VOCAB, workers=1, batch_size=7, progress=False)
    assert (tmp_path / "tok.json").read_bytes() == Path(corpus["tokenizer"]).read_bytes()
    for suffix in (".bin", ".idx"):
        assert Path(f"{again}{suffix}").read_bytes() == Path(f"{corpus['a']}{suffix}").read_bytes()


def test_preprocessed_documents_match_the_text(corpus):
    tokenizer = TokenizerAdapter(corpus["tokenizer"])
    info = inspect_indexed_dataset(corpus["a"])
    assert info.num_documents == len(corpus["docs_a"]) and info.dtype == "uint16"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(corpus["a"])
    for i, text in enumerate(corpus["docs_a"]):
        ids = indexed[i].tolist()
        assert ids == encoded(tokenizer, text)
        assert tokenizer.detokenize(ids[:-1]) == text
    meta = json.loads(Path(f"{corpus['a']}.meta.json").read_text())
    assert meta["vocab_size"] == tokenizer.vocab_size <= VOCAB and meta["eod_id"] == tokenizer.eod


def test_reads_plain_text_parquet_and_folders(corpus, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("first document\n\nwith a paragraph\n", encoding="utf-8")
    (folder / "sub" / "two.txt").write_text("second <|endoftext|> document\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["from parquet", "   ", "again"]}), tmp_path / "p.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gzipped json"}) + "\n")
    preprocess([str(folder)], str(tmp_path / "txt"), tokenizer=corpus["tokenizer"], workers=1, progress=False)
    preprocess([str(tmp_path / "p.parquet"), str(tmp_path / "c.jsonl.gz")], str(tmp_path / "pq"),
               tokenizer=corpus["tokenizer"], text_key="body", workers=1, progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = TokenizerAdapter(corpus["tokenizer"])
    documents = IndexedDataset(str(tmp_path / "txt"))
    texts = [tokenizer.detokenize(d[:-1]) for d in documents]
    assert texts == ["first document\n\nwith a paragraph\n", "second <|endoftext|> document\n"]  # one per file
    assert [list(d).count(tokenizer.eod) for d in documents] == [1, 1]  # special-token text stays text
    texts = [tokenizer.detokenize(d[:-1]) for d in IndexedDataset(str(tmp_path / "pq"))]
    assert texts == ["from parquet", "again", "gzipped json"]  # blank documents are skipped


# --- datasets --------------------------------------------------------------------------------

def packed_config(corpus, **overrides) -> DataConfig:
    fields = dict(paths=[corpus["a"]], split="1,0,0", tokenizer=corpus["tokenizer"],
                  cache_dir=str(corpus["root"] / "cache"))
    fields.update(overrides)
    return DataConfig(**fields)


def in_storage_order(dataset):
    """Samples of a one-epoch GPTDataset in the order of its sample index (undoing the shuffle)."""
    inverse = np.argsort(np.asarray(dataset.shuffle_index))
    return [dataset[int(j)] for j in inverse]


def test_packed_samples_round_trip_token_exact(corpus):
    assert not torch.distributed.is_initialized()
    cfg = packed_config(corpus)
    tokenizer = load_tokenizer(cfg, model_vocab_size=512)
    train, valid, test = build_datasets(cfg, seq_length=16, seed=3, num_samples=(None, None, None),
                                        tokenizer=tokenizer)
    assert valid is None and test is None
    samples = in_storage_order(train)
    for s in samples:
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (16,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(16))
        assert bool((s["loss_mask"] == 1).all())
    stream = torch.cat([s["tokens"] for s in samples] + [samples[-1]["labels"][-1:]]).tolist()
    docs = [corpus["docs_a"][d] for d in train.document_index]
    expected = [t for text in docs for t in encoded(tokenizer, text)]
    assert len(expected) - 16 < len(stream) <= len(expected)  # only the last partial sequence is dropped
    assert stream == expected[: len(stream)]
    # Decoding the stream between end-of-document tokens gives the documents back, verbatim.
    pieces = tokenizer.detokenize(stream).split("<|endoftext|>")
    assert pieces[:-1] == docs[: len(pieces) - 1]


def test_padded_samples_mask_exactly_the_pads(corpus):
    cfg = packed_config(corpus, layout="padded", create_attention_mask=True)
    tokenizer = load_tokenizer(cfg)
    train, _, _ = build_datasets(cfg, 32, 5, (100, 0, 0), tokenizer)
    assert len(train) == 160  # whole epochs of the 80 documents covering 100 samples
    short = long = 0
    for i in range(len(train)):
        s = train[i]
        ids = encoded(tokenizer, corpus["docs_a"][train.document_of(i)])
        used = min(len(ids), 33)
        full = torch.cat([s["tokens"], s["labels"][-1:]])
        assert full[:used].tolist() == ids[:used]
        assert bool((full[used:] == tokenizer.pad).all())
        is_pad_label = torch.arange(32) >= used - 1
        assert torch.equal(s["loss_mask"] == 0, is_pad_label)
        assert s["attention_mask"].shape == (1, 32, 32) and not bool(s["attention_mask"][0, 5, 3])
        short += len(ids) < 33
        long += len(ids) > 33
    assert short and long  # both padding and truncation were exercised
    assert {train.document_of(i) for i in range(80)} == set(range(80))  # each epoch a permutation


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_sample_order_is_deterministic_and_seeded(corpus, layout):
    def order(seed):
        cfg = packed_config(corpus, layout=layout, split="90,10,0")
        train, valid, _ = build_datasets(cfg, 16, seed, (40, 4, 0), load_tokenizer(cfg))
        return [train[i]["tokens"].tolist() for i in range(20)], [valid[i]["tokens"].tolist() for i in range(4)]

    first, second, other = order(7), order(7), order(8)
    assert first == second
    assert first[0] != other[0]
    if layout == "packed":
        cache = corpus["root"] / "cache"
        assert any(p.name.endswith("shuffle_index.npy") for p in cache.rglob("*"))


def test_blends_and_per_split_paths(corpus):
    cfg = packed_config(corpus, paths=["0.25", corpus["a"], "0.75", corpus["b"]], split="1,0,0")
    train, _, _ = build_datasets(cfg, 16, 1, (200, 0, 0), load_tokenizer(cfg))
    ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert len(train) == 200 and abs(ids.count(1) / 200 - 0.75) < 0.02

    cfg = DataConfig(train_paths=[corpus["a"]], valid_paths=[corpus["b"]], tokenizer=corpus["tokenizer"],
                     cache_dir=str(corpus["root"] / "cache"))
    train, valid, test = build_datasets(cfg, 16, 1, (50, 10, 0), load_tokenizer(cfg))
    assert len(train) >= 50 and len(valid) >= 10 and test is None
    tokenizer = load_tokenizer(cfg)
    b_tokens = {t for text in corpus["docs_b"] for t in encoded(tokenizer, text)}
    assert set(valid[0]["tokens"].tolist()) <= b_tokens


def _first_samples_on_rank(corpus_paths, cache_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    a, b, tokenizer = corpus_paths
    cfg = DataConfig(paths=["0.5", a, "0.5", b], split="90,10,0", tokenizer=tokenizer, cache_dir=cache_dir)
    train, valid, _ = build_datasets(cfg, 16, 3, (30, 5, 0), load_tokenizer(cfg))
    return [train[i]["tokens"].tolist() for i in range(10)] + [valid[0]["tokens"].tolist()]


def test_two_ranks_build_the_same_datasets_as_one_process(corpus, tmp_path):
    from tests.distributed import run_distributed

    paths = (corpus["a"], corpus["b"], corpus["tokenizer"])
    ranks = run_distributed(_first_samples_on_rank, 2, paths, str(tmp_path / "shared-cache"))
    assert ranks[0] == ranks[1]
    cfg = DataConfig(paths=["0.5", corpus["a"], "0.5", corpus["b"]], split="90,10,0",
                     tokenizer=corpus["tokenizer"], cache_dir=str(tmp_path / "plain-cache"))
    train, valid, _ = build_datasets(cfg, 16, 3, (30, 5, 0), load_tokenizer(cfg))
    assert ranks[0] == [train[i]["tokens"].tolist() for i in range(10)] + [valid[0]["tokens"].tolist()]


def test_datasets_pickle_for_dataloader_workers(corpus):
    cfg = packed_config(corpus)
    train, _, _ = build_datasets(cfg, 16, 1, (10, 0, 0), load_tokenizer(cfg))
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[3]["tokens"], train[3]["tokens"])


def test_mock_data():
    cfg = DataConfig(mock=True)
    tokenizer = load_tokenizer(cfg, model_vocab_size=128)
    train, valid, test = build_datasets(cfg, 32, 1, (8, 4, 4), tokenizer)
    sample = train[0]
    assert sample["tokens"].shape == (32,) and int(sample["tokens"].max()) < 128
    assert len(valid) >= 4 and len(test) >= 4


# --- bad input -------------------------------------------------------------------------------

def test_empty_input_file(corpus, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="input file is empty: .*empty.jsonl"):
        preprocess([str(tmp_path / "empty.jsonl")], str(tmp_path / "out"), tokenizer=corpus["tokenizer"])


def test_only_blank_documents(corpus, tmp_path):
    write_jsonl(tmp_path / "blank.jsonl", ["", "  \n"])
    with pytest.raises(DataError, match="no non-blank documents"):
        preprocess([str(tmp_path / "blank.jsonl")], str(tmp_path / "out"), tokenizer=corpus["tokenizer"],
                   workers=1, progress=False)
    assert not list(tmp_path.glob("out.*"))  # nothing half-written is left behind


def test_invalid_utf8(corpus, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8: byte 14 \(line 2\)"):
        preprocess([str(tmp_path / "bad.txt")], str(tmp_path / "out"), tokenizer=corpus["tokenizer"])


def test_missing_input_path(corpus, tmp_path):
    with pytest.raises(DataError, match="input not found: .*nope.jsonl"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "out"), tokenizer=corpus["tokenizer"])


def test_missing_text_field(corpus, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"content": "hello"}\n')
    with pytest.raises(DataError, match="no 'text' field .*--text-key"):
        preprocess([str(tmp_path / "x.jsonl")], str(tmp_path / "out"), tokenizer=corpus["tokenizer"])


def test_cli_reports_bad_input_in_one_line(corpus, tmp_path, capsys):
    code = preprocess_main(["--input", str(tmp_path / "nope.txt"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer", corpus["tokenizer"]])
    assert code == 2
    assert "error: input not found" in capsys.readouterr().err


def test_unreachable_hub_dataset_fails_before_any_work(corpus, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess.py"), "--input", "someone/some-corpus",
         "--output-prefix", str(tmp_path / "o"), "--train-tokenizer", str(tmp_path / "t.json")],
        capture_output=True, text=True, env=env, timeout=120)
    assert process.returncode == 2
    assert "could not open 'someone/some-corpus': it is not a local file or folder" in process.stderr
    assert not list(tmp_path.iterdir())


def copy_prefix(corpus, tmp_path, name="copy") -> str:
    prefix = str(tmp_path / name)
    for suffix in (".bin", ".idx"):
        Path(prefix + suffix).write_bytes(Path(corpus["a"] + suffix).read_bytes())
    return prefix


@pytest.mark.parametrize("suffix,cut,message", [
    (".bin", 10, r"copy.bin is truncated: it has \d+ bytes, the index describes \d+"),
    (".idx", 8, r"copy.idx is truncated or corrupt"),
    (".idx", 10_000, r"copy.idx is not a megatron index"),
])
def test_truncated_files_are_refused_before_training(corpus, tmp_path, suffix, cut, message):
    prefix = copy_prefix(corpus, tmp_path)
    data = Path(prefix + suffix).read_bytes()
    Path(prefix + suffix).write_bytes(data[: max(len(data) - cut, 4)])
    cfg = packed_config(corpus, paths=[prefix], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, 16, 1, (10, 0, 0), load_tokenizer(cfg))
    assert not (tmp_path / "cache").exists()


def test_missing_data_prefix(corpus, tmp_path):
    cfg = packed_config(corpus, paths=[str(tmp_path / "none")])
    with pytest.raises(DataError, match="data file missing: .*none.idx"):
        build_datasets(cfg, 16, 1, (10, 0, 0), load_tokenizer(cfg))


def test_tokenizer_larger_than_model_vocabulary(corpus):
    tokenizer = TokenizerAdapter(corpus["tokenizer"])
    check_vocab(tokenizer, tokenizer.vocab_size)
    with pytest.raises(DataError, match=rf"has {tokenizer.vocab_size} tokens but the model's vocabulary is 300"):
        check_vocab(tokenizer, 300)
    with pytest.raises(DataError, match="model.vocab_size"):
        load_tokenizer(DataConfig(paths=["x"], tokenizer=corpus["tokenizer"]), model_vocab_size=300)


def test_data_tokenized_with_another_tokenizer(corpus, tmp_path):
    from tokenizers import Tokenizer

    other = Tokenizer.from_file(corpus["tokenizer"])
    other.add_special_tokens(["<|other|>"])
    smaller = tmp_path / "smaller.json"
    meta = json.loads(Path(corpus["a"] + ".meta.json").read_text())
    prefix = copy_prefix(corpus, tmp_path)
    Path(prefix + ".meta.json").write_text(json.dumps({**meta, "eod_id": 5}))
    other.save(str(smaller))
    cfg = packed_config(corpus, paths=[prefix], tokenizer=str(smaller))
    with pytest.raises(DataError, match="end-of-document id 5"):
        build_datasets(cfg, 16, 1, (10, 0, 0), load_tokenizer(cfg))


def test_split_without_documents_is_refused(corpus):
    cfg = packed_config(corpus, split="995,5,0")  # 0.5 % of 80 documents rounds to none
    with pytest.raises(DataError, match="gives the valid split none of the 80 documents"):
        build_datasets(cfg, 16, 1, (10, 10, 0), load_tokenizer(cfg))


@pytest.mark.parametrize("fields,message", [
    (dict(layout="dense"), "data.layout must be one of"),
    (dict(), "no training data"),
    (dict(paths=["a"], train_paths=["b"]), "not both"),
    (dict(paths=["0.5", "a", "b"]), "weights and prefixes must alternate|weight before every prefix"),
    (dict(paths=["a"], split="0,1"), "training split no data"),
    (dict(paths=["a"], split="x"), "data.split must be"),
])
def test_config_errors(fields, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**fields).validate()


def test_parse_blend():
    assert parse_blend("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([]) is None


# --- R lazy-load database ------------------------------------------------------------------

def _r_int(value: int) -> bytes:
    return struct.pack(">i", value)


def _r_charsxp(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _r_int(9 | (8 << 12)) + _r_int(len(raw)) + raw  # CHARSXP, UTF-8 level


def _r_names(names: list[str], first: bool) -> bytes:
    """A pairlist `names = c(...)`; the symbol `names` is written once, then referenced."""
    tag = _r_int(1) + _r_charsxp("names") if first else _r_int(255 | (1 << 8))
    value = _r_int(16) + _r_int(len(names)) + b"".join(_r_charsxp(n) for n in names)
    return _r_int(2 | (1 << 10)) + tag + value + _r_int(254)


def _r_serialize(body: bytes) -> bytes:
    return b"X\n" + _r_int(2) + _r_int(0x040201) + _r_int(0x020300) + body


def write_lazyload_db(prefix: Path, objects: dict[str, list]) -> None:
    blobs, table = b"", []
    for i, (name, lines) in enumerate(objects.items()):
        strings = b"".join(_r_int(9) + _r_int(-1) if s is None else _r_charsxp(s) for s in lines)
        data = _r_serialize(_r_int(16) + _r_int(len(lines)) + strings)
        blob = struct.pack(">I", len(data)) + (zlib.compress(data) if i % 2 == 0 else b"2" + bz2.compress(data))
        table.append((len(blobs), len(blob)))
        blobs += blob
    entries = b"".join(_r_int(13) + _r_int(2) + _r_int(o) + _r_int(n) for o, n in table)
    variables = _r_int(19 | (1 << 9)) + _r_int(len(table)) + entries + _r_names(list(objects), first=True)
    empty = _r_int(19 | (1 << 9)) + _r_int(0) + _r_names([], first=False)
    index = (_r_int(19 | (1 << 9)) + _r_int(3) + variables + empty + _r_int(10) + _r_int(1) + _r_int(1)
             + _r_names(["variables", "references", "compressed"], first=False))
    Path(f"{prefix}.rdx").write_bytes(gzip.compress(_r_serialize(index)))
    Path(f"{prefix}.rdb").write_bytes(blobs)


def test_rdata_reader(tmp_path):
    write_lazyload_db(tmp_path / "Rdata", {"novel": ["Chapter 1", "", "Émma’s line", None],
                                            "other": ["x"]})
    objects = read_lazyload_db(tmp_path / "Rdata")
    assert objects["novel"].values == ["Chapter 1", "", "Émma’s line", None]
    assert read_lazyload_db(tmp_path / "Rdata", ["other"])["other"].values == ["x"]
    with pytest.raises(ValueError, match="'missing' not in"):
        read_lazyload_db(tmp_path / "Rdata", ["missing"])


# --- sample corpus ---------------------------------------------------------------------------

def test_split_documents_keeps_whole_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 300 for i in range(20)) + "\n\n\n" + "y" * 5000
    docs = split_documents(text, max_chars=1000)
    assert all(len(d) <= 1000 for d in docs[:-1]) and docs[-1] == "y" * 5000
    assert "\n\n".join(docs) == text.rstrip("\n").replace("\n\n\n", "\n\n")


def fake_work(source, name):
    return Work(source, name, name.title(), f"{name} opens.\n\n" + "Some words here. " * 50)


def test_fallback_to_shakespeare_only_and_clear_offline_error(tmp_path, monkeypatch):
    def unavailable(_):
        raise FetchError("apt-get is not available")

    shakespeare = lambda _: [fake_work("shakespeare", n) for n in ("hamlet", "tempest")]  # noqa: E731
    monkeypatch.setattr(sample_corpus, "FETCHERS", {"shakespeare": shakespeare, "austen": unavailable})
    record = fetch_raw_corpus(str(tmp_path / "a"))
    assert record["sources"] == ["shakespeare"] and "austen" in record["unavailable"]
    assert record["valid"]["works"] == ["hamlet"] and record["train"]["works"] == ["tempest"]

    austen = lambda _: [fake_work("austen", n) for n in ("emma", "persuasion")]  # noqa: E731
    monkeypatch.setattr(sample_corpus, "FETCHERS", {"shakespeare": shakespeare, "austen": austen})
    record = fetch_raw_corpus(str(tmp_path / "b"))
    assert record["valid"]["works"] == ["persuasion"]
    assert record["train"]["works"] == ["hamlet", "tempest", "emma"]

    monkeypatch.setattr(sample_corpus, "FETCHERS", {"shakespeare": unavailable, "austen": unavailable})
    with pytest.raises(DataError, match="could not fetch any sample-corpus source .*offline"):
        fetch_raw_corpus(str(tmp_path / "c"))


def test_apt_without_root_says_how_to_fix(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package r-cran-janeaustenr"

    monkeypatch.setattr(sample_corpus.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sample_corpus, "_run", lambda *a, **k: Failed())
    monkeypatch.setattr(sample_corpus, "_is_root", lambda: False)
    with pytest.raises(FetchError, match="sudo apt-get update"):
        sample_corpus.download_austen(str(tmp_path))


SAMPLE = REPO / "data_cache" / "sample_corpus" / f"bpe{sample_corpus.DEFAULT_VOCAB_SIZE}"


@pytest.mark.skipif(not (SAMPLE / "manifest.json").is_file(), reason="sample corpus not fetched "
                    "(python tools/fetch_corpus.py)")
def test_cached_sample_corpus_reads_back():
    corpus = sample_corpus.prepare_sample_corpus(str(REPO / "data_cache"), progress=False)  # cached: no work
    cfg = DataConfig(train_paths=[corpus.train_prefix], valid_paths=[corpus.valid_prefix],
                     tokenizer=corpus.tokenizer, layout="padded")
    tokenizer = load_tokenizer(cfg, model_vocab_size=sample_corpus.DEFAULT_VOCAB_SIZE)
    _, valid, _ = build_datasets(cfg, 64, 1, (8, 8, 0), tokenizer)
    raw = (SAMPLE.parent / "raw" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    document = json.loads(raw[valid.document_of(0)])
    assert document["work"] == "persuasion"
    ids = valid[0]["tokens"].tolist()
    ids = ids[: ids.index(tokenizer.eod)] if tokenizer.eod in ids else ids
    assert document["text"].startswith(tokenizer.detokenize(ids))


def test_a_bad_json_record_is_located_by_line(tmp_path):
    from cola_megatron.data.sources import _json_error  # what names the line in cola-preprocess's message

    lines = tmp_path / "a.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    assert _json_error(str(lines)).startswith("line 3 is not a JSON record")
    array = tmp_path / "b.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    assert _json_error(str(array)).startswith("line 3 is not valid JSON")
    json_lines = tmp_path / "c.json"
    json_lines.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    assert _json_error(str(json_lines)).startswith("line 3 is not a JSON record")
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "a"}\n{"text": null}\n')
    assert _json_error(str(good)) is None


def test_token_range_sees_negative_ids_in_signed_files(tmp_path):
    from cola_megatron.data.indexed import token_id_range

    np.array([5, -3, 7, 2], dtype=np.int32).tofile(tmp_path / "x.bin")
    assert token_id_range(str(tmp_path / "x"), "int32", chunk_tokens=3) == (-3, 7)
