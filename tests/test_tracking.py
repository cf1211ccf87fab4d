"""MLflow layout (kd/CONTRACTS.md): parent and child runs, identity on resume, failures."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mlflow.tracking import MlflowClient  # noqa: E402

from kd.tracking import Tracker, is_metric, tracking_uri  # noqa: E402


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path / "sweep")
    return uri, Tracker(uri, "temperature")


def test_default_store_is_sqlite_in_the_output_dir_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path / "o") == f"sqlite:///{(tmp_path / 'o').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path / "o") == "http://127.0.0.1:5000"


def test_metric_names_come_from_kd_metrics():
    assert is_metric("val_loss") and is_metric("teacher_acc_mean")
    assert not is_metric("time_this_iter_s") and not is_metric("teacher_pid")


def test_parent_and_child_runs_in_the_contract_layout(store, tmp_path):
    uri, tr = store
    parent = tr.start_sweep("temperature", {"fixed.loss.kd_weight": 0.5, "objectives": "acc_mean"})
    child = tr.child_run(parent, "abc_00001", {"loss.temperature": 3.5, "student.n_layer": 2}, sweep="temperature")
    for step, loss in ((10, 3.0), (20, 2.5)):
        tr.log_result(child, {"step": step, "val_loss": loss, "tokens_per_s": 1e3, "pid": 42, "config/x": 1})
    tr.log_result(child, {"step": 20, "acc_mean": 0.4, "params": 1e5, "teacher_acc_mean": 0.9, "kd_final": 1})
    tr.log_teacher(parent, {"teacher_acc_mean": 0.9, "teacher_val_loss": 1.5, "acc_mean": 0.4})
    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"x")
    (student / "config.json").write_text("{}")
    tr.log_student(child, student)
    tr.end_child(child, "FINISHED")
    tr.end_sweep(parent)

    c = MlflowClient(uri)
    p, ch = c.get_run(parent), c.get_run(child)
    assert p.data.tags["kd.role"] == "sweep" and p.data.tags["kd.sweep"] == "temperature"
    assert p.data.params["objectives"] == "acc_mean"
    assert p.data.metrics == {"teacher_acc_mean": 0.9, "teacher_val_loss": 1.5}
    assert ch.data.tags["mlflow.parentRunId"] == parent and ch.data.tags["kd.role"] == "trial"
    assert ch.data.tags["kd.trial_id"] == "abc_00001"
    assert ch.data.params == {"loss.temperature": "3.5", "student.n_layer": "2"}
    assert [(m.step, m.value) for m in c.get_metric_history(child, "val_loss")] == [(10, 3.0), (20, 2.5)]
    assert "pid" not in ch.data.metrics and "teacher_acc_mean" not in ch.data.metrics
    assert ch.data.metrics["acc_mean"] == 0.4
    assert sorted(a.path for a in c.list_artifacts(child, "student")) == ["student/config.json",
                                                                          "student/model.safetensors"]
    assert p.info.status == ch.info.status == "FINISHED"


def test_a_resumed_trial_reuses_its_child_run(store):
    uri, tr = store
    parent = tr.start_sweep("temperature", {})
    first = tr.child_run(parent, "t1", {"loss.temperature": 2.0})
    tr.end_sweep(parent, "KILLED")  # the driver was interrupted
    assert MlflowClient(uri).get_run(first).info.status == "KILLED"

    again = Tracker(uri, "temperature")  # a new driver process after --resume
    assert again.start_sweep("temperature", {}, run_id=parent) == parent
    second = again.child_run(parent, "t1", {"loss.temperature": 2.0})
    assert second == first
    assert MlflowClient(uri).get_run(first).info.status == "RUNNING"
    again.end_child(second, "FINISHED")
    again.end_sweep(parent)
    runs = again.children(parent)
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_failed_trial_carries_its_error_and_other_trials_are_unaffected(store):
    uri, tr = store
    parent = tr.start_sweep("temperature", {})
    bad = tr.child_run(parent, "bad", {})
    good = tr.child_run(parent, "good", {})
    tr.end_child(bad, "FAILED", error="FloatingPointError: loss is nan at step 3")
    tr.end_child(good, "FINISHED")
    c = MlflowClient(uri)
    assert c.get_run(bad).info.status == "FAILED"
    assert c.get_run(bad).data.tags["kd.error"].startswith("FloatingPointError: loss is nan")
    assert c.get_run(good).info.status == "FINISHED" and "kd.error" not in c.get_run(good).data.tags


def test_two_sweeps_in_one_experiment_keep_their_children_apart(store):
    uri, tr = store
    p1, p2 = tr.start_sweep("temperature", {}), tr.start_sweep("temperature", {})
    r1, r2 = tr.child_run(p1, "same_id", {}), Tracker(uri, "temperature").child_run(p2, "same_id", {})
    assert r1 != r2
    assert [r.info.run_id for r in tr.children(p1)] == [r1]


# ---------------------------------------------------------------- the Tune callback


def _trial(trial_id, config, last_result=None, checkpoint=None, error=None):
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=last_result or {},
                           checkpoint=checkpoint, get_error=lambda: error)


def test_callback_writes_runs_from_tune_events(store, tmp_path):
    from ray import tune

    from kd.config import KDConfig
    from kd.sweep.mlflow import MLflowTrials
    from kd.sweep.spec import base_dict

    uri, tr = store
    parent = tr.start_sweep("temperature", {})
    cb = MLflowTrials(uri, "temperature", parent, "temperature", prune_metric="acc_mean")
    meta = {"kd": {"num_workers": 1, "base": base_dict(KDConfig())}}
    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"x")

    ok = _trial("ok", {"loss.temperature": 4.0, **meta}, checkpoint=tune.Checkpoint.from_directory(str(student)))
    cb.on_trial_start(0, [], ok)
    cb.on_trial_result(0, [], ok, {"step": 10, "val_loss": 2.0})
    final = {"step": 20, "val_loss": 1.5, "acc_mean": 0.5, "teacher_acc_mean": 0.9, "kd_final": 1}
    cb.on_trial_result(0, [], ok, final)
    ok.last_result = final
    cb.on_trial_complete(0, [], ok)

    stopped = _trial("stopped", {"loss.temperature": 9.0, **meta}, last_result={"step": 10, "val_loss": 3.0})
    cb.on_trial_start(0, [], stopped)
    cb.on_trial_complete(0, [], stopped)

    nan = _trial("nan", {"loss.temperature": 1.0, "train.lr": 1e30, **meta},
                 error="Traceback...\nFloatingPointError: loss is nan at step 0; lower train.lr")
    cb.on_trial_start(0, [], nan)
    cb.on_trial_error(0, [], nan)

    import pickle

    assert pickle.loads(pickle.dumps(cb)).parent_id == parent  # Tune saves callbacks with its state

    c = MlflowClient(uri)
    runs = {r.data.tags["kd.trial_id"]: r for r in tr.children(parent)}
    assert runs["ok"].info.status == "FINISHED"
    assert runs["ok"].data.params["loss.temperature"] == "4.0"
    assert runs["ok"].data.params["student.n_layer"] == "2", "params are the whole flattened config"
    assert [a.path for a in c.list_artifacts(runs["ok"].info.run_id, "student")] == ["student/model.safetensors"]
    assert runs["stopped"].info.status == "KILLED" and "ASHA" in runs["stopped"].data.tags["kd.stopped"]
    assert "rung_acc_mean" in runs["stopped"].data.tags["kd.stopped"]
    assert runs["stopped"].data.tags["kd.stopped_step"] == "10"
    assert runs["ok"].data.tags["kd.role"] == "trial"
    assert runs["nan"].info.status == "FAILED"
    assert runs["nan"].data.tags["kd.error"].startswith("FloatingPointError: loss is nan")
    assert c.get_run(parent).data.metrics == {"teacher_acc_mean": 0.9}
