"""Bad input through the real command-line entry points: one table, one subprocess per case.

Each case builds its files in a fresh directory, runs a console script's module (`python -m ...`, what the script's
`main` runs) there, and asserts the exit code, one line on stderr matching the case's message and naming the fix, no
traceback, and that every file that was there before is byte-identical after (for a failure: nothing written at
all). Most cases fail before megatron-core or torch is imported, so each costs well under a second; those that read
their input with `datasets` or a tokenizer, or resume a saved run's checkpoint, cost a few seconds. The cases run
two at a time.

To add a case: write a setup function ``setup(work: Path) -> argv`` (argv[0] a console script name) and add a
``Case`` row to ``CASES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "cola-train": "cola_megatron.train",
    "cola-preprocess": "cola_megatron.data.preprocess",
    "cola-plan": "cola_megatron.analysis.plan",
    "cola-convert": "cola_megatron.convert.cli",
}
FIX_WORDS = ("fix", "give", "choose", "pass", "use", "check", "create", "set", "write", "see", "re-run", "delete",
             "lower", "add", "remove", "make", "point", "save", "include", "must be", "re-encode", "name",
             "run cola-")
FIX = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in FIX_WORDS) + r")\b", re.IGNORECASE)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
IDX_HEADER = 34  # megatron's .idx: magic 9, version 8, dtype 1, sequence count 8, document count 8


@dataclass
class Case:
    id: str
    setup: Callable[[Path], List[str]]
    """Writes the case's files under the work directory and returns the command line (a console script first)."""
    code: int
    message: str
    """A regex the one stderr line must contain."""
    unprivileged: bool = False
    """Needs file permissions to bite: as root, the command runs without the capabilities that bypass them."""
    checkpoint: bool = False
    """Starts from a copy of a saved run (the base config trained 2 iterations, a checkpoint after each)."""
    may_add: tuple = ()
    """Paths a failing command may add (never change): caches and logs of a run that failed after starting."""


# --------------------------------------------------------------------------------------------------------------
# Shared inputs: a small corpus, two tokenizers, one preprocessed prefix


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jackals".split()


def _documents(count: int, seed: int) -> List[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """tokenizer.json, other_tokenizer.json (trained on other text), train.bin/.idx/.meta.json, corpus.jsonl."""
    from cola_megatron.data.indexed import IndexedWriter
    from cola_megatron.data.tokenizer import TokenizerAdapter, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("assets")
    docs = _documents(60, seed=0)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe_tokenizer(docs, 300).save(str(root / "tokenizer.json"))
    train_bpe_tokenizer(_documents(60, seed=1) + ["zebra yak xylophone"] * 5, 300).save(
        str(root / "other_tokenizer.json"))
    tokenizer = TokenizerAdapter(str(root / "tokenizer.json"))
    writer = IndexedWriter(str(root / "train"), tokenizer.vocab_size)
    import numpy as np

    for doc in docs:
        writer.add_document(np.asarray(tokenizer.tokenize(doc) + [tokenizer.eod], dtype=np.int32))
    writer.finalize({"tokenizer": str(root / "tokenizer.json"), "tokenizer_sha256": tokenizer.sha256,
                     "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod})
    return root


ASSETS: Dict[str, Path] = {}  # filled by the test from the fixture (setups are plain functions)


def _data(work: Path, name: str = "data") -> Path:
    """A copy of the preprocessed prefix and its tokenizer in work/<name>/."""
    folder = work / name
    folder.mkdir()
    for file in ("train.bin", "train.idx", "train.meta.json", "tokenizer.json", "other_tokenizer.json"):
        shutil.copy(ASSETS["root"] / file, folder / file)
    return folder


BASE_CONFIG = """\
model: {hidden_size: 64, ffn_hidden_size: 128, num_layers: 2, num_attention_heads: 4, rank: 16, vocab_size: 512,
        seq_length: 32}
train: {micro_batch_size: 2, global_batch_size: 4, train_iters: 2, precision: fp32, device: cpu, eval_iters: 1}
data: {train_paths: [data/train], valid_paths: [data/train], tokenizer: data/tokenizer.json}
checkpoint: {save_dir: ckpt, save_interval: 1}
logging: {log_dir: logs}
"""


def _config(work: Path, text: str = BASE_CONFIG, name: str = "run.yaml", data: bool = True) -> str:
    if data:
        _data(work)
    (work / name).write_text(text)
    return name


def train(*overrides: str, dry_run: bool = True, data: bool = True):
    """A setup running cola-train on the base config (with the data copied) and these overrides."""
    def setup(work: Path) -> List[str]:
        return ["cola-train", "--config", _config(work, data=data), *(["--dry-run"] if dry_run else []),
                *overrides]
    return setup


def train_with(prepare: Callable[[Path], None], *overrides: str, dry_run: bool = True):
    """Like ``train`` with the data copied, then ``prepare(work)`` damaging something."""
    def setup(work: Path) -> List[str]:
        argv = train(*overrides, dry_run=dry_run)(work)
        prepare(work)
        return argv
    return setup


def config_text(text: str, *extra: str, files: Dict[str, bytes] = None):
    """cola-train --dry-run on a config file with this text (plus other files, e.g. includes)."""
    def setup(work: Path) -> List[str]:
        for name, content in (files or {}).items():
            (work / name).write_bytes(content)
        (work / "run.yaml").write_bytes(text.encode() if isinstance(text, str) else text)
        return ["cola-train", "--config", "run.yaml", "--dry-run", *extra]
    return setup


# --- damaging the data -----------------------------------------------------------------------------------------

def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _sequences(work: Path) -> int:
    return struct.unpack("<Q", (work / "data/train.idx").read_bytes()[18:26])[0]


def flip_token(work: Path) -> None:
    _patch(work / "data/train.bin", 20, struct.pack("<H", 60000))  # uint16 ids: one far outside the vocabulary


def bad_pointer(work: Path) -> None:
    _patch(work / "data/train.idx", IDX_HEADER + 4 * _sequences(work) + 8 * 3, struct.pack("<q", 1 << 40))


def bad_document_table(work: Path) -> None:
    n = _sequences(work)
    _patch(work / "data/train.idx", IDX_HEADER + 12 * n + 8 * 5, struct.pack("<q", n + 7))


def bad_header(work: Path) -> None:
    _patch(work / "data/train.idx", 0, b"NOTANIDX!")


def truncate(path: str, keep: int):
    def prepare(work: Path) -> None:
        file = work / path
        file.write_bytes(file.read_bytes()[:keep] if keep >= 0 else file.read_bytes()[:keep])
    return prepare


def write(path: str, content: bytes):
    def prepare(work: Path) -> None:
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(content)
    return prepare


def read_only(path: str):
    def prepare(work: Path) -> None:
        (work / path).mkdir(exist_ok=True)
        (work / path).chmod(0o555)
    return prepare


# --- cola-preprocess and cola-plan ------------------------------------------------------------------------------

def preprocess(*args: str, jsonl: str = None, files: Dict[str, bytes] = None):
    def setup(work: Path) -> List[str]:
        _data(work)
        (work / "in.jsonl").write_text(jsonl if jsonl is not None else (ASSETS["root"] / "corpus.jsonl").read_text())
        for name, content in (files or {}).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(content)
        return ["cola-preprocess", "--no-progress", "--workers", "1", *args]
    return setup


def plan(*args: str, files: Dict[str, bytes] = None):
    def setup(work: Path) -> List[str]:
        for name, content in (files or {}).items():
            (work / name).write_bytes(content)
        return ["cola-plan", "--config", str(REPO / "configs/demo.yaml"), "--nodes", "1", "--gpus-per-node", "2",
                *args]
    return setup


def convert(*args: str, files: Dict[str, bytes] = None, saved: bool = False):
    """cola-convert with ``files`` written under work/ (and the saved run copied there first when ``saved``)."""
    def setup(work: Path) -> List[str]:
        if saved:
            shutil.copytree(ASSETS["saved"], work, dirs_exist_ok=True)
        for name, content in (files or {}).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(content)
        return ["cola-convert", *args]
    return setup


TIED_LLAMA = json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": True}).encode()


# --- resuming a saved run, and damaging its checkpoint (items 2, 5, 6) ---------------------------------------------

SAVED_ITERS = 2


def resume(*overrides: str, damage: Callable[[Path], None] = None, command: str = "train", convert_args=()):
    """The saved run copied to work/ (config, data, ckpt/), ``damage(shard)`` applied to the last checkpoint's
    first shard, then cola-train resuming it for two more iterations, or ``cola-convert to-hf`` exporting it."""
    def setup(work: Path) -> List[str]:
        shutil.copytree(ASSETS["saved"], work, dirs_exist_ok=True)
        if damage:
            damage(work / "ckpt" / f"iter_{SAVED_ITERS:07d}" / "__0_0.distcp")
        if command == "to-hf":
            return ["cola-convert", "to-hf", "ckpt", "hf", "--no-tokenizer", *convert_args]
        if command == "reshard":
            return ["cola-convert", "reshard", "ckpt", "out", *convert_args]
        return ["cola-train", "--config", "run.yaml", f"train.train_iters={SAVED_ITERS + 2}", *overrides]
    return setup


def claim_query_groups(shard: Path) -> None:
    """The checkpoint's config says grouped-query attention (2 k/v groups for 4 heads); to-hf refuses what it asks
    from the config alone, before any tensor is read."""
    import yaml

    config = shard.parent / "cola_config.yaml"
    values = yaml.safe_load(config.read_text())
    values["model"]["num_query_groups"] = 2
    config.write_text(yaml.safe_dump(values))


def reference_dir_claiming_gqa(work: Path) -> List[str]:
    """A Hugging Face directory in the reference implementation's layout (no auto_map naming this project's
    modeling code) whose config.json claims 2 k/v heads for 4 query heads."""
    (work / "ref").mkdir()
    (work / "ref" / "config.json").write_text(json.dumps({
        "model_type": "cola", "architectures": ["ColaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rank": 16}))
    return ["cola-convert", "from-hf", "ref", "out"]


def truncate_shard(shard: Path) -> None:
    os.truncate(shard, shard.stat().st_size // 2)


def flip_shard_byte(shard: Path) -> None:
    _patch(shard, shard.stat().st_size // 2, bytes([shard.read_bytes()[shard.stat().st_size // 2] ^ 0xFF]))


def nan_weights_without_manifest(shard: Path) -> None:
    """16 bytes of 0xFF amid the stored output-layer weight (located through torch's checkpoint index): every
    float32 they cover is a NaN; the sizes still match and, without the manifest, no checksum tells."""
    from torch.distributed.checkpoint import FileSystemReader

    (shard.parent / "manifest.json").unlink()
    storage = FileSystemReader(str(shard.parent)).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == "output_layer.weight")
    _patch(shard.parent / info.relative_path, info.offset + info.length // 2, b"\xff" * 16)


def truncate_shard_without_manifest(shard: Path) -> None:
    (shard.parent / "manifest.json").unlink()
    truncate_shard(shard)


NULL_RECORDS = '{"text": "one fox"}\n{"text": null}\n{"text": "two dogs"}\n{"text": null}\n'
BAD_LINE = '{"text": "one fox"}\n{"text": "two dogs"}\n{"text": "three\n{"text": "four"}\n'
HUGE_MODEL = ("model.arch=dense", "model.hidden_size=16384", "model.ffn_hidden_size=65536", "model.num_layers=4096",
              "model.num_attention_heads=128", "model.recompute=full", "train.micro_batch_size=1",
              "train.global_batch_size=1", "data.mock=true", "data.tokenizer=null", "model.vocab_size=32000")


CASES = [
    # Config files and overrides (item 8)
    Case("config-include-list", config_text("include: [a.yaml, b.yaml]\n"), 2, r"include.*expected one file name"),
    Case("config-not-utf8", config_text(b"model:\n  arch: cola  # caf\xe9\n"), 2, r"run\.yaml: is not UTF-8 .*line 2"),
    Case("config-duplicate-key", config_text("model:\n  rank: 8\n  hidden_size: 64\n  rank: 16\n"), 2,
         r"key 'rank' appears twice \(lines 2 and 4\)"),
    Case("config-duplicate-section", config_text("model: {rank: 8}\ntrain: {seed: 1}\nmodel: {rank: 16}\n"), 2,
         r"key 'model' appears twice"),
    Case("override-duplicate-key", config_text("data: {mock: true}\n", "model.rank={a: 1, a: 2}"), 2,
         r"model\.rank: key 'a' appears twice"),
    Case("config-missing-include", config_text("include: nowhere/base.yaml\n"), 2,
         r"run\.yaml: include: the included file .*nowhere/base\.yaml' does not exist"),
    Case("config-missing", lambda work: ["cola-train", "--config", "absent.yaml", "--dry-run"], 2,
         r"--config: file 'absent\.yaml' does not exist"),
    Case("config-include-cycle", config_text("include: run.yaml\n"), 2, r"includes itself"),
    Case("config-not-a-mapping", config_text("- model\n- train\n"), 2, r"top level is not a mapping"),
    Case("config-bad-yaml", config_text("model: {rank: [1\n"), 2, r"run\.yaml: is not valid YAML .*line 1"),
    Case("config-unknown-key", train("model.hiden_size=64"), 2, r"did you mean 'model\.hidden_size'"),
    # At the demo's shapes (the tiny base model's activations at 10M tokens would fit a large accelerator)
    Case("seq-length-10m", train("model.seq_length=10000000", "model.hidden_size=192", "model.ffn_hidden_size=512",
                                 "model.num_layers=4", "model.rank=48"), 2,
         r"model\.seq_length=10000000.* GiB per GPU .*more than any accelerator holds"),
    # Output directories, checked before any model is built (item 4)
    Case("save-dir-under-a-file", train_with(write("blocker", b"x"), "checkpoint.save_dir=blocker/ckpt"), 2,
         r"checkpoint\.save_dir=.*blocker/ckpt .*is a file"),
    Case("log-dir-under-a-file", train_with(write("blocker", b"x"), "logging.log_dir=blocker/logs"), 2,
         r"logging\.log_dir=.*is a file"),
    Case("cache-dir-under-a-file", train_with(write("blocker", b"x"), "data.cache_dir=blocker/cache"), 2,
         r"data\.cache_dir=.*is a file"),
    Case("save-dir-read-only", train_with(read_only("locked"), "checkpoint.save_dir=locked/ckpt"), 2,
         r"checkpoint\.save_dir=.*cannot be created: .*locked is not writable", unprivileged=True),
    Case("save-dir-read-only-real-run",
         train_with(read_only("locked"), "checkpoint.save_dir=locked", dry_run=False), 2,
         r"checkpoint\.save_dir=.*locked \(checkpoints\) is not writable", unprivileged=True),
    Case("log-dir-read-only", train_with(read_only("locked"), "logging.log_dir=locked"), 2,
         r"logging\.log_dir=.* is not writable", unprivileged=True),
    Case("data-dir-read-only", train_with(read_only("data")), 2,
         r"data\.cache_dir=.*index-cache \(the dataset index cache, beside the data by default\) cannot be created",
         unprivileged=True),
    Case("free-space-warning", train(*HUGE_MODEL), 0, r"warning: checkpoint\.save_dir=ckpt: .* GB free, but"),
    # Data (item 7)
    Case("data-missing", train("data.train_paths=[data/absent]"), 2, r"data file missing: .*absent\.idx"),
    Case("tokenizer-missing", train("data.tokenizer=data/absent.json"), 2, r"data\.tokenizer=data/absent\.json does not exist"),
    Case("tokenizer-not-json", train_with(write("data/tokenizer.json", b"{not json")), 2,
         r"is not a valid tokenizer\.json"),
    Case("tokenizer-not-set", train("data.tokenizer=null"), 2, r"data\.tokenizer is not set"),
    Case("tokenizer-larger-than-model", train("model.vocab_size=256"), 2,
         r"data\.tokenizer has 300 tokens but model\.vocab_size is 256"),
    Case("token-id-out-of-vocab", train_with(flip_token), 2, r"train\.bin holds token id 60000, outside the vocabulary"),
    Case("token-id-out-of-vocab-real-run", train_with(flip_token, dry_run=False), 2,
         r"holds token id 60000, outside the vocabulary"),
    Case("idx-bad-pointer", train_with(bad_pointer), 2, r"train\.idx is corrupt: the byte offset of sequence 3"),
    Case("idx-bad-document-table", train_with(bad_document_table), 2, r"inconsistent document table"),
    Case("idx-bad-header", train_with(bad_header), 2, r"is not a megatron index"),
    Case("idx-truncated", train_with(truncate("data/train.idx", -9)), 2, r"train\.idx is truncated or corrupt"),
    Case("bin-truncated", train_with(truncate("data/train.bin", -10)), 2, r"train\.bin is truncated"),
    Case("meta-corrupt", train_with(truncate("data/train.meta.json", 40)), 2,
         r"train\.meta\.json is corrupt .*delete .*train\.meta\.json"),
    Case("meta-not-an-object", train_with(write("data/train.meta.json", b"[1, 2]")), 2, r"not a JSON object"),
    Case("other-tokenizers-data", train("data.tokenizer=data/other_tokenizer.json"), 2,
         r"data/train was tokenized with .*but data\.tokenizer=data/other_tokenizer\.json is a different file"),
    Case("tiny-dataset-many-epochs", train("train.train_iters=5000"), 0,
         r"warning: .*passes over the training data about [\d,]+ times"),
    # cola-preprocess: overwrites and input (items 5, 8)
    Case("preprocess-onto-existing-prefix",
         preprocess("--input", "in.jsonl", "--output-prefix", "data/train", "--tokenizer", "data/tokenizer.json"), 2,
         r"data/train\.bin, data/train\.idx, data/train\.meta\.json already exist; pass --overwrite"),
    Case("preprocess-onto-existing-tokenizer",
         preprocess("--input", "in.jsonl", "--output-prefix", "new/x", "--train-tokenizer", "data/tokenizer.json",
                    "--vocab-size", "300"), 2, r"--train-tokenizer data/tokenizer\.json already exists; pass --overwrite"),
    Case("preprocess-malformed-json-line",
         preprocess("--input", "in.jsonl", "--output-prefix", "new/x", "--tokenizer", "data/tokenizer.json",
                    jsonl=BAD_LINE), 2, r"in\.jsonl: line 3 is not a JSON record"),
    Case("preprocess-null-text",
         preprocess("--input", "in.jsonl", "--output-prefix", "new/x", "--tokenizer", "data/tokenizer.json",
                    jsonl=NULL_RECORDS), 0, r"skipped 2 records whose 'text' is null"),
    Case("preprocess-tokenizer-missing",
         preprocess("--input", "in.jsonl", "--output-prefix", "new/x", "--tokenizer", "absent.json"), 2,
         r"--tokenizer absent\.json does not exist"),
    Case("preprocess-input-missing",
         preprocess("--input", "absent.jsonl", "--output-prefix", "new/x", "--tokenizer", "data/tokenizer.json"), 2,
         r"input not found: absent\.jsonl"),
    Case("preprocess-input-not-utf8",
         preprocess("--input", "latin.jsonl", "--output-prefix", "new/x", "--tokenizer", "data/tokenizer.json",
                    files={"latin.jsonl": b'{"text": "caf\xe9"}\n'}), 2, r"latin\.jsonl is not valid UTF-8"),
    Case("preprocess-input-empty",
         preprocess("--input", "empty.jsonl", "--output-prefix", "new/x", "--tokenizer", "data/tokenizer.json",
                    files={"empty.jsonl": b""}), 2, r"input file is empty"),
    Case("preprocess-prefix-under-a-file",
         preprocess("--input", "in.jsonl", "--output-prefix", "blocker/x", "--tokenizer", "data/tokenizer.json",
                    files={"blocker": b"x"}), 2, r"--output-prefix blocker/x: .*blocker is a file"),
    Case("preprocess-prefix-read-only",
         lambda work: (read_only("locked")(work), preprocess(
             "--input", "in.jsonl", "--output-prefix", "locked/x", "--tokenizer", "data/tokenizer.json")(work))[1],
         2, r"--output-prefix locked/x: .*locked is not writable", unprivileged=True),
    # cola-plan: cluster figures and launch files (items 5, 8)
    Case("plan-network-gbs-zero", plan("--network-gbs", "0"), 2, r"argument --network-gbs: must be a finite number > 0"),
    Case("plan-kernel-data-missing", plan("--kernel-data", "absent.jsonl"), 2, r"--kernel-data absent\.jsonl does not exist"),
    Case("plan-kernel-data-too-few-gemms", plan("--kernel-data", "k.jsonl", files={
        "k.jsonl": b'{"probe": "gemm", "m": 1024, "k": 1024, "n": 1024, "us": 5.0}\n'}), 2,
         r"k\.jsonl: 1 gemm rows with aligned shapes .*Fix: measure more GEMMs"),
    Case("plan-gpu-memory-negative", plan("--gpu-memory-gib", "-80"), 2, r"argument --gpu-memory-gib: must be"),
    Case("plan-gpu-memory-nan", plan("--gpu-memory-gib", "nan"), 2, r"argument --gpu-memory-gib: .*got nan"),
    Case("plan-nvlink-inf", plan("--nvlink-gbs", "inf"), 2, r"argument --nvlink-gbs: .*got inf"),
    Case("plan-reserve-exceeds-memory", plan("--gpu-memory-gib", "8", "--reserve-gib", "8"), 2,
         r"--reserve-gib 8 leaves nothing"),
    Case("plan-render-slurm-onto-existing", plan("--render-slurm", "job.sbatch", files={"job.sbatch": b"#!/bin/sh\n"}),
         2, r"job\.sbatch already exists\. Fix: pass --overwrite"),
    Case("plan-render-k8s-onto-existing", plan("--render-k8s", "job.yaml", files={"job.yaml": b"kind: x\n"}), 2,
         r"job\.yaml already exists"),
    Case("plan-render-into-missing-dir", plan("--render-slurm", "nowhere/job.sbatch"), 2,
         r"directory .*nowhere does not exist"),
    # Resuming a checkpoint with changed settings, or another run's (items 2, 5)
    Case("resume-changed-lr", resume("optimizer.lr=1e-4"), 2,
         r"optimizer\.lr: checkpoint 0\.006, config 0\.0001;.* Fix: set checkpoint\.scheduler_from=config",
         checkpoint=True),
    Case("resume-changed-lr-and-min-lr", resume("optimizer.lr=1e-4", "optimizer.min_lr_ratio=0.5"), 2,
         r"optimizer\.lr: checkpoint 0\.006, config 0\.0001; optimizer\.min_lr_ratio: checkpoint 0\.1, config 0\.5",
         checkpoint=True),
    Case("resume-longer-run-null-decay", resume(), 2,
         r"optimizer\.decay_iters \(null follows train\.train_iters\): checkpoint 2, config 4", checkpoint=True),
    Case("resume-scheduler-from-typo", resume("checkpoint.scheduler_from=cfg"), 2,
         r"checkpoint\.scheduler_from: 'cfg' is not one of", checkpoint=True),
    Case("resume-other-seed", resume("train.seed=99", "checkpoint.scheduler_from=checkpoint"), 2,
         r"train\.seed: checkpoint 1234, config 99.*checkpoint\.allow_different_run=true", checkpoint=True),
    Case("resume-other-data", resume("data.valid_paths=[data/valid]", "checkpoint.scheduler_from=checkpoint"), 2,
         r"data\.valid_paths: checkpoint \['data/train'\], config \['data/valid'\]", checkpoint=True),
    # Damaged checkpoints, found before loading and named (item 6)
    Case("resume-truncated-shard", resume("checkpoint.scheduler_from=checkpoint", damage=truncate_shard), 2,
         r"__0_0\.distcp has \d+ bytes, the manifest records \d+", checkpoint=True),
    # A checksum needs every byte read: it is verified as the shards load, after the data index is built.
    Case("resume-flipped-byte-in-shard", resume("checkpoint.scheduler_from=checkpoint", damage=flip_shard_byte), 2,
         r"__0_0\.distcp does not match its checksum", checkpoint=True, may_add=("data/index-cache/", "logs/")),
    Case("resume-truncated-shard-no-manifest",
         resume("checkpoint.scheduler_from=checkpoint", damage=truncate_shard_without_manifest), 2,
         r"__0_0\.distcp is truncated", checkpoint=True),
    Case("to-hf-flipped-byte", resume(damage=flip_shard_byte, command="to-hf"), 2,
         r"__0_0\.distcp does not match its checksum", checkpoint=True),
    Case("to-hf-nan-weights", resume(damage=nan_weights_without_manifest, command="to-hf"), 2,
         r"holds NaN/inf weights .*Fix: convert an earlier checkpoint", checkpoint=True),
    Case("to-hf-truncated-shard", resume(damage=truncate_shard, command="to-hf"), 2,
         r"__0_0\.distcp has \d+ bytes", checkpoint=True),
    # Grouped-query attention (issue: CoLA on the Llama-3 shape)
    Case("gqa-groups-not-dividing-heads", train("model.num_query_groups=3"), 2,
         r"model\.num_attention_heads: 4 is not divisible by model\.num_query_groups=3"),
    Case("gqa-tp-not-dividing-groups", train("model.num_query_groups=2", "parallel.tensor_parallel=4"), 2,
         r"model\.num_query_groups: 2 is not divisible by parallel\.tensor_parallel=4.*whole k/v groups"),
    Case("to-hf-reference-layout-of-gqa",
         resume(damage=claim_query_groups, command="to-hf", convert_args=("--reference-layout",)), 2,
         r"num_query_groups=2 .*reference implementation cannot represent grouped-query attention", checkpoint=True),
    Case("reshard-tp-beyond-query-groups",
         resume(damage=claim_query_groups, command="reshard", convert_args=("--tp", "4")), 2,
         r"cannot be laid out at TP=4 PP=1: model\.num_query_groups: 2 is not divisible by parallel\.tensor_parallel=4",
         checkpoint=True),
    Case("from-hf-reference-layout-claiming-gqa", reference_dir_claiming_gqa, 2,
         r"reference implementation's layout but claims grouped-query attention .*cannot represent"),
    Case("to-hf-bad-shard-size", convert("to-hf", "ckpt", "hf", "--no-tokenizer", "--max-shard-size", "lots", saved=True), 2,
         r"--max-shard-size 'lots' is not a size: pass e\.g\. 5GB", checkpoint=True),
    Case("from-hf-tied-llama", convert("from-hf", "llama", "out", files={"llama/config.json": TIED_LLAMA}), 2,
         r"ties the output layer to the embeddings.*Fix: save lm_head\.weight"),
]


# --------------------------------------------------------------------------------------------------------------
# Running a case


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under ``root`` (relative path -> sha256) and every directory (relative path/ -> "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir() and not path.is_symlink():
            out[f"{path.relative_to(root)}/"] = "dir"
    return out


def _writable_again(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)


@pytest.fixture(scope="module")
def saved_run(assets, tmp_path_factory) -> Path:
    """config, data and ckpt/ of the base config trained for SAVED_ITERS iterations with a checkpoint after each."""
    ASSETS["root"] = assets
    root = tmp_path_factory.mktemp("saved_run")
    _config(root)
    for ext in ("bin", "idx", "meta.json"):  # a second prefix with the same tokens: other data for a resume
        shutil.copy(root / "data" / f"train.{ext}", root / "data" / f"valid.{ext}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", MODULES["cola-train"], "--config", "run.yaml",
                          f"train.train_iters={SAVED_ITERS}", "logging.log_dir=null"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (root / "ckpt" / "latest").read_text().strip() == f"iter_{SAVED_ITERS:07d}"
    return root


@dataclass
class Outcome:
    argv: List[str]
    before: Dict[str, str]
    after: Dict[str, str]
    result: subprocess.CompletedProcess


def run_case(case: Case) -> Outcome:
    """The case in a fresh working directory (work/) with a home for caches (home/), both removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="cola-bad-input-"))
    try:
        cwd = home / "work"
        cwd.mkdir()
        (home / "home").mkdir()
        argv = case.setup(cwd)
        before = snapshot(cwd)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "HOME": str(home / "home"), "HF_HOME": str(home / "home" / "hf"), "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        # Root ignores file modes; without the capabilities that let it, the kernel checks them as for anyone.
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if case.unprivileged and IS_ROOT else []
        result = subprocess.run([*prefix, sys.executable, "-m", MODULES[argv[0]], *argv[1:]], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=300)
        return Outcome(argv, before, snapshot(cwd), result)
    finally:
        _writable_again(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def outcomes(assets, request):
    """Runs the selected cases two at a time (each one is mostly a Python start-up) and hands each test its own."""
    ASSETS["root"] = assets
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input" and hasattr(item, "callspec")]
    if any(case.checkpoint for case in selected):
        ASSETS["saved"] = request.getfixturevalue("saved_run")
    pool = ThreadPoolExecutor(2)
    yield {case.id: pool.submit(run_case, case) for case in selected}
    pool.shutdown(cancel_futures=True)


def test_the_table_has_unique_ids_and_enough_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes):
    if case.unprivileged and IS_ROOT and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    outcome = outcomes[case.id].result()
    argv, before, after, result = outcome.argv, outcome.before, outcome.after, outcome.result
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == case.code, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.code:
        assert len(lines) == 1, result.stderr
        line = lines[0]
        assert line.startswith(f"{argv[0]}: error: "), line
    else:
        matching = [line for line in lines if re.search(case.message, line)]
        assert len(matching) == 1, result.stderr
        line = matching[0]
    assert re.search(case.message, line), line
    assert FIX.search(line), f"no fix named: {line}"
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert changed == [], f"changed or removed: {changed}"
    if case.code:
        added = [name for name in set(after) - set(before) if not name.startswith(case.may_add)]
        assert added == [], f"a failed command wrote: {sorted(added)}"


# --------------------------------------------------------------------------------------------------------------
# What the table cannot express: a replacement asked for, and `make clean`


def test_plan_overwrite_replaces_a_launch_file_when_asked(tmp_path):
    target = tmp_path / "job.sbatch"
    target.write_text("old\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "cola_megatron.analysis.plan", "--config", "configs/demo.yaml",
                             "--nodes", "1", "--gpus-per-node", "1", "--evaluate", "--render-slurm", str(target),
                             "--overwrite"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=1" in target.read_text()


def test_make_clean_removes_only_what_make_demo_made(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    made = ["checkpoints/demo/iter_0000150/x.distcp", "runs/demo/metrics.jsonl",
            "data_cache/sample_corpus/bpe8192/index-cache/abc/idx.npy"]
    kept = ["checkpoints/cola_1b/latest", "runs/cola_1b/metrics.jsonl", "data_cache/sample_corpus/bpe8192/train.bin"]
    for name in made + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    result = subprocess.run(["make", "--no-print-directory", "clean"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert [n for n in made if (tmp_path / n).exists()] == []
    assert [n for n in kept if (tmp_path / n).read_text() != n] == []
