"""The files of a ``save_dir``: checkpoint names, completeness, the atomic ``latest`` pointer, the saved config,
and retention. Nothing here imports megatron-core."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable, Iterable, List, Optional

import yaml

from cola_megatron.config import Config, config_from_dict
from cola_megatron.errors import CheckpointError, ConfigError

CONFIG_FILE = "cola_config.yaml"
LATEST_FILE = "latest"
_NAME = re.compile(r"^iter_(\d{7})$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_iteration(path: str) -> int:
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise CheckpointError(f"{path!r} is not a checkpoint directory name (expected iter_NNNNNNN)")
    return int(match.group(1))


def is_complete_checkpoint(path: str) -> bool:
    """metadata.json is megatron's last write after all ranks; cola_config.yaml is ours, written after it."""
    return os.path.isfile(os.path.join(path, "metadata.json")) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def complete_checkpoints(save_dir: str) -> List[str]:
    """Names of the complete checkpoints in ``save_dir``, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    names = [n for n in os.listdir(save_dir) if _NAME.match(n) and is_complete_checkpoint(os.path.join(save_dir, n))]
    return sorted(names)


def latest_checkpoint(save_dir: str) -> Optional[str]:
    """The checkpoint ``save_dir/latest`` names, or None when there is no ``latest`` file.

    A ``latest`` that names no complete checkpoint raises :class:`CheckpointError` (never silently start over:
    a later save would bury the checkpoints that are there)."""
    pointer = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, "rb") as f:
        raw = f.read(256)
    name = raw.decode("utf-8", errors="replace").strip()
    path = os.path.join(save_dir, name)
    if not _NAME.match(name) or not is_complete_checkpoint(path):
        available = complete_checkpoints(save_dir)
        fix = (f"write the name of a complete checkpoint into it (e.g. `echo {available[-1]} > {pointer}`; "
               f"complete ones: {', '.join(available)})" if available
               else "delete it if the directory holds no checkpoint you need")
        raise CheckpointError(f"{pointer} names {name[:80]!r}, which is not a complete checkpoint directory. "
                              f"Fix: {fix}, or set checkpoint.load_dir to an iter_NNNNNNN directory")
    return path


def _file_mode() -> int:
    """The mode an ordinary new file gets (0644 under the usual umask); mkstemp would leave 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temp_files(save_dir: str) -> None:
    """``.latest.*`` files are left by a process killed between writing and renaming; only one writer (rank 0 of
    one run) touches a save_dir, so any that exist now are stale."""
    for name in os.listdir(save_dir):
        if name.startswith(".latest."):
            try:
                os.unlink(os.path.join(save_dir, name))
            except FileNotFoundError:
                pass


def write_latest(save_dir: str, name: str, before_replace: Callable[[], None] = lambda: None) -> None:
    """Replace ``latest`` atomically: a reader sees the old name or the new one, never a partial file."""
    remove_stale_temp_files(save_dir)
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=save_dir)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), _file_mode())
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        before_replace()
        os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_config(ckpt_dir: str, cfg: Config) -> None:
    tmp = os.path.join(ckpt_dir, f".{CONFIG_FILE}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, os.path.join(ckpt_dir, CONFIG_FILE))


def read_checkpoint_config(ckpt_dir: str) -> Config:
    """The config a checkpoint was saved with (its ``cola_config.yaml``); ``ckpt_dir`` may also be a save_dir
    (its ``latest`` checkpoint is read)."""
    if os.path.isdir(ckpt_dir) and not os.path.isfile(os.path.join(ckpt_dir, CONFIG_FILE)):
        ckpt_dir = latest_checkpoint(ckpt_dir) or ckpt_dir
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} has no {CONFIG_FILE}: it is not a complete cola-megatron checkpoint. "
                              "Fix: point at an iter_NNNNNNN directory that `latest` names")
    with open(path) as f:
        values = yaml.safe_load(f)
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"{path} is not a valid config ({e}). Fix: restore the file from the run's config")


def resolve_checkpoint(path: str) -> str:
    """``path`` is a checkpoint directory, or a directory whose ``latest`` names one."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist. Fix: give a save_dir holding a `latest` "
                              "file or an iter_NNNNNNN directory")
    if is_complete_checkpoint(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path!r} holds no checkpoint (no `latest` file, no metadata.json). Fix: give a "
                              "save_dir holding a `latest` file or an iter_NNNNNNN directory")
    return found


def clear_target(path: str) -> Optional[str]:
    """Make room for a new checkpoint at ``path``. An incomplete directory is a leftover of an interrupted save
    (`latest` never named it) and goes; a complete one (a run resumed from an older checkpoint and reached this
    iteration again) is kept under another name, since nothing saved may be lost. Returns that name."""
    if not os.path.exists(path):
        return None
    if not is_complete_checkpoint(path):
        shutil.rmtree(path)
        return None
    n = 1
    while os.path.exists(f"{path}.replaced-{n}"):
        n += 1
    os.rename(path, f"{path}.replaced-{n}")
    return f"{os.path.basename(path)}.replaced-{n}"


_REPLACED = re.compile(r"^(iter_\d{7})\.replaced-\d+$")


def apply_retention(save_dir: str, newest: str, keep: Optional[int], protected: Iterable[str] = ()) -> None:
    """Keep the newest ``keep`` complete checkpoints up to ``newest`` (and always those in ``protected``); a null
    ``keep`` keeps them all.

    ``iter_N.replaced-K`` directories (checkpoints a re-run superseded, see :func:`clear_target`) go once the
    re-run committed a checkpoint past them, whatever ``keep`` is."""
    newest_it = checkpoint_iteration(newest)
    protected = {newest, *protected}
    older = [n for n in complete_checkpoints(save_dir) if checkpoint_iteration(n) <= newest_it]
    for name in older[:-keep] if keep and len(older) > keep else []:
        if name not in protected:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    for name in os.listdir(save_dir):
        match = _REPLACED.match(name)
        if match and checkpoint_iteration(match.group(1)) < newest_it:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
