"""The progress bar of a conversion: bytes written (with tqdm's rate and ETA) and tensors done, on stderr.

Quiet with ``--no-progress`` and whenever stderr is not a terminal (logs, pipes, tests).
"""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total_bytes: int, tensors: int, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.tensors, self.done = tensors, 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                        dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))

    def __call__(self, nbytes: int) -> None:
        """One tensor of ``nbytes`` done."""
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def show(self, done_bytes: int, total_bytes: int, phase: str) -> None:
        """Where work done elsewhere (other processes) stands."""
        self.bar.total = max(total_bytes, done_bytes)
        self.bar.set_postfix_str(phase, refresh=False)
        self.bar.update(done_bytes - self.bar.n)

    def close(self) -> None:
        self.bar.close()
