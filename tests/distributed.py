"""Tests launch gloo process groups through the package's local launcher."""

from cola_megatron.analysis.local_launch import run_distributed  # noqa: F401
