"""Files shipped inside the package (configs, launch templates), found the same way in a checkout and in an
installed wheel. The checkout's top-level ``configs/`` and ``launch/`` are links to these folders."""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional


def package_dir(*parts: str) -> str:
    """A folder or file of the installed package (packages are installed as plain files, never zipped)."""
    return os.path.join(str(resources.files("cola_megatron")), *parts)


def shipped_config(path: str) -> Optional[str]:
    """The shipped config a relative ``path`` names (``cola/llama_1b.yaml`` or ``configs/cola/llama_1b.yaml``),
    or None."""
    if os.path.isabs(path):
        return None
    relative = os.path.normpath(path)
    if relative.split(os.sep)[0] == "configs":
        relative = os.path.relpath(relative, "configs")
    candidate = package_dir("configs", relative)
    return candidate if os.path.isfile(candidate) else None


def launch_template(folder: str, name: str) -> str:
    return package_dir("launch", folder, name)
