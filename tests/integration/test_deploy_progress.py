"""Progress while deploying, as a user sees it: ``shoal run`` on a pseudo-terminal rewrites one
line in place and names the constructor it waits on; with its output piped it prints plain
lines; ``serve.run`` in a script says it through the ``shoal.serve`` logger.

The app's constructor waits on a FIFO the test opens (``cli_apps/gated_app.py``): the progress
line is read while the deploy really waits, then the gate is released and the serving line
follows. No sleeps: the tests wait for output (a condition on what the reader threads saw) and
for the FIFO to have a reader (``wait_until``, OS state)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from helpers import wait_until

pytestmark = pytest.mark.timeout(90)

CLI_APPS = Path(__file__).resolve().parent / "cli_apps"
SHOAL = str(Path(sys.executable).with_name("shoal"))
CONSTRUCTOR = "constructor of Model still running"


class Output:
    """Everything a child wrote to one file descriptor, read by a thread; tests wait on it."""

    def __init__(self, read: IO[bytes] | int) -> None:
        self._read = read
        self._data = bytearray()
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._read, 4096) if isinstance(self._read, int) else self._read.read1(4096)
            except OSError:  # a pty's master reads EIO once the last slave closed
                chunk = b""
            with self._changed:
                if not chunk:
                    self._ended = True
                    self._changed.notify_all()
                    if not isinstance(self._read, int):
                        self._read.close()
                    return
                self._data.extend(chunk)
                self._changed.notify_all()

    def join(self) -> None:
        """Wait until the writer closed its end (the process and its children exited)."""
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the output was not closed"

    @property
    def text(self) -> str:
        with self._changed:
            return self._data.decode(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        """The first match of ``pattern`` in the output; AssertionError if none comes in time."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self._data.decode(errors="replace"))
            if match:
                found.append(match)
            return bool(match) or self._ended

        with self._changed:
            self._changed.wait_for(seen, timeout=timeout_s)
        assert found, f"{pattern!r} did not appear within {timeout_s}s in:\n{self.text!r}"
        return found[0]


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A FIFO the gated constructor reads; opened at the end in any case, so no replica is left
    waiting on it."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    yield path
    _release(path, wait_s=0)


def _release(gate: Path, wait_s: float = 30) -> None:
    """Open ``gate`` for writing once its reader (the constructor) has it open, and close it:
    the constructor's read returns."""

    def open_writer() -> int | None:
        try:
            return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: nobody has it open for reading yet
            if exc.errno != errno.ENXIO:
                raise
            return None

    fd = open_writer() if wait_s == 0 else wait_until(open_writer, wait_s, "the constructor opens its gate")
    if fd is not None:
        os.close(fd)


def _env(run_dir: Path) -> dict[str, str]:
    env = {**os.environ, "SHOAL_RUN_DIR": str(run_dir), "PYTHONDONTWRITEBYTECODE": "1", "TERM": "xterm"}
    env.pop("SHOAL_ADDRESS", None)
    return env


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """Ctrl-C to ``shoal run``'s process group; its exit code."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(60)


@contextlib.contextmanager
def _run_on_a_terminal(run_dir: Path, gate: Path, columns: int = 0) -> Iterator[tuple[subprocess.Popen[bytes], Output]]:
    """``shoal run`` of the gated app with a pseudo-terminal as its stdout and stderr
    (``columns`` 0: the terminal reports no size); killed if the test leaves it running."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(
        [SHOAL, "run", "gated_app:app", f"gate={gate}", "--port", "0"], cwd=CLI_APPS, env=_env(run_dir),
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True,
    )
    os.close(slave)
    try:
        yield proc, Output(master)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_shoal_run_on_a_terminal_rewrites_one_line_naming_the_constructor(private_run_dir: Path, gate: Path) -> None:
    with _run_on_a_terminal(private_run_dir, gate, columns=200) as (proc, out):
        # The line is rewritten in place (carriage return ... erase to the end) while Model's
        # constructor waits, and names it.
        line = out.wait_for(r"\r(deploying 'default' \(\d+ s\): [^\r\n]*)\x1b\[K")
        assert line.group(1).startswith("deploying 'default' ("), out.text
        out.wait_for(rf"\rdeploying 'default': Model 0/1 up; {CONSTRUCTOR} \(\d+ s\)\x1b\[K")
        _release(gate)
        # The line is erased before the serving line; nothing of it ends up on its own line.
        out.wait_for(r"\r\x1b\[Kshoal: serving 'default' at / on http://\S+ \(Ctrl-C stops\)")
        assert "\ndeploying" not in out.text and "\r\ndeploying" not in out.text, out.text
        assert _stop(proc) == 0, out.text
    assert "Traceback" not in out.text, out.text


def test_ctrl_c_while_the_line_shows_erases_it_and_stops(private_run_dir: Path, gate: Path) -> None:
    with _run_on_a_terminal(private_run_dir, gate) as (proc, out):  # 0 columns: the line is cut to 80
        out.wait_for(rf"{CONSTRUCTOR} \(\d+ s\)\x1b\[K")
        assert _stop(proc) == 130, out.text
    assert "\r\x1b[Kshoal: interrupted while deploying; stopping" in out.text, out.text
    assert "Traceback" not in out.text, out.text
    # (the private_run_dir fixture fails the test if any process of the instance is left)


def test_shoal_run_off_a_terminal_prints_plain_lines(private_run_dir: Path, gate: Path) -> None:
    proc = subprocess.Popen(
        [SHOAL, "run", "gated_app:app", f"gate={gate}", "--port", "0"], cwd=CLI_APPS, env=_env(private_run_dir),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = Output(proc.stdout), Output(proc.stderr)
    try:
        stderr.wait_for(rf"(?m)^shoal: deploying 'default': Model 0/1 up; {CONSTRUCTOR} \(\d+ s\)\n")
        _release(gate)
        stdout.wait_for(r"(?m)^shoal: serving 'default' at / on http://\S+ \(Ctrl-C stops\)")
        assert _stop(proc) == 0, stderr.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stdout.join()
        stderr.join()
    progress = [line for line in stderr.text.splitlines() if "deploying" in line]
    assert progress and all(line.startswith("shoal: deploying 'default'") for line in progress), stderr.text
    assert len(progress) == len({re.sub(r"\d+ s", "", line) for line in progress})  # one per change
    assert "\r" not in stderr.text and "\x1b" not in stderr.text, stderr.text
    assert not stdout.text.startswith("shoal: deploying"), stdout.text  # progress goes to stderr


def test_serve_run_in_a_script_logs_progress_and_ready(private_run_dir: Path, gate: Path) -> None:
    """Off a terminal, serve.run says its progress (and Ray's "is ready" line) at INFO through
    the ``shoal.serve`` logger: a script that shows INFO sees them, others see nothing."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        sys.path.insert(0, {str(CLI_APPS)!r})
        from shoal import serve
        import gated_app
        serve.start(http_options={{"port": 0, "metrics_port": 0}})
        serve.run(gated_app.app({{"gate": {str(gate)!r}}}), route_prefix="/g")
        print("deployed", flush=True)
        serve.shutdown()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=private_run_dir, env=_env(private_run_dir),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = Output(proc.stdout), Output(proc.stderr)
    try:
        stderr.wait_for(rf"INFO shoal.serve deploying 'default': Model 0/1 up; {CONSTRUCTOR}")
        _release(gate)
        stdout.wait_for("deployed")
        assert proc.wait(60) == 0, stderr.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stdout.join()
        stderr.join()
    assert re.search(r"INFO shoal.serve Application 'default' is ready at http://\S+/g\.", stderr.text), stderr.text
