"""Checkpoints: the files of a save_dir (:mod:`.paths`), what a checkpoint holds (:mod:`.state`), and the manager
that saves and restores a run's parts (:mod:`.manager`)."""

from cola_megatron.errors import CheckpointError
from cola_megatron.training.checkpoint.manager import (
    FORMAT_VERSION,
    CheckpointManager,
    ResumePoint,
    check_same_model,
    model_mismatches,
    plan_resume,
    schedule_differences,
)
from cola_megatron.training.checkpoint.manifest import MANIFEST_FILE, verify_checkpoint
from cola_megatron.training.checkpoint.paths import (
    CONFIG_FILE,
    LATEST_FILE,
    checkpoint_iteration,
    checkpoint_name,
    complete_checkpoints,
    is_complete_checkpoint,
    latest_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
    write_config,
    write_latest,
)
from cola_megatron.training.checkpoint.state import load_model_weights, model_sharded_state_dict

__all__ = [
    "CONFIG_FILE", "FORMAT_VERSION", "LATEST_FILE", "MANIFEST_FILE", "CheckpointError", "CheckpointManager", "ResumePoint", "check_same_model",
    "checkpoint_iteration", "checkpoint_name", "complete_checkpoints", "is_complete_checkpoint",
    "latest_checkpoint", "load_model_weights", "model_mismatches", "model_sharded_state_dict", "plan_resume",
    "read_checkpoint_config", "resolve_checkpoint", "schedule_differences", "verify_checkpoint", "write_config", "write_latest",
]
