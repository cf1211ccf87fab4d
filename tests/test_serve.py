"""``kd ui`` stops the ``mlflow server`` it started: SIGTERM to kd ui ends the server's whole group.

A real ``kd ui`` on a free port of 127.0.0.1 with a real (empty) sqlite store; the test
waits for /health, signals kd ui, then checks that the port no longer answers and that
no process of the server's group is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            out.append(int(stat.parent.name))
    return out


def _server(ui_pid: int) -> int:
    """kd ui's child that is the mlflow server (its other child is the watcher, kd.reaper)."""
    servers = [pid for pid in _children(ui_pid) if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, servers
    return servers[0]


def _group_members(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # pgrp, not a zombie
            out.append(int(stat.parent.name))
    return out


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _kill_groups(*pgids: int | None) -> None:
    """SIGKILL what a test left running, group by group (a cleanup: gone already is fine)."""
    for pgid in pgids:
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_kd_ui_stops_the_mlflow_server_group(tmp_path, sig):
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(tmp_path / "ui.log", "w")
    # Its own session, so that a failing test can still clean up everything it started.
    ui = subprocess.Popen([sys.executable, "-m", "kd.cli", "ui", "--store", f"sqlite:///{tmp_path}/mlflow.db",
                           "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                          start_new_session=True)
    server_pgid = None
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(0.5)
        server_pgid = os.getpgid(_server(ui.pid))
        assert server_pgid != os.getpgid(ui.pid)  # the server has a group of its own
        assert len(_group_members(server_pgid)) >= 1

        t0 = time.monotonic()
        ui.send_signal(sig)
        assert ui.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
        assert _group_members(server_pgid) == []
        with pytest.raises(OSError):  # nothing listens on the port any more
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        _kill_groups(server_pgid, ui.pid)
        ui.wait(timeout=10)
        log.close()


def test_kd_ui_killed_takes_its_server_down(tmp_path):
    """SIGKILL cannot be handled: kd ui's watcher (kd.reaper) stops the server's whole group, the
    job runner's huey consumers included (the server's PR_SET_PDEATHSIG alone left them 30 s), then exits."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    ui = subprocess.Popen([sys.executable, "-m", "kd.cli", "ui", "--store", f"sqlite:///{tmp_path}/mlflow.db",
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                          start_new_session=True)
    server_pgid = watcher_pgid = None
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            assert ui.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        server = _server(ui.pid)
        server_pgid = os.getpgid(server)
        (watcher,) = [pid for pid in _children(ui.pid) if pid != server]
        watcher_pgid = os.getpgid(watcher)
        ui.kill()
        ui.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (_group_members(server_pgid) or _group_members(watcher_pgid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_members(server_pgid) == []
        assert _group_members(watcher_pgid) == [], "the watcher ends once the server's group is gone"
    finally:
        _kill_groups(server_pgid, watcher_pgid, ui.pid)
        ui.wait(timeout=10)
