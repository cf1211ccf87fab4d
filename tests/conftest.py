"""Shared test setup: an isolated cache, no hub access, and a tiny configuration.

Everything the tests build (worlds, teachers, packed blocks) goes to one cache directory
for the whole session, so the tiny teacher is trained once and reused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any test module imports transformers/datasets: nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
if "KD_CACHE_DIR" not in os.environ:
    os.environ["KD_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd-test-cache-")

#: A config small enough that the teacher trains in well under a minute here and a
#: student in seconds; tests override only what they check.
TINY = {
    "data.world_size": "tiny",
    "teacher.n_layer": 2,
    "teacher.n_embd": 64,
    "teacher.n_head": 2,
    "teacher.steps": 150,
    "student.n_layer": 1,
    "student.n_embd": 32,
    "train.steps": 20,
    "train.eval_every": 10,
    "train.eval_blocks": 8,
    "train.batch_size": 8,
    "train.warmup_steps": 2,
    "train.threads": 2,
}


@pytest.fixture(scope="session")
def tiny_overrides() -> dict[str, object]:
    """Dotted-key overrides for a fast run on the tiny world (copy before changing)."""
    return dict(TINY)


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return Path(os.environ["KD_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the environment,
    and every subprocess a later test starts (a sweep, a bench script) would log there:
    once as MLflow's default ``sqlite:///mlflow.db`` in the repository. Restore it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``KD_NO_SKIP=1`` (CI) a skipped test fails: no skip stands in for a missing tool."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("KD_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but KD_NO_SKIP=1 requires every test to run: {reason}"
