"""Progress of long load work (reading, dequantizing, uploading weights, capturing CUDA graphs).

    with progress("dequantizing model.gguf", total=len(tensors)) as bar:
        for t in tensors:
            ...
            bar.update()

Loading a model can take tens of seconds with nothing to show for it, so each long phase reports its steps here.
A bar is drawn (click's, on stderr) only when it helps: stderr is a terminal, and the phase has already taken
more than DELAY_S seconds and is not finished (a timer draws it when one long step is still running then). Short
phases, pipes, log files and tests see no bar at all. The phase is always logged (INFO when it starts, DEBUG with
its duration when it ends), so `-v` shows what is being done even without a terminal.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

logger = logging.getLogger(__name__)

DELAY_S = 1.0  # a phase shorter than this never shows a bar
_now = time.monotonic  # the clock (tests replace it)


class Progress:
    """The steps done so far of one phase; draws its bar once the phase has run long enough (see the module).

    The bar appears at the first update past DELAY_S, or from a timer at DELAY_S when a single step is still
    running then (reading a GGUF file's metadata is one call of several seconds); a lock keeps the timer's thread
    and the caller's from drawing at once."""

    def __init__(self, label: str, total: int, stream: TextIO):
        self.label, self.total, self.done = label, max(int(total), 0), 0
        self._stream = stream
        self._start = _now()
        self._bar: Any = None  # click's ProgressBar, once shown
        self._closed = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if _isatty(stream):
            self._timer = threading.Timer(DELAY_S, self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def update(self, n: int = 1) -> None:
        """Record `n` more steps done."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.done < self.total and _now() - self._start >= DELAY_S and _isatty(self._stream):
                self._show()

    def _on_timer(self) -> None:
        with self._lock:
            if not self._closed and self._bar is None and self.done < self.total:
                self._show()

    def _show(self) -> None:
        """Start drawing the bar, at the steps already done (the lock is held)."""
        import click

        self._bar = click.progressbar(length=self.total, label=self.label, file=self._stream, show_pos=True,
                                      show_eta=True)
        self._bar.__enter__()
        if self.done:
            self._bar.update(self.done)

    def close(self) -> None:
        """Stop the timer and end the bar's line (so that what follows, a traceback included, starts on a line
        of its own)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._closed = True
            if self._bar is not None:
                self._bar.__exit__(None, None, None)

    @property
    def shown(self) -> bool:
        """Whether a bar has been drawn (tests)."""
        return self._bar is not None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextmanager
def progress(label: str, total: int) -> Iterator[Progress]:
    """A Progress for a phase of `total` steps named `label` (e.g. "reading model.safetensors"): call
    `.update(n=1)` as steps finish. Shows a bar on stderr when stderr is a terminal and the phase has taken more
    than DELAY_S seconds so far; otherwise it only logs."""
    logger.info("%s (%d steps)", label, total)
    bar = Progress(label, total, sys.stderr)  # sys.stderr looked up now: pytest and the CLI may replace it
    try:
        yield bar
    finally:
        bar.close()
        logger.debug("%s: %d/%d steps in %.1fs", label, bar.done, bar.total, _now() - bar._start)
