"""Progress of every step that can take more than a few seconds.

On a terminal, a tqdm bar. Anywhere else (a log, a pipe, CI) bars would be noise, yet a step that
says nothing for minutes looks hung: there a status line goes to stderr every ``STATUS_EVERY``
seconds while the step runs (none for a step that ends sooner), and one when it ends. A heartbeat
thread writes them, so a step whose single unit takes minutes (a k-means, a PCA) is not silent
either. ``CONVLAD_STATUS_EVERY`` sets the interval (seconds).
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager

from tqdm.auto import tqdm


def status_every() -> float:
    try:
        return max(0.05, float(os.environ.get("CONVLAD_STATUS_EVERY", 30)))
    except ValueError:
        return 30.0


def _elapsed(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Heartbeat:
    """Calls ``beat`` every ``every`` seconds on a daemon thread until ``stop``."""

    def __init__(self, every: float, beat):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every, beat), daemon=True,
                                        name="convlad-progress")
        self._thread.start()

    def _run(self, every, beat):
        while not self._stop.wait(every):
            beat()

    def stop(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


class StatusLines:
    """tqdm's small surface (``update``, ``close``, ``n``, ``total``, ``set_postfix_str``, a context
    manager) as status lines on a non-terminal stream."""

    def __init__(self, total=None, desc: str = "", unit: str = "it", file=None, every: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc or "working", unit, 0
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self.t0 = time.monotonic()
        self.spoke = False
        self._lock = threading.Lock()
        self._closed = False
        self._beat = _Heartbeat(every if every is not None else status_every(), self._line)

    def _line(self, done: bool = False):
        with self._lock:
            if self._closed and not done:
                return
            count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            if self.total is None and not self.n:
                count = ""
            state = "done" if done else "running"
            extra = f", {self.postfix}" if self.postfix else ""
            what = f" {count} {self.unit}" if count else ""
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total and not done else ""
            try:
                print(f"{self.desc}: {state}{what}{pct}, {_elapsed(time.monotonic() - self.t0)}{extra}",
                      file=self.file, flush=True)
            except ValueError:  # the stream was closed under us (interpreter exit)
                return
            self.spoke = True

    def update(self, n: int = 1):
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True):
        self.postfix = s

    def refresh(self):
        pass

    def close(self):
        if self._closed:
            return
        self._beat.stop()
        if self.spoke:  # a step that never spoke ends quietly too
            self._line(done=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _TerminalBar(tqdm):
    """A tqdm bar whose clock moves while one unit of work takes long."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._beat = _Heartbeat(1.0, self._tick) if not self.disable else None

    def _tick(self):
        try:
            self.refresh()
        except Exception:  # the bar is closing on the main thread
            pass

    def close(self):
        if getattr(self, "_beat", None) is not None:
            self._beat.stop()
            self._beat = None
        super().close()


def _on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def bar(total=None, desc: str = "", unit: str = "img", enabled: bool = True, leave: bool = False, **kw):
    """A progress bar for ``total`` units (None: a step of unknown length): tqdm on a terminal,
    status lines elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if _on_terminal(sys.stderr):
        if _width(sys.stderr) == 0:  # a pseudo-terminal nobody sized (0×0): tqdm would draw nothing at all
            size = shutil.get_terminal_size()
            kw.setdefault("ncols", size.columns)
            kw.setdefault("nrows", size.lines)
        return _TerminalBar(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, **kw)
    return StatusLines(total, desc, unit, sys.stderr)


@contextmanager
def step(desc: str, enabled: bool = True):
    """A step with no count (a k-means, a PCA): its elapsed time on a terminal, status lines
    elsewhere."""
    terminal = {"bar_format": "{desc}: {elapsed}"} if _on_terminal(sys.stderr) else {}
    b = bar(None, desc, "", enabled, **terminal)
    try:
        yield b
    finally:
        b.close()


def write(msg: str):
    """A line on stderr that does not tear through a bar."""
    tqdm.write(msg, file=sys.stderr)


__all__ = ["StatusLines", "bar", "status_every", "step", "write"]
