"""kd ui: the MLflow UI serves the sweep's runs, and a real browser renders them.

Starts ``python -m analysis ui`` (the code behind ``kd ui``) in its own session on a
free port of 127.0.0.1, waits for /health, checks the runs through the REST API, then
loads the runs page in headless Debian chromium (apt-get install chromium) to a screenshot
and a DOM dump. The server's whole process group is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_fixture import assert_not_blank, build_store  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that work as root in a container (STACK.md, "A real browser").
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--virtual-time-budget=15000", "--window-size=1400,900"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None, timeout: float = 10) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.getbasetemp() / "mlflow_store")


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("ui") / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "w") as log:
        # start_new_session = setsid(): the server and its workers share one process
        # group that teardown can stop as a whole
        proc = subprocess.Popen(
            [sys.executable, "-m", "analysis", "ui", "--store", str(store.root),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # ~12 s on an idle machine, far more when busy
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kd ui exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        assert f"http://127.0.0.1:{port}" in log_path.read_text()  # kd ui prints its URL
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        for _ in range(50):  # the workers too, not only the leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(proc.pid, signal.SIGKILL)


def test_rest_api_has_the_sweep(server, store):
    exp = _get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name="
               f"{store.experiment}")["experiment"]
    assert exp["experiment_id"] == store.experiment_id
    runs = _get(f"{server}/api/2.0/mlflow/runs/search",
                {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    assert {store.parent_run_id, store.failed_run_id, *store.child_run_ids} <= set(by_id)
    for run_id in store.child_run_ids:
        tags = {t["key"]: t["value"] for t in by_id[run_id]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == store.parent_run_id
        metrics = {m["key"] for m in by_id[run_id]["data"]["metrics"]}
        assert {"acc_mean", "params", "latency_ms_per_token"} <= metrics
    assert by_id[store.failed_run_id]["info"]["status"] == "FAILED"
    parent = {m["key"] for m in by_id[store.parent_run_id]["data"]["metrics"]}
    assert "teacher_acc_mean" in parent


def _chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                               url], capture_output=True, timeout=240)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_browser_renders_the_runs_page(server, store, tmp_path):
    page = f"{server}/#/experiments/{store.experiment_id}/runs"
    shot = tmp_path / "runs_page.png"
    done = _chromium(page, f"--screenshot={shot}")
    assert shot.is_file(), done.stderr.decode()[-3000:]
    assert_not_blank(shot, min_colors=200, max_share=0.95)
    if os.environ.get("KD_UI_SCREENSHOT"):  # keep it for a person to look at
        shutil.copy(shot, os.environ["KD_UI_SCREENSHOT"])

    dom = _chromium(page, "--dump-dom").stdout.decode()
    # the runs table rendered with this sweep's parent and the store's run count
    assert ">pareto<" in dom
    count = re.search(r"<strong>(\d+)</strong>\s*matching runs", dom)
    assert count, dom[-2000:]
    # two parents; this sweep's children, its failed one and the older sweep's child
    assert int(count.group(1)) == 2 + len(store.child_run_ids) + 1 + 1
