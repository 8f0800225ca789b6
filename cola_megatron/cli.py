"""The one command-line wrapper every console script runs under.

A user error (:class:`~cola_megatron.errors.ColaError`, an unreadable file, a bad argument) prints
``prog: error: <one line naming the fix>`` on stderr and exits with the error's code (2; 1 for a run stopped on
purpose), never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from cola_megatron.errors import ColaError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: <message> (see prog --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_command(prog: str, body: Callable[[Optional[Sequence[str]]], int],
                argv: Optional[Sequence[str]] = None) -> int:
    """Run ``body(argv)`` and turn user errors into ``prog: error: ...`` and an exit code."""
    from cola_megatron.compat import quiet_megatron_notices

    quiet_megatron_notices()
    try:
        return body(argv) or 0
    except ColaError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 130
