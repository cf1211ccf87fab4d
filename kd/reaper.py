"""A watcher that stops what a kd process started when that process dies, SIGKILL included.

A process can stop its children on SIGTERM, SIGINT or a normal exit, but not after a
SIGKILL; ``PR_SET_PDEATHSIG`` reaches only its direct children, not what they start. So
what must not outlive its starter gets a watcher: a small process, in a session of its
own (Ctrl-C in the terminal, a hang-up, or a signal to the starter's process group reach
the starter, not the watcher), that waits for the starter to die (EOF on the pipe held on
its stdin, or a new parent: a forked child of the starter could hold the pipe open) and
then stops its target: SIGTERM, SIGKILL after a grace period. A starter that ends its
target itself releases the watcher (:func:`release`), which then exits touching nothing.
Two kinds of target:

``group PGID`` (``kd ui``, :mod:`kd.serve`): the ``mlflow server`` runs in a session and
    process group of its own, and forks uvicorn and a job runner with huey consumers into
    it. When kd ui was SIGKILLed, the server's own SIGTERM (``PR_SET_PDEATHSIG``) ended
    the server after 16 s and left the consumers for 32 s (MLflow 3.17, measured); the
    watcher signals the whole group. A pid is not reused while it names a live process
    group, and the watcher exits as soon as the group is empty, so it never signals
    another group of the same number.

``ray-session SESSION_DIR`` (a local sweep, :mod:`kd.sweep.driver`): Ray fate-shares
    only part of a local session with the driver that started it. GCS, raylet,
    dashboard, monitor and log monitor get ``PR_SET_PDEATHSIG`` and die at once; the
    workers notice the dead raylet in about 2 s; the dashboard agent and the runtime-env
    agent (the raylet's children) notice it at once but then shut their aiohttp servers
    down gracefully for 60 s (Ray 2.60, measured after a SIGKILLed driver; Ray has no
    setting for it, and they may ignore SIGTERM meanwhile: ray-project/ray#59162).
    ``ray.shutdown()`` stops all of them, so only a killed driver is concerned. Ray's
    own answer where the kernel cannot fate-share (``ray_process_reaper.py``) kills the
    driver's whole process group after making the driver a group leader (``setpgrp``),
    which would take a sweep started from a terminal out of the terminal's foreground
    group (Ctrl-C would no longer reach it) and, in a shell pipeline, kill the
    pipeline's other commands; and the agents' parent, the raylet, dies first, so they
    are re-parented and the process tree is gone by then. So the watcher keeps the tree
    while it exists: twice a second it records the descendants of this session's Ray
    processes (the starter's children whose command line names the session's directory:
    GCS, raylet, ...) as psutil processes, pid and start time, so a reused pid is never
    signalled. Only those are touched: never a Ray cluster reached with ``--address`` (no
    watcher runs then), never another child of the driver (a test runner's servers),
    never another user's process. Not covered: a process forked in the last half second
    before the driver dies (Ray's workers end themselves within seconds of the raylet),
    and a driver killed inside ``ray.init`` (the session's directory is not known yet).

The watcher runs as a script, ``python -I reaper.py STARTER_PID KIND TARGET GRACE_S``,
with the standard library and psutil (a Ray dependency) only, without importing ``kd``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
_RELEASE = b"release\n"


def _start(kind: str, target: str, grace_s: float, log: Path | None) -> subprocess.Popen:
    cmd = [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), kind, target, str(grace_s)]
    if log is None:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def watch_group(pgid: int, grace_s: float = 5.0) -> subprocess.Popen:
    """Stop process group ``pgid`` (SIGTERM, SIGKILL after ``grace_s``) if this process dies."""
    return _start("group", str(pgid), grace_s, None)


def watch_ray_session(session_dir: str, grace_s: float = 1.0) -> subprocess.Popen:
    """Stop the local Ray session this process started in ``session_dir`` if this process dies
    (the watcher logs to ``SESSION_DIR/logs/kd_reaper.log``)."""
    return _start("ray-session", session_dir, grace_s, Path(session_dir) / "logs" / "kd_reaper.log")


def release(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """The target is stopped (or left on purpose): the watcher exits without touching it."""
    try:
        proc.stdin.write(_RELEASE)
        proc.stdin.close()
    except OSError:  # it has exited already (its target was gone)
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the watcher process ---------------------------------------------------------------


def _starter_state(starter_pid: int, got: bytearray) -> str:
    """'alive', 'released' or 'dead', after waiting up to POLL_S for word from the starter."""
    ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
    if ready:
        data = os.read(sys.stdin.fileno(), 4096)
        got += data
        if _RELEASE in got:
            return "released"
        if not data:
            return "dead"
    return "alive" if os.getppid() == starter_pid else "dead"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # not ours (cannot be the group we watch)
        return False
    return True


def _watch_group(starter_pid: int, pgid: int, grace_s: float) -> int:
    got = bytearray()
    while True:
        if not _group_alive(pgid):
            return 0  # the group ended: nothing to guard (and its number may be reused)
        state = _starter_state(starter_pid, got)
        if state == "released":
            return 0
        if state == "dead":
            break
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return 0
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _group_alive(pgid):
            break
    print(f"starter {starter_pid} died; stopped process group {pgid}", flush=True)
    return 0


def _running(p) -> bool:
    """Alive and not a zombie (``is_running`` also compares the start time: a reused pid is not ours)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _session_processes(starter, session_dir: str) -> list:
    """The starter's descendants in its Ray session: below the starter's children whose
    command line names ``session_dir`` (GCS, raylet, ...), those children included."""
    import psutil

    try:
        below = starter.children(recursive=True)
    except psutil.Error:
        return []
    parent = {}
    for p in below:
        try:
            parent[p.pid] = p.ppid()
        except psutil.Error:
            pass
    roots = set()
    for p in below:
        try:
            if (parent.get(p.pid) == starter.pid and p.pid != os.getpid()  # not this watcher
                    and any(session_dir in part for part in p.cmdline())):
                roots.add(p.pid)
        except psutil.Error:
            pass
    ours = []
    for p in below:
        pid = p.pid
        while pid in parent and pid not in roots:
            pid = parent[pid]
        if pid in roots:
            ours.append(p)
    return ours


def _wait(procs: list, timeout_s: float) -> list:
    """What of ``procs`` still runs after up to ``timeout_s`` (a zombie is gone: its parent reaps it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in procs if _running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _watch_ray_session(starter_pid: int, session_dir: str, grace_s: float) -> int:
    import psutil

    try:
        starter = psutil.Process(starter_pid)
    except psutil.Error:
        return 0
    seen: dict[int, tuple[psutil.Process, str]] = {}  # pid -> (process, its name while it lived)
    got = bytearray()
    while True:
        # What lives below the session now, and what was below it and still lives (re-parented
        # away from the tree); the dead drop out, so a long sweep's set stays small.
        seen = {pid: entry for pid, entry in seen.items() if _running(entry[0])}
        for p in _session_processes(starter, session_dir):
            if p.pid not in seen:
                try:
                    seen[p.pid] = (p, p.name())
                except psutil.Error:
                    pass
        state = _starter_state(starter_pid, got)
        if state == "released":
            return 0
        if state == "dead":
            break
    alive = [p for p, _ in seen.values() if _running(p)]
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    left = _wait(alive, grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait(left, 5.0)
    if alive:
        print(f"starter {starter_pid} died; stopped {len(alive)} process(es) of {session_dir}: "
              + ", ".join(f"{p.pid} {seen[p.pid][1]}" for p in alive), flush=True)
    return 0


def main(argv: list[str]) -> int:
    starter_pid, kind, target, grace_s = int(argv[1]), argv[2], argv[3], float(argv[4])
    for sig in (signal.SIGINT, signal.SIGHUP):  # they are for the starter; this one cleans up after it
        signal.signal(sig, signal.SIG_IGN)
    if kind == "group":
        return _watch_group(starter_pid, int(target), grace_s)
    if kind == "ray-session":
        return _watch_ray_session(starter_pid, target, grace_s)
    print(f"unknown target kind {kind!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
