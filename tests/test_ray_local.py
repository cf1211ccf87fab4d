"""The sweep's own local Ray listens on the loopback only (nothing reachable from the network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.slow


def test_local_ray_listens_on_loopback_only():
    script = textwrap.dedent("""
        import json, os, psutil, ray
        from kd.sweep.driver import _ray_init
        _ray_init(None)
        ray.get(ray.remote(lambda: 1).remote())  # a worker (and its gRPC server) is up too
        me = psutil.Process()
        pids = {p.pid for p in me.children(recursive=True)} | {me.pid}
        session = ray._private.worker._global_node.get_session_dir_path()
        for p in psutil.process_iter(["pid", "cmdline"]):  # Ray's daemons are not our children
            if any(session in part for part in (p.info["cmdline"] or [])):
                pids.add(p.info["pid"])
        listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        print("LISTEN", json.dumps(listening))
        ray.shutdown()
    """)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "KD_RAY_TEMP_DIR": tempfile.mkdtemp(prefix="kdr-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LISTEN"))
    listening = json.loads(line.removeprefix("LISTEN "))
    assert len(listening) >= 3, line  # GCS, raylet, object manager at least
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")  # the last: IPv4 loopback on an IPv6 socket
    assert all(ip in loopback for ip, _, _ in listening), line
