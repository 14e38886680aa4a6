"""Plumbing shared by the store's helper processes (segment holder, transfer peer).

A child announces itself with one JSON line on stdout and lives until its parent closes its stdin
(or the parent dies, which closes it too): no orphan keeps memory or ports after a test crashes.
"""

from __future__ import annotations

import subprocess
import sys
import threading


def read_first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's first stdout line, or ``""`` if it printed none within ``timeout`` (or exited).

    Read on a thread so a child that hangs before printing cannot hang the parent.
    """
    line: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        line.append(proc.stdout.readline())
        ready.set()

    threading.Thread(target=read, daemon=True, name="child-first-line").start()
    return line[0] if ready.wait(timeout) else ""


def set_when_stdin_closes(event: threading.Event) -> None:
    """Set ``event`` once stdin reaches EOF: the parent is gone or asked us to stop."""

    def watch() -> None:
        try:
            while sys.stdin.read(1 << 16):
                pass
        except (OSError, ValueError):
            pass
        event.set()

    threading.Thread(target=watch, daemon=True, name="stdin-watch").start()
