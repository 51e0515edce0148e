"""Progress bars for commands that read or write much: tqdm on stderr, only on a terminal.

A :class:`Bar` is the ``progress(done, total)`` callable the library's long operations take (verify,
convert, consolidate, average, diff). It shows nothing until it learns the total, then only when the
total passes ``THRESHOLD_BYTES`` (or ``always``), and never when the stream is not a terminal (logs and
pipes stay clean), unless ``always`` asks for it.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm  # type: ignore[import-untyped]

THRESHOLD_BYTES = 100 * 1024 * 1024


class Bar:
    def __init__(self, label: str, *, always: bool = False, stream: TextIO | None = None) -> None:
        self.label = label
        self.always = always
        self.stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._off = False

    def __call__(self, done: int, total: int) -> None:
        if self._off:
            return
        if self._bar is None:
            shown = self.always or (total >= THRESHOLD_BYTES and self.stream.isatty())
            if not shown:
                self._off = True
                return
            self._bar = tqdm(total=total, desc=self.label, unit="B", unit_scale=True, file=self.stream, leave=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
