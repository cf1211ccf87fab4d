"""Everything kd starts stops with it, a SIGKILLed starter included (issue 15, item 8).

The watcher of :mod:`kd.reaper` on its own first (stand-in starters, no Ray, no MLflow:
seconds), then a real smoke sweep whose driver is SIGKILLed mid-trial: before the
watcher, Ray's dashboard agent and runtime-env agent lived on for 60 s. (``kd ui`` killed
is tests/test_serve.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(procs)


def _kill(procs: list[psutil.Process]) -> None:
    for p in _alive(procs):
        try:
            p.kill()
        except psutil.Error:
            pass


_SLEEPER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "time.sleep(600)")

#: A stand-in sweep driver: a "Ray process" that names the session on its command line (as
#: GCS and the raylet do) with a child that does not (as the agents and workers), another
#: child outside the session (a test runner's server, say), and the watcher.
FAKE_DRIVER = textwrap.dedent(f"""
    import subprocess, sys, time
    from kd import reaper
    session, mode = sys.argv[1], sys.argv[2]
    ray_like = subprocess.Popen([sys.executable, "-c", {_SLEEPER!r}, "--session-dir=" + session])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watcher = reaper.watch_ray_session(session)
    print(ray_like.pid, other.pid, watcher.pid, flush=True)
    if mode == "release":  # the driver ended its Ray itself (ray.shutdown()), then releases the watcher
        time.sleep(1.5)
        t0 = time.monotonic()
        reaper.release(watcher)
        print("released", round(time.monotonic() - t0, 1), watcher.returncode, flush=True)
    time.sleep(600)
""")

#: A stand-in kd ui: a "server" leading a process group of its own, with a child in it.
FAKE_UI = textwrap.dedent(f"""
    import subprocess, sys, time
    from kd import reaper
    server = subprocess.Popen([sys.executable, "-c", {_SLEEPER!r}], start_new_session=True)
    watcher = reaper.watch_group(server.pid, grace_s=1.0)
    print(server.pid, watcher.pid, flush=True)
    if sys.argv[1] == "server-exits":
        time.sleep(1.5)
        server.kill()
        server.wait()
    time.sleep(600)
""")


def _start(script: str, *args: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    return proc, [int(x) for x in proc.stdout.readline().split()]


def _child(pid: int) -> psutil.Process:
    deadline = time.monotonic() + 30
    while not psutil.Process(pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = psutil.Process(pid).children()
    return child


def _end(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    _kill(procs)
    proc.kill()
    proc.wait(timeout=10)


def _fake_driver(session: str, mode: str):
    """The stand-in driver started: (driver, [its session's two processes], the outsider, the watcher)."""
    driver, (ray_pid, other_pid, watcher_pid) = _start(FAKE_DRIVER, session, mode)
    return driver, [psutil.Process(ray_pid), _child(ray_pid)], psutil.Process(other_pid), psutil.Process(watcher_pid)


def test_watcher_stops_the_ray_session_when_its_driver_is_killed(tmp_path):
    session = str(tmp_path / "session_1")
    driver, ours, other, watcher = _fake_driver(session, "wait")
    try:
        time.sleep(1.5)  # the watcher has seen the tree (it looks twice a second)
        driver.kill()
        driver.wait(timeout=10)
        assert _wait_gone(ours, 10) == [], "the session's processes outlived the driver"
        assert _wait_gone([watcher], 10) == [], "the watcher did not end after its work"
        assert _alive([other]), "a process outside the session was touched"
        log = (Path(session) / "logs" / "kd_reaper.log").read_text()
        assert f"starter {driver.pid} died; stopped 2 process(es)" in log, log
    finally:
        _end(driver, [*ours, other, watcher])


def test_released_watcher_exits_touching_nothing(tmp_path):
    driver, ours, other, watcher = _fake_driver(str(tmp_path / "session_1"), "release")
    try:
        line = driver.stdout.readline().split()
        assert line[0] == "released" and float(line[1]) < 2 and line[2] == "0", line
        assert not _alive([watcher])
        driver.kill()  # released: the driver's death is no longer the watcher's business
        driver.wait(timeout=10)
        time.sleep(1)
        assert len(_alive([*ours, other])) == 3
    finally:
        _end(driver, [*ours, other, watcher])


def test_group_watcher_stops_the_group_when_its_starter_is_killed():
    ui, (server_pid, watcher_pid) = _start(FAKE_UI, "wait")
    group = [psutil.Process(server_pid), _child(server_pid)]
    watcher = psutil.Process(watcher_pid)
    try:
        ui.kill()
        ui.wait(timeout=10)
        assert _wait_gone(group, 10) == [], "the server's group outlived kd ui"
        assert _wait_gone([watcher], 10) == []
    finally:
        _end(ui, [*group, watcher])


def test_group_watcher_ends_with_the_group():
    """A group that is gone is not watched further: its number could name another group later."""
    ui, (server_pid, watcher_pid) = _start(FAKE_UI, "server-exits")
    grandchild = _child(server_pid)
    watcher = psutil.Process(watcher_pid)
    try:
        grandchild.kill()  # the server itself is killed by the stand-in after 1.5 s
        assert _wait_gone([watcher], 10) == []
        assert ui.poll() is None
    finally:
        _end(ui, [grandchild, watcher])


@pytest.mark.slow
def test_sigkilled_sweep_leaves_no_ray_process(tmp_path, cache_root):
    """SIGKILL a smoke sweep's driver mid-trial: within 15 s no process of its Ray session is left
    (the driver's descendants recorded just before the kill: GCS, raylet, agents, workers)."""
    ray_tmp = tempfile.mkdtemp(prefix="kdr-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(KD_CACHE_DIR=str(cache_root), KD_RAY_TEMP_DIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    out = tmp_path / "sweep"
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke",
                             "--no-report", "--trials", "2", "--output-dir", str(out), "--set", "train.steps=2000"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver = psutil.Process(proc.pid)
    recorded: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 420
        while not list((out / "ray_results").rglob("progress.csv")):  # a trial has reported: it is running
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial reported in 420 s"
            time.sleep(0.5)
        recorded = driver.children(recursive=True)
        names = set()
        for p in recorded:
            try:
                names.add(p.name())
            except psutil.Error:  # a worker that ended meanwhile
                pass
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), names
        proc.kill()
        proc.wait(timeout=10)
        left = _wait_gone(recorded, 15)
        assert left == [], f"alive 15 s after the driver's SIGKILL: {[(p.pid, p.name()) for p in left]}"
    finally:
        _kill(recorded)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
