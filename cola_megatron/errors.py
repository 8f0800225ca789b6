"""The project's one error hierarchy. Every user-facing failure is a :class:`ColaError` whose message names the
problem and the fix; the command-line wrapper (:mod:`cola_megatron.cli`) prints it as one line and exits 2."""

from __future__ import annotations


class ColaError(Exception):
    """Bad input or a state the user can fix; the message says how. Raised before heavy work where possible."""

    exit_code = 2


class ConfigError(ColaError, ValueError):
    """A config key or value that cannot be used; names the key and the fix."""


class DataError(ColaError, ValueError):
    """Bad data input: the message names the file or setting at fault and how to fix it."""


class CheckpointError(ColaError):
    """A checkpoint that cannot be used as asked; the message names the fix. Nothing on disk is touched."""


class ConversionError(ColaError, ValueError):
    """Input a checkpoint conversion cannot use; the message names the problem and the fix."""


class TrainingStopped(ColaError):
    """A run stopped on purpose (e.g. too many non-finite steps) with a message; exit code 1."""

    exit_code = 1
