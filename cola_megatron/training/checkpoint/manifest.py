"""A checkpoint's manifest: every file's size and CRC-32, written before the checkpoint counts as complete, and
checked before a checkpoint is used, so a truncated or corrupted file is named instead of loading silently wrong
weights (or failing deep inside torch with a bare ``EOFError``).

``manifest.json`` lists the files megatron wrote (shards, ``.metadata``, ``common.pt``, ``metadata.json``).
Checkpoints without one (written by older versions or by conversion) still get the size check against torch's
distributed-checkpoint metadata, which records where every tensor lies in which ``.distcp`` file.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, Iterable, List, Optional, Sequence

from cola_megatron.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 << 20
# Written after the manifest (the completion marker) or rewritten in place: not covered.
_UNLISTED = {MANIFEST_FILE, "cola_config.yaml"}


def crc32_file(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def listed_files(ckpt_dir: str) -> List[str]:
    """The files a manifest covers, relative to ``ckpt_dir``, sorted (temporary files excluded)."""
    out = []
    for base, _, files in os.walk(ckpt_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), ckpt_dir)
            if rel not in _UNLISTED and not name.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def describe_files(ckpt_dir: str, names: Iterable[str]) -> Dict[str, dict]:
    """Size and CRC-32 of each named file (ranks split the files of a big checkpoint between them)."""
    return {n: {"size": os.path.getsize(os.path.join(ckpt_dir, n)), "crc32": crc32_file(os.path.join(ckpt_dir, n))}
            for n in names}


def write_manifest(ckpt_dir: str, entries: Dict[str, dict]) -> None:
    tmp = os.path.join(ckpt_dir, f".{MANIFEST_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "checksum": "crc32", "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, MANIFEST_FILE))


def write_manifest_from_all_ranks(ckpt_dir: str) -> None:
    """Every rank of the default process group checksums a share of the files; rank 0 writes the manifest."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    box = [listed_files(ckpt_dir) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    gathered = [None] * world
    dist.all_gather_object(gathered, describe_files(ckpt_dir, box[0][rank::world]))
    if rank == 0:
        write_manifest(ckpt_dir, {k: v for part in gathered for k, v in part.items()})


def read_manifest(ckpt_dir: str) -> Optional[Dict[str, dict]]:
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
        return files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{path} is unreadable or not a checkpoint manifest. Fix: resume from another "
                              "checkpoint (checkpoint.load_dir=DIR/iter_NNNNNNN)") from None


def _fail(ckpt_dir: str, problems: Sequence[str]) -> None:
    raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(problems[:5])}"
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                          + ". Fix: resume from an earlier checkpoint (checkpoint.load_dir=SAVE_DIR/iter_NNNNNNN, or "
                          "write its name into SAVE_DIR/latest), or restore the files from a copy")


def size_problems(ckpt_dir: str) -> List[str]:
    """Files missing or of the wrong size: against the manifest, else against torch's checkpoint index."""
    manifest = read_manifest(ckpt_dir)
    problems = []
    if manifest is not None:
        for name, entry in manifest.items():
            path = os.path.join(ckpt_dir, name)
            if not os.path.isfile(path):
                problems.append(f"{name} is missing")
            elif os.path.getsize(path) != entry.get("size"):
                problems.append(f"{name} has {os.path.getsize(path)} bytes, the manifest records {entry.get('size')}")
        return problems
    return _index_size_problems(ckpt_dir)


def _index_size_problems(ckpt_dir: str) -> List[str]:
    """Without a manifest: every byte range torch's ``.metadata`` places in a file must lie inside it."""
    if not os.path.isfile(os.path.join(ckpt_dir, ".metadata")):
        return []  # not a torch_dist checkpoint: megatron reports what it needs
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(ckpt_dir).read_metadata()
    except Exception as e:  # a truncated or overwritten index
        return [f".metadata is unreadable ({type(e).__name__})"]
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) < end:
            problems.append(f"{name} is truncated ({os.path.getsize(path)} bytes, data reaches byte {end})")
    return problems


def checksum_problems(ckpt_dir: str, names: Optional[Iterable[str]] = None) -> List[str]:
    """Files (all listed, or ``names``) whose CRC-32 differs from the manifest's."""
    manifest = read_manifest(ckpt_dir) or {}
    problems = []
    for name in (sorted(manifest) if names is None else names):
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path) and crc32_file(path) != manifest[name].get("crc32"):
            problems.append(f"{name} does not match its checksum in {MANIFEST_FILE} (corrupted)")
    return problems


def verify_checkpoint(ckpt_dir: str, checksums: bool = True) -> None:
    """Raise :class:`CheckpointError` naming every damaged file of ``ckpt_dir`` (sizes; CRC-32s when asked)."""
    problems = size_problems(ckpt_dir)
    if not problems and checksums:
        problems = checksum_problems(ckpt_dir)
    if problems:
        _fail(ckpt_dir, problems)


def raise_damaged(ckpt_dir: str, problems: Sequence[str]) -> None:
    if problems:
        _fail(ckpt_dir, problems)
