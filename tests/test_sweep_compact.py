"""A temperature sweep on a 32k-vocabulary teacher: its range is checked against the
compact cache's grid before Ray starts, and the trials run from the compact cache with
its sampled tail (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_soft_labels_compact import big_teacher  # noqa: F401 (the module's 32k teacher fixture)
from tests.test_sweep_e2e import ROOT, _env, _runs

pytestmark = pytest.mark.slow


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke", "--no-report",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _sets(root: Path, **extra: str) -> list[str]:
    sets = {"teacher.source": str(root / "teacher"), "teacher.mode": "cache", "data.block_size": "32",
            "data.max_blocks": "24", "train.batch_size": "4", **extra}
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def test_a_range_the_compact_grid_cannot_serve_is_refused_before_ray(big_teacher, tmp_path, cache_root):  # noqa: F811
    """T in [0.5, 20] (the sweep's space) against the grid [0.5, 8] that `auto` picks at
    V = 32,768: one line, exit 2, nothing written."""
    out = tmp_path / "sweep"
    proc = _run([*_sets(big_teacher), "--output-dir", str(out)], _env(cache_root), timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if "Warning" not in ln and ln.strip()]
    assert "loss.temperature range [0.5, 20] is not allowed: the compact soft-label cache serves T in [0.5, 8]" \
        in lines[-1], proc.stderr[-2000:]
    assert "ray" not in proc.stdout.lower() and not (out / "sweep.json").exists()


def test_a_sweep_on_a_32k_teacher_trains_from_the_compact_cache(big_teacher, tmp_path, cache_root):  # noqa: F811
    out, soft = tmp_path / "sweep", tmp_path / "soft"
    proc = _run([*_sets(big_teacher, **{"teacher.grid_max_temperature": "20",
                                        "teacher.soft_labels_dir": str(soft)}), "--output-dir", str(out)],
                _env(cache_root), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (manifest,) = [json.loads(p.read_text()) for p in soft.glob("*/manifest.json")]
    assert manifest["layout"] == "compact" and manifest["vocab"] == 32768 and manifest["tail_samples"] == 64
    assert manifest["betas"][0] == pytest.approx(1 / 20)
    meta, children = _runs(out)
    trials = [r for r in children if r.data.tags.get("kd.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.params["teacher.mode"] == "cache" for r in trials)
    assert all(r.data.metrics["kd_loss"] > 0 for r in trials)
