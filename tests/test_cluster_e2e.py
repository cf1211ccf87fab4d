"""The cluster flow end to end on one machine: `ray up`, `ray submit` a sweep, `ray down`.

Uses the committed ``sweeps/cluster-local.yaml`` (rendered with this machine's key, ssh
port and free head ports by ``tests/cluster_harness.py``) against Debian's sshd started
by the test on 127.0.0.1, then reads the sweep's MLflow store: one parent run, one child
run per budgeted trial plus the CE-only reference, every run that reached the last step
FINISHED with its accuracies.

Needs ``apt-get install -y openssh-server openssh-client rsync netcat-openbsd``; skipped
(with the reason) when they are missing. About 2-4 minutes on 2 cores.

Do not run it concurrently with other Ray tests unless ``unshare`` works here (root on
Linux; the harness then runs sshd, and so the whole cluster, in its own PID namespace):
without it, the ``ray stop`` that ``ray up`` and ``ray down`` run on the head stops every
Ray process on the host. pytest runs tests one after another, so a normal run is fine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cluster_harness import REPO, LocalCluster, missing_tools

pytestmark = pytest.mark.slow

CONFIG = REPO / "sweeps" / "cluster-local.yaml"
SWEEP = REPO / "sweeps" / "temperature.py"
SMOKE_TRIALS = 2  # sweeps/temperature.py: budget["smoke"]


@pytest.fixture
def cluster(tmp_path):
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {missing}: apt-get install -y openssh-server openssh-client "
                    "rsync netcat-openbsd")
    env = {k: os.environ[k] for k in (
        "KD_CACHE_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_VERBOSITY",
        # a checkout run through PYTHONPATH (a worktree beside an installed copy) must be
        # the code the head imports, not the installed one
        "PYTHONPATH",
    ) if k in os.environ}
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    # MLFLOW_TRACKING_URI is deliberately not passed on: the remote shell starts from a
    # clean environment, so the sweep logs to sqlite under --output-dir.
    with LocalCluster(CONFIG, tmp_path, env=env, log=print) as c:
        yield c


def test_ray_up_submit_down(cluster, tmp_path):
    out = tmp_path / "sweep"
    t0 = time.monotonic()
    try:
        cluster.up()
        # `--address auto`: join the cluster that `ray up` started (not a new local Ray).
        proc = cluster.submit(SWEEP, "--preset", "smoke", "--address", "auto",
                              "--output-dir", str(out), timeout=1200)
    finally:
        cluster.down()
    wall = time.monotonic() - t0
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in cluster.timings.items())
    print(f"cluster e2e: {wall:.0f}s ({timings}; pid namespace: {cluster.isolate})")

    # The sweep joined the cluster's Ray rather than starting one of its own: a single
    # Ray session (the head's) exists under the cluster's RAY_TMPDIR, with a driver in it.
    sessions = sorted((cluster.ray_tmp / "ray").glob("session_2*"))
    assert len(sessions) == 1, sessions
    assert list(sessions[0].glob("logs/python-core-driver-*")), "no driver joined the head"
    assert (out / "mlflow.db").exists(), proc.stdout[-4000:]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["temperature"])
    parents = runs[runs["tags.kd.role"] == "sweep"]
    assert len(parents) == 1, runs[["run_id", "status", "tags.kd.role"]]
    parent_id = parents["run_id"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    roles = children["tags.kd.role"].value_counts().to_dict()
    assert roles == {"trial": SMOKE_TRIALS, "reference": 1}, children[["run_id", "status", "tags.kd.role"]]
    # ASHA may stop a trial early (KILLED, evaluated at its rung); none failed or hangs open.
    assert set(children["status"]) <= {"FINISHED", "KILLED"}, children["status"]
    assert children["metrics.acc_mean"].notna().all(), "stopped trials are evaluated where they stopped"
    killed = children[children["status"] == "KILLED"]
    if len(killed):  # the column exists only when some run carries the tag
        assert killed["tags.kd.stopped_step"].notna().all()
    finished = children[children["status"] == "FINISHED"]
    assert len(finished) >= 1
    assert children["params.loss.temperature"].notna().all()
    import json

    results = json.loads((out / "results.json").read_text())
    assert {"teacher", "reference", "best", "verdict"} <= set(results), sorted(results)

    # The students are artifacts in the sweep's store, not in the head's working
    # directory (the default `./mlruns` of a sqlite store would put them in ~ on the
    # head, which on a real cluster is a different disk on every node).
    for uri in finished["artifact_uri"]:
        path = Path(uri.removeprefix("file://"))
        assert path.resolve().is_relative_to(out.resolve()), f"artifacts at {uri}, not under {out}"
        assert list(path.glob("student/*.safetensors")), f"no student artifact in {path}"

    # Teardown left nothing running in this cluster's name.
    cluster.close()
    assert cluster.stray_pids() == []

