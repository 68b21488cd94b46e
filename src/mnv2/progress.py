"""Progress of long loops: a tqdm bar on a terminal, plain lines anywhere else.

tqdm redraws its bar with a carriage return several times a second; written to a file (`> train.log`, a CI log) every
redraw stays in it, hundreds per epoch. When the stream is not a terminal, `progress_bar` prints one line when the loop
ends and, for a long loop, one every `every` seconds while it runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

PLAIN_EVERY = 30.0  # seconds between the plain lines of a long loop


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, initial: int = 0,
             enabled: bool = True, leave: bool = False, file=None, every: float = PLAIN_EVERY):
    """Wrap `iterable` (or count `update()` calls up to `total`) like `tqdm(...)`; `enabled=False` shows nothing.

    The result has the part of tqdm's interface the loops use: iteration, `update`, `set_postfix`, `close`."""
    file = sys.stderr if file is None else file
    if enabled and _is_terminal(file):
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, file=file, dynamic_ncols=True)
    return PlainProgress(iterable, desc=desc, total=total, initial=initial, enabled=enabled, file=file, every=every)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class PlainProgress:
    """tqdm's counting without its bar: a line such as `epoch 3/50: 120/120 in 41 s, loss 0.213` on `close()` (the
    end of iteration closes it) and at most one every `every` seconds before that."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, initial: int, enabled: bool, file,
                 every: float):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.n = iterable, desc, total, initial
        self.enabled, self.file, self.every = enabled, file, every
        self.postfix: dict[str, object] = {}
        self.start = self.last = time.monotonic()
        self.closed = False
        self.printed: int | None = None

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self._print(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.enabled and self.printed != self.n:  # the last update may have printed this very line
                self._print(time.monotonic())

    def _print(self, now: float) -> None:
        self.last, self.printed = now, self.n
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
        print(f"{self.desc}: {count} in {self.last - self.start:.0f} s{extra}", file=self.file, flush=True)
