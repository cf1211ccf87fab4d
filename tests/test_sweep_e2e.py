"""End to end on a real local Ray: the sweep scripts, MLflow runs, resume, a killed worker, a NaN trial.

Every test runs the real command (or ``run_sweep``) in a subprocess with its own Ray temp
dir, on the tiny world with the tests' tiny teacher (tests/conftest.py), and reads the
MLflow store afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _env(cache_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Ray's socket paths must stay short: a temp dir of its own, not pytest's deep tmp_path.
    env.update(KD_CACHE_DIR=str(cache_root), KD_RAY_TEMP_DIR=tempfile.mkdtemp(prefix="kdr-", dir="/tmp"),
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _sweep(args: list[str], env: dict[str, str], preset: bool = True, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "temperature.py"),
                             *(["--preset", "smoke"] if preset else []), "--no-report", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _runs(out: Path) -> tuple[dict, list]:
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "sweep.json").read_text())
    c = MlflowClient(state["tracking_uri"])
    exp = c.get_experiment_by_name(state["experiment"])
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.info.run_id == state["parent_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {"client": c, "parent": parent}, children


def _wait_for(pred, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return out


def test_interrupted_sweep_resumes_to_exactly_its_budget(tmp_path, cache_root):
    """SIGINT mid-trial, then a bare --resume (no --preset: the sweep's own): 3 searched trials and the
    CE-only reference, each one child run, none RUNNING, trial 1 resumed, early stopping on."""
    env, out = _env(cache_root), tmp_path / "sweep"
    proc = _sweep(["--trials", "3", "--output-dir", str(out), "--set", "train.steps=30"], env)

    def registered() -> dict[str, int]:  # trial id -> the step Tune will resume it from
        try:
            _, runs = _runs(out)
        except (OSError, ValueError, IndexError, AttributeError):  # the sweep is still starting
            return {}
        return {r.data.tags["kd.trial_id"]: int(r.data.tags["kd.checkpoint_step"])
                for r in runs if "kd.checkpoint_step" in r.data.tags}

    # Wait for a checkpoint Tune has registered (kd.checkpoint_step), not one merely on disk:
    # Tune restarts a trial whose checkpoint it had not yet processed when interrupted.
    _wait_for(lambda: bool(registered()), proc, 400, "the first registered checkpoint")
    proc.send_signal(signal.SIGINT)
    log = _finish(proc, 180)
    assert proc.returncode == 130, log[-3000:]
    assert "resume with" in log and "--preset" not in log.split("resume with")[-1]
    _, children = _runs(out)
    assert 1 <= len(children) < 3 and not any(r.info.status == "RUNNING" for r in children)
    resumed = registered()  # the trials the resume continues

    proc = _sweep(["--resume", "--output-dir", str(out)], env, preset=False)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    meta, children = _runs(out)
    roles = sorted(r.data.tags["kd.role"] for r in children)
    assert roles == ["reference", "trial", "trial", "trial"], roles
    assert len({r.data.tags["kd.trial_id"] for r in children}) == 4, "one child run per trial"
    assert not any(r.info.status == "RUNNING" for r in children)
    assert all(r.data.params["train.steps"] == "30" and r.data.params["data.world_size"] == "tiny"
               for r in children), "resumed as the smoke sweep it was, with its --set"
    assert meta["parent"].info.status == "FINISHED"
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == 4 and {"teacher", "reference", "best", "verdict"} <= set(results)
    assert resumed and set(resumed) <= {r.data.tags["kd.trial_id"] for r in children}
    for r in children:
        if r.data.tags["kd.trial_id"] not in resumed:
            continue
        steps = [m.step for m in meta["client"].get_metric_history(r.info.run_id, "val_loss")]
        last = 30 if r.info.status == "FINISHED" else int(r.data.tags["kd.stopped_step"])
        # a finished run logs its last step twice (its evaluation, then the final metrics)
        body = steps[:-1] if r.info.status == "FINISHED" else steps
        # resumed, not restarted: a restart would log its first steps a second time
        assert body == sorted(set(body)) == list(range(10, last + 1, 10)), f"resumed: {steps}"
    for r in children:
        if r.info.status == "FINISHED":  # every run that reached train.steps was evaluated
            assert "acc_mean" in r.data.metrics and meta["client"].list_artifacts(r.info.run_id, "student")
        else:  # stopped by ASHA at a rung, evaluated there
            assert r.info.status == "KILLED" and int(r.data.tags["kd.stopped_step"]) < 30
            assert "acc_mean" in r.data.metrics
    shapes = {r.data.params["student.n_layer"] + "x" + r.data.params["student.n_embd"] for r in children}
    assert len(shapes) == 1 and len({r.data.metrics["latency_ms_per_token"] for r in children}) == 1, \
        "one latency per shape, from the latency pass"
    again = _sweep(["--resume", "--output-dir", str(out)], env, preset=False)
    log = _finish(again, 120)
    assert again.returncode == 0 and "is finished" in log, log[-2000:]


def test_asha_stops_a_bad_trial_and_never_one_that_reached_the_last_step(tmp_path, cache_root, tiny_overrides):
    """Real ASHA on rung_acc_mean at step 10 of 20: the trial made deliberately bad at its rung is
    stopped there and logged with its accuracy at step 10; the good one trains to the end."""
    fixed = {k: v for k, v in tiny_overrides.items() if k != "train.threads"}
    script = textwrap.dedent(f"""
        from kd.config import KDConfig, apply_overrides
        from kd.run import distill
        from kd.sweep import LogUniform, SweepOptions, SweepSpec
        from kd.sweep.driver import run_sweep

        def runner(cfg, report=None, **kw):  # pickled by value into the trial (defined in __main__)
            def bad_at_rung(metrics, ckpt):
                if "acc_mean" in metrics and cfg.loss.temperature > 10:
                    metrics = {{**metrics, "acc_mean": -1.0}}
                report(metrics, ckpt)
            return distill(cfg, report=bad_at_rung, **kw)

        spec = SweepSpec("asha", {{"loss.temperature": LogUniform(0.5, 20.0)}}, ["acc_mean"], budget={{"smoke": 2}},
                         points=[{{"loss.temperature": 2.0}}, {{"loss.temperature": 15.0}}])
        # One trial at a time: asynchronous ASHA lets the first trial at a rung go on, so the
        # good trial must reach the rung first for the bad one to be compared (and stopped).
        options = SweepOptions(output_dir={str(tmp_path / 'sweep')!r}, preset="smoke", budget=2, references=False,
                               runner=runner, max_concurrent=1)
        print(run_sweep(spec, apply_overrides(KDConfig(), {fixed!r}), options).text())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(cache_root), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    meta, children = _runs(tmp_path / "sweep")
    by_t = {float(r.data.params["loss.temperature"]): r for r in children}
    good, bad = by_t[2.0], by_t[15.0]
    assert good.info.status == "FINISHED" and "acc_mean" in good.data.metrics
    steps = [m.step for m in meta["client"].get_metric_history(good.info.run_id, "acc_mean")]
    assert steps == [10, 20], "scored at its rung and at the end"
    assert bad.info.status == "KILLED" and bad.data.tags["kd.stopped_step"] == "10"
    assert "rung_acc_mean" in bad.data.tags["kd.stopped"]
    assert [(m.step, m.value) for m in meta["client"].get_metric_history(bad.info.run_id, "acc_mean")] == [(10, -1.0)]
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert sorted(t["status"] for t in results["trials"]) == ["FINISHED", "STOPPED"]
    assert results["best"]["config"] == {"loss.temperature": 2.0}


def test_killed_train_worker_finishes_from_its_checkpoint(tmp_path, cache_root):
    """A 2-worker TorchTrainer trial loses rank 1 after a checkpoint; FailureConfig(1) recovers it."""
    env, out = _env(cache_root), tmp_path / "sweep"
    # --no-reference: the recovery is the searched trial's; the finalists phase has its own tests.
    proc = _sweep(["--trials", "1", "--num-workers", "2", "--max-failures", "1", "--no-reference",
                   "--output-dir", str(out), "--set", "train.steps=60"], env)
    pid_files = lambda: list((out / "trials").glob("*-pids/rank1.pid"))  # noqa: E731

    def registered() -> bool:  # a checkpoint Train has committed (its directory alone is not enough)
        for snap in (out / "ray_results").glob("train-*/checkpoint_manager_snapshot.json"):
            try:
                return bool(json.loads(snap.read_text())["checkpoint_results"])
            except (ValueError, KeyError):
                return False
        return False

    _wait_for(lambda: pid_files() and registered(), proc, 400, "rank 1 and a registered Train checkpoint")
    os.kill(int(pid_files()[0].read_text()), signal.SIGKILL)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    results = json.loads((out / "results.json").read_text())
    (trial,) = [t for t in results["trials"] if t["role"] == "trial"]
    assert trial["status"] == "FINISHED", trial
    assert trial["metrics"]["kd_restarts"] == 1, "the worker group restarted from a checkpoint"
    assert trial["metrics"]["step"] == 60
    meta, children = _runs(out)
    (child,) = children
    steps = [m.step for m in meta["client"].get_metric_history(child.info.run_id, "val_loss")]
    assert steps[-1] == 60 and 0 not in steps
    assert meta["client"].list_artifacts(child.info.run_id, "student")


def test_a_sweep_with_no_successful_trial_fails(tmp_path, cache_root):
    """Every trial NaNs: exit 1 with the first reason in one line, the parent FAILED (issue 15, item 1)."""
    env, out = _env(cache_root), tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke", "--no-report",
                           "--trials", "1", "--set", "train.lr=1e30", "--output-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: no trial of 1 finished; the first failed with: FloatingPointError: loss is" in last, last
    meta, children = _runs(out)
    assert meta["parent"].info.status == "FAILED" and "FloatingPointError" in meta["parent"].data.tags["kd.error"]
    assert [r.info.status for r in children] == ["FAILED"], "no reference or repeats after a failed search"
    assert json.loads((out / "results.json").read_text())["error"].startswith("no trial of 1 finished")


def test_a_batch_larger_than_the_data_is_refused_before_ray_starts(tmp_path, cache_root):
    """What the data refuses fails in one line before Ray or any file (issue 15, item 1)."""
    env, out = _env(cache_root), tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke", "--no-report",
                           "--set", "train.batch_size=100000", "--output-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if "Warning" not in ln and ln.strip()]
    assert re.search(r"error: train.batch_size=100000 is not allowed: the data has only \d+ training blocks",
                     lines[-1]), proc.stderr[-2000:]
    assert not out.exists(), "a refused sweep leaves no folder, not even an empty one"
    assert not list(Path(env["KD_RAY_TEMP_DIR"]).iterdir())  # Ray never started


def test_nan_trial_is_failed_in_mlflow_and_the_sweep_goes_on(tmp_path, cache_root, tiny_overrides):
    """lr=1e30 makes the loss NaN in the first trial; the second trial still finishes."""
    fixed = {k: v for k, v in tiny_overrides.items() if k != "train.threads"}
    script = textwrap.dedent(f"""
        from kd.config import KDConfig, apply_overrides
        from kd.sweep import Choice, SweepOptions, SweepSpec
        from kd.sweep.driver import run_sweep
        spec = SweepSpec("nan_check", {{"train.lr": Choice([1e30, 2e-3])}}, ["acc_mean"], budget={{"smoke": 2}},
                         points=[{{"train.lr": 1e30}}, {{"train.lr": 2e-3}}])
        options = SweepOptions(output_dir={str(tmp_path / 'sweep')!r}, preset="smoke", budget=2, early_stop=False,
                               references=False)
        r = run_sweep(spec, apply_overrides(KDConfig(), {fixed!r}), options)
        print(r.text())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(cache_root), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    meta, children = _runs(tmp_path / "sweep")
    by_lr = {float(r.data.params["train.lr"]): r for r in children}
    assert set(by_lr) == {1e30, 2e-3}
    bad, good = by_lr[1e30], by_lr[2e-3]
    assert bad.info.status == "FAILED"
    assert re.match(r"FloatingPointError: loss is (nan|inf)", bad.data.tags["kd.error"]), bad.data.tags["kd.error"]
    assert good.info.status == "FINISHED" and "acc_mean" in good.data.metrics
    assert meta["parent"].info.status == "FINISHED"
    assert any(k.startswith("teacher_") for k in meta["parent"].data.metrics)


def test_ctrl_c_while_ray_starts_is_one_line_and_strands_nothing(tmp_path, cache_root):
    """SIGINT as soon as the local Ray appears (its start-up, the teacher's soft labels):
    exit 130 with one line and no traceback; a folder is left only if it holds a sweep that
    --resume continues (issue 15)."""
    env, out = _env(cache_root), tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--preset", "smoke",
                             "--no-report", "--output-dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ray_dir, deadline = Path(env["KD_RAY_TEMP_DIR"]), time.monotonic() + 120
    while not (ray_dir.exists() and any(ray_dir.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout + stderr)[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not out.exists() or (out / "sweep.json").is_file(), sorted(p.name for p in out.iterdir())
    if out.exists():  # interrupted after it started: the parent is closed, and --resume finishes it
        meta, _ = _runs(out)
        assert meta["parent"].info.status == "KILLED"
    else:
        assert stderr.strip().splitlines()[-1].endswith("interrupted before the sweep started: rerun the command "
                                                        "to start it"), stderr[-2000:]
