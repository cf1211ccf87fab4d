"""Run a server process (``mlflow server`` for ``kd ui``) that stops when its parent does.

``mlflow server`` forks workers (uvicorn/gunicorn); killing only the process we started
leaves them serving the port. So the server gets its own session (its own process group,
and no Ctrl-C from the terminal's group: we decide when it stops), and whatever ends the
parent (SIGTERM, SIGINT, SIGHUP, an exception, a normal exit) stops the whole group:
SIGTERM first, SIGKILL after a grace period. A SIGKILL, which no handler can catch, is
answered by a watcher (:func:`kd.reaper.watch_group`) that stops the whole group the same
way: the server's own ``PR_SET_PDEATHSIG`` (kept, on Linux) reaches only the server, and
the job runner's huey consumers it forks outlived it by half a minute.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from kd import reaper

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop(Exception):
    """Raised in the main thread by a stop signal's handler."""


class ServerExited(RuntimeError):
    """The server ended on its own, before anything told it to stop: it no longer serves,
    whatever its exit status (``mlflow server`` exits 0 when uvicorn cannot bind its port)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the server exited on its own (status {status})")
        self.status = status


def cannot_listen(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now (``"[Errno 98] Address already in
    use"``), or None when it can: a bind, released at once, with SO_REUSEADDR as servers set it
    (so a port in TIME_WAIT is free and one with a listener is not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
    return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (cannot be ours, but alive)
        return True
    return True


def _wait_gone(proc: subprocess.Popen, pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the leader, else its zombie keeps the group "alive"
        if not _group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, SIGKILL what is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session made it the group's leader
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if _wait_gone(proc, pgid, wait_s):
            break
    proc.poll()


def serve(cmd: Sequence[str], *, env: Mapping[str, str] | None = None) -> int:
    """Run ``cmd`` in its own session until it exits or this process is told to stop.

    Returns 0 when a signal (or Ctrl-C) stopped it: being stopped is how a server is meant
    to end. Raises :class:`ServerExited` when it ends on its own. The server's group is gone
    when this returns or raises.
    """
    def _raise(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    proc: subprocess.Popen | None = None
    watcher: subprocess.Popen | None = None
    previous = {sig: signal.signal(sig, _raise) for sig in _STOP_SIGNALS}  # before the start: no gap
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, start_new_session=True,
                                preexec_fn=_die_with_parent)
        watcher = reaper.watch_group(proc.pid)  # start_new_session: the server leads its group
        status = proc.wait()
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        if proc is not None:
            stop_group(proc)
        if watcher is not None:
            reaper.release(watcher)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise ServerExited(status)
