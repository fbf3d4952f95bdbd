"""Showing a deploy's progress while the caller waits for it.

``Watch(fetch, apps, display)`` is a context manager: inside it a daemon thread fetches the
status report every ``interval_s`` and hands ``_progress.render``'s line to ``display``; on exit
(success, error or Ctrl-C alike) it stops and the display is closed before ``__exit__`` returns,
so nothing is written after that. The thread only reads: a failed fetch or write is logged at
debug level and skipped, and the caller's wait never waits for the thread.

Two displays (``display_for`` picks one for a stream):

- ``TerminalLine``: one line rewritten in place (carriage return, erase to the end of the
  line), cut to the terminal's width so that it never wraps; erased on close.
- ``PlainLines``: output that is not a terminal gets a complete line per change (``Line.key``),
  none in the first ``quiet_s`` (a quick deploy says nothing), and the same line again every
  ``repeat_s`` while nothing changes (a log then shows that a slow constructor still runs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, TextIO

from shoal.serve._progress import Line, render

logger = logging.getLogger("shoal.serve")

POLL_INTERVAL_S = 0.5
PLAIN_QUIET_S = 2.0
PLAIN_REPEAT_S = 30.0
_ERASE_TO_END = "\x1b[K"
_FALLBACK_COLUMNS = 80

Emit = Callable[[str, float], None]  # (text, seconds since the deploy started)


class Display(Protocol):
    def show(self, line: Line, elapsed_s: float) -> None: ...
    def close(self) -> None: ...


class TerminalLine:
    """One progress line on a terminal, rewritten in place."""

    def __init__(self, stream: TextIO, width: Callable[[], int] | None = None) -> None:
        self._stream = stream
        self._width = width or (lambda: _terminal_width(stream))
        self._shown = False

    def show(self, line: Line, elapsed_s: float) -> None:
        text = fit(line.text, self._width() - 1)  # the last column would wrap on some terminals
        if not text and not self._shown:
            return
        self._stream.write("\r" + text + _ERASE_TO_END)
        self._stream.flush()
        self._shown = bool(text)

    def close(self) -> None:
        if self._shown:
            self._stream.write("\r" + _ERASE_TO_END)
            self._stream.flush()
            self._shown = False


class PlainLines:
    """Progress as complete lines, one per change, for output that is not a terminal."""

    def __init__(self, emit: Emit, quiet_s: float = PLAIN_QUIET_S, repeat_s: float = PLAIN_REPEAT_S) -> None:
        self._emit = emit
        self._quiet_s = quiet_s
        self._repeat_s = repeat_s
        self._key: str | None = None
        self._said_at_s = 0.0

    def show(self, line: Line, elapsed_s: float) -> None:
        if not line.text or elapsed_s < self._quiet_s:
            return
        if line.key != self._key or elapsed_s - self._said_at_s >= self._repeat_s:
            self._emit(line.text, elapsed_s)
            self._key = line.key
            self._said_at_s = elapsed_s

    def close(self) -> None:
        pass


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in "..." when it was cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 3)] + "..." if width >= 3 else text[:max(0, width)]


def is_terminal(stream: TextIO) -> bool:
    """True if ``stream`` is a terminal that understands carriage return and erase-line."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def display_for(stream: TextIO, plain: Emit | None) -> Display | None:
    """A ``TerminalLine`` on ``stream`` if it is a terminal; else ``PlainLines`` through
    ``plain``, or None (show nothing) without it."""
    if is_terminal(stream):
        return TerminalLine(stream)
    return PlainLines(plain) if plain is not None else None


def _terminal_width(stream: TextIO) -> int:
    """The terminal's columns; 80 when it does not say (a pseudo-terminal's size may be 0)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns or _FALLBACK_COLUMNS


class Watch:
    """Shows the progress of deploying ``apps`` on ``display`` while the ``with`` body runs.

    ``fetch()`` returns the status report (``controller.status.render_status``'s dict);
    ``clock()`` is wall-clock seconds, as the report's replica start times are.
    """

    def __init__(
        self,
        fetch: Callable[[], Mapping[str, Any]],
        apps: Sequence[str],
        display: Display | None,
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self._fetch = fetch
        self._apps = list(apps)
        self._display = display
        self._clock = clock
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while writing, so close() never interleaves a write
        self._thread: threading.Thread | None = None
        self._started_s = 0.0

    def __enter__(self) -> Watch:
        self._started_s = self._clock()
        if self._display is not None:
            self._thread = threading.Thread(target=self._run, name="shoal-deploy-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop showing and close the display (erasing a terminal line); nothing is written after."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            if self._display is not None:
                try:
                    self._display.close()
                except Exception:
                    logger.debug("closing the progress display failed", exc_info=True)

    def _run(self) -> None:
        assert self._display is not None
        while not self._stop.wait(self._interval_s):
            try:
                status = self._fetch()
                now_s = self._clock()
                line = render(status, self._apps, self._started_s, now_s)
            except Exception:  # no answer this time (or one it cannot read): try again
                logger.debug("the progress line could not fetch or read the status", exc_info=True)
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._display.show(line, now_s - self._started_s)
                except Exception:  # e.g. the stream was closed: stop showing, keep deploying
                    logger.debug("the progress line could not be written", exc_info=True)
                    return
