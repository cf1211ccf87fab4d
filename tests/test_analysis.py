"""analysis/: the loader on a store in the documented layout, and the Pareto maths checked
against Optuna and against cases worked by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import analysis
from analysis import hypervolume, knee, nondominated, pareto_front, reference_point

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_fixture import FAILED, TRIALS, build_store, final_metrics  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.getbasetemp() / "mlflow_store")


@pytest.fixture(scope="module")
def runs(store):
    return analysis.load_runs(store.tracking_uri, store.experiment)


# ------------------------------------------------------------------ import boundary


def test_analysis_imports_neither_torch_nor_ray(store):
    code = (
        "import sys, analysis, analysis.report, analysis.commands, kd.cli\n"
        f"df = analysis.load_runs({store.tracking_uri!r}, 'pareto')\n"
        "analysis.plot_front(analysis.front_frame(df, 'params'))\n"
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(len(df))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(len(TRIALS) + 1)


# ----------------------------------------------------------------------- the loader


def test_load_runs_types_status_and_parent(store, runs):
    assert len(runs) == len(TRIALS) + 1  # the older sweep's child is not mixed in
    assert set(runs["parent_run_id"]) == {store.parent_run_id}
    assert set(runs["run_id"]) == {*store.child_run_ids, store.failed_run_id}
    assert runs.attrs["parent_run_id"] == store.parent_run_id
    for col in ("student.n_layer", "student.n_embd", "train.seed", "train.steps"):
        assert runs[col].dtype == np.int64, col
    for col in ("loss.temperature", "loss.kd_weight", "train.lr", "acc_mean", "params"):
        assert runs[col].dtype == np.float64, col
    assert runs["teacher.trust_remote_code"].dtype == bool
    assert (runs["loss.divergence"] == "forward_kl").all()

    failed = runs[runs["status"] == "FAILED"]
    assert list(failed["run_id"]) == [store.failed_run_id]
    assert "nan" in failed["error"].iloc[0]
    assert np.isnan(failed["acc_mean"].iloc[0])
    assert (runs.loc[runs["status"] == "FINISHED", "error"] == "").all()


def test_load_runs_values_equal_mlflow(store, runs):
    client = MlflowClient(store.tracking_uri)
    parent = client.get_run(store.parent_run_id).data.metrics
    for run_id in store.child_run_ids[:4]:
        row = runs.set_index("run_id").loc[run_id]
        data = client.get_run(run_id).data
        for k, v in data.metrics.items():
            assert row[k] == pytest.approx(v, rel=1e-12), k
        assert row["student.n_layer"] == int(data.params["student.n_layer"])
        assert row["teacher_acc_mean"] == parent["teacher_acc_mean"]
    # and they equal what the fixture meant to log (final, not an earlier step's value)
    first = runs.set_index("trial_id").loc["t000"]
    assert first["val_loss"] == pytest.approx(final_metrics(*TRIALS[0])["val_loss"])


def test_load_sweep_and_bad_experiment(store):
    sweep = analysis.load_sweep(store.tracking_uri, store.experiment)
    assert sweep.run_id == store.parent_run_id
    assert sweep.params["objectives"].startswith("acc_mean")
    assert set(sweep.teacher) >= {"acc_mean", "params", "latency_ms_per_token"}
    old = analysis.load_runs(store.tracking_uri, store.experiment, store.old_parent_run_id)
    assert len(old) == 1
    with pytest.raises(LookupError, match="no MLflow experiment 'nope'.*pareto"):
        analysis.load_runs(store.tracking_uri, "nope")


def test_learning_curves(store, runs):
    curves = analysis.learning_curves(store.tracking_uri, runs["run_id"], "val_loss")
    steps = curves.groupby("run_id")["step"].apply(list)
    assert steps[store.child_run_ids[0]] == [100, 200, 300]
    assert steps[store.failed_run_id] == [100, 200]  # failed before its last evaluation
    last = curves[curves["step"] == 300].set_index("run_id")["value"]
    assert last[store.child_run_ids[0]] == pytest.approx(final_metrics(*TRIALS[0])["val_loss"])


# --------------------------------------------------------------- front vs Optuna


def _optuna_front(values: np.ndarray, directions: list[str]) -> set[int]:
    study = optuna.create_study(
        directions=["maximize" if d == "max" else "minimize" for d in directions])
    dist = {}
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(map(float, v)), params={},
                                                  distributions=dist))
    return {t.number for t in study.best_trials}


@pytest.mark.parametrize("directions", [["max", "min"], ["min", "min", "max"],
                                        ["max", "max", "min", "min"]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_front_matches_optuna(directions, seed):
    rng = np.random.default_rng(seed)
    # rounded so that ties and exact duplicates occur, as they do in grid sweeps
    values = np.round(rng.random((40, len(directions))) * 5) / 5
    mine = set(np.flatnonzero(nondominated(values, directions)))
    assert mine == _optuna_front(values, directions)
    assert 0 < len(mine) < len(values)


def test_front_by_hand_and_frame_rules():
    # acc up, params down: (0.5, 10) dominates (0.4, 20) and (0.5, 30); ties stay on front
    df = pd.DataFrame({"acc_mean": [0.5, 0.4, 0.5, 0.9, 0.9, 0.99, np.nan],
                       "params": [10, 20, 30, 100, 100, 1, 1],
                       "status": ["FINISHED"] * 5 + ["FAILED", "FINISHED"]})
    front = pareto_front(df, ["acc_mean", "params"])  # directions from kd.metrics
    assert list(front.index) == [3, 4, 0]  # best acc first; the FAILED and NaN rows ignored
    assert front.attrs["objectives"] == {"acc_mean": "max", "params": "min"}
    flipped = pareto_front(df, {"acc_mean": "min", "params": "max"})
    assert set(flipped.index) == {1, 2, 3, 4}
    with pytest.raises(KeyError, match="latency_ms_per_token"):
        pareto_front(df, ["acc_mean", "latency_ms_per_token"])


# ----------------------------------------------------------- hypervolume vs Optuna


@pytest.mark.parametrize("directions", [["min", "min"], ["max", "min"], ["max", "min", "min"],
                                        ["min", "max", "max", "min"]])
@pytest.mark.parametrize("seed", [0, 1])
def test_hypervolume_matches_optuna(directions, seed):
    from optuna._hypervolume import compute_hypervolume  # private: an upgrade that moves
    # it should fail here loudly rather than silently skip the comparison

    rng = np.random.default_rng(seed)
    values = rng.random((25, len(directions))) * [1, 10, 100, 1000][: len(directions)]
    ref = reference_point(values, directions)
    hv = hypervolume(values, directions, ref)
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    expected = compute_hypervolume(values * sign, ref * sign)
    assert hv.value == pytest.approx(expected, rel=1e-9)
    assert hv.reference == tuple(ref)


def test_hypervolume_by_hand():
    # a staircase (min, min) under (4, 4): widths 1, 1, 1 with heights 1, 2, 3
    assert hypervolume([[1, 3], [2, 2], [3, 1]], ["min", "min"], [4, 4]).value == 6.0
    # the same with the first objective maximised (acc = -x), and shifted
    assert hypervolume([[-1, 3], [-2, 2], [-3, 1]], ["max", "min"], [-4, 4]).value == 6.0
    assert hypervolume([[-3, 3], [-2, 2], [-1, 1]], ["min", "min"], [0, 4]).value == 6.0
    # accurate-but-big and small-but-worse: 0.9 x (3 - 2) + 0.5 x (2 - 1)
    assert hypervolume([[0.9, 2], [0.5, 1]], ["max", "min"], [0.0, 3]).value == \
        pytest.approx(0.9 * 1 + 0.5 * 1)
    # one box, and two overlapping boxes in 3-D: 1*2*3 + 1*2*3 - 1*1*3 (shared slab)
    assert hypervolume([[0, 0, 0]], ["min"] * 3, [1, 2, 3]).value == 6.0
    assert hypervolume([[0, 1, 0], [1, 0, 0]], ["min"] * 3, [2, 2, 3]).value == \
        pytest.approx(2 * 1 * 3 + 2 * 1 * 3 - 1 * 1 * 3)
    # a point that does not dominate the reference adds nothing; dominated points neither
    assert hypervolume([[1, 3], [5, 0], [2, 3.5]], ["min", "min"], [4, 4]).value == 3.0


def test_reference_point_is_worst_padded():
    ref = reference_point([[0.5, 100], [0.9, 300], [0.7, 200]], ["max", "min"], pad=0.1)
    assert ref == pytest.approx([0.5 - 0.04, 300 + 20])
    assert hypervolume([[0.5, 100], [0.9, 300]], ["max", "min"]).reference == \
        pytest.approx((0.46, 320))


# ----------------------------------------------------------------------------- knee


def test_knee_by_hand():
    # normalised sums on this (max acc, min params) front: 1, 0.5, 0.7, 1 -> second point
    front = pd.DataFrame({"acc_mean": [1.0, 0.9, 0.6, 0.0], "params": [10, 4, 3, 0]})
    assert knee(front, {"acc_mean": "max", "params": "min"}).name == 1
    assert knee(pareto_front(front, ["acc_mean", "params"])).name == 1  # via attrs
    with pytest.raises(ValueError, match="empty"):
        knee(front.iloc[:0], ["acc_mean", "params"])


def test_front_and_knee_on_the_store(runs):
    objs = {"acc_mean": "max", "params": "min"}
    front = pareto_front(runs, objs)
    # the biggest student is the most accurate, the smallest the cheapest: both ends
    assert front["trial_id"].iloc[0] == "t009" and front["trial_id"].iloc[-1] == "t006"
    assert set(front["run_id"]) <= set(runs.loc[runs["status"] == "FINISHED", "run_id"])
    assert knee(front)["trial_id"] == "t008"  # 2x64: most of the gain for little size


# ---------------------------------------------------------------------- sensitivity


def test_sensitivity_spread_across_seeds(runs):
    sens = analysis.sensitivity(runs, "loss.temperature", "acc_mean", hold="others")
    assert sens.attrs["held"] == {"loss.kd_weight": 0.5, "student.n_layer": 2,
                                  "student.n_embd": 128}
    assert list(sens["loss.temperature"]) == [1.0, 2.0, 4.0]
    assert list(sens["n"]) == [2, 2, 2] and list(sens["n_seeds"]) == [2, 2, 2]
    two = [final_metrics(2, 128, 2.0, 0.5, s)["acc_mean"] for s in (0, 1)]
    row = sens.set_index("loss.temperature").loc[2.0]
    assert row["mean"] == pytest.approx(np.mean(two))
    assert row["std"] == pytest.approx(np.std(two, ddof=1))
    assert analysis.best_value(sens)["loss.temperature"] == 2.0  # the fixture's optimum

    pooled = analysis.sensitivity(runs, "loss.temperature", "acc_mean")
    assert pooled.set_index("loss.temperature").loc[2.0, "n"] == 8  # every T=2 finisher

    by = analysis.sensitivity(runs, "loss.kd_weight", by="student.n_layer")
    assert set(by["student.n_layer"]) == {1, 2, 4}


def test_size_grid(runs):
    grid = analysis.size_grid(runs, "acc_mean")
    assert list(grid.index) == [1, 2, 4] and list(grid.columns) == [64, 128]
    assert np.isnan(grid.loc[4, 64])  # only the FAILED trial had that shape
    assert grid.loc[1, 64] == pytest.approx(final_metrics(1, 64, 2.0, 0.5, 0)["acc_mean"])
    assert FAILED[:2] == (4, 64)


# -------------------------------------------------------------------------- plots


def test_save_plots_draws_the_frame_it_is_given(store, runs, tmp_path, monkeypatch):
    sweep = analysis.load_sweep(store.tracking_uri, store.experiment)
    curves = analysis.learning_curves(store.tracking_uri, runs["run_id"], "val_loss")
    import mlflow.tracking

    def no_query(*a, **k):
        raise AssertionError("save_plots queried MLflow")

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "search_runs", no_query)
    paths = analysis.save_plots(runs, sweep, tmp_path, curves=curves)
    assert set(paths) == {"acc_vs_params", "acc_vs_latency", "acc_vs_temperature",
                          "acc_vs_kd_weight", "size_heatmap", "learning_curves"}
    for p in paths.values():
        assert p.stat().st_size > 10_000


def test_front_frame_marks_the_front(runs):
    frame = analysis.front_frame(runs, "latency_ms_per_token")
    assert (frame["status"] == "FINISHED").all()
    expected = pareto_front(runs, ["acc_mean", "latency_ms_per_token"])
    assert set(frame.loc[frame["on_front"], "run_id"]) == set(expected["run_id"])
    fig = analysis.plot_front(frame, {"latency_ms_per_token": 2.7, "acc_mean": 0.79})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["dominated", "Pareto front", "teacher"]


def _runs_with_every_state() -> pd.DataFrame:
    rows = [  # run_id, role, status, stopped_step, T, kd_weight, acc_mean, val_loss
        ("a", "trial", "FINISHED", np.nan, 2.0, 0.5, 0.30, 2.0),
        ("b", "trial", "KILLED", 10.0, 8.0, 0.5, 0.10, 3.0),
        ("c", "trial", "FAILED", np.nan, 4.0, 0.5, np.nan, 9.0),
        ("r", "reference", "FINISHED", np.nan, 2.0, 0.0, 0.20, 2.5),
        ("a1", "repeat", "FINISHED", np.nan, 2.0, 0.5, 0.28, 2.1),
    ]
    df = pd.DataFrame(rows, columns=["run_id", "role", "status", "stopped_step", "loss.temperature",
                                     "loss.kd_weight", "acc_mean", "val_loss"])
    df["trial_id"], df["train.steps"], df["train.seed"] = df["run_id"], 20, [0, 0, 0, 0, 1]
    return df


def test_knob_frame_has_every_trial_marked_for_what_it_is():
    df = _runs_with_every_state()
    frame = analysis.knob_frame(df, "loss.temperature")
    assert list(frame["run_id"]) == ["a", "b", "c", "a1"], "every searched run; the reference has no temperature"
    assert list(frame["state"]) == ["finished", "stopped", "failed", "finished"]
    assert frame["acc_mean"].isna().tolist() == [False, False, True, False], "accuracy where evaluated"
    assert frame["val_loss"].notna().all() and list(frame["step"]) == [20, 10, 20, 20]
    assert "r" in set(analysis.knob_frame(df, "loss.kd_weight")["run_id"]), "the reference sits at kd_weight 0"
    sens = analysis.sensitivity(df, "loss.temperature", "acc_mean")
    assert sens.set_index("loss.temperature").loc[2.0, "n"] == 2, "seed repeats pooled, the reference not"
    fig = analysis.plot_knob(frame, sens, reference=(0.2, 0.01))
    top, bottom = fig.axes
    assert len(top.collections) >= 2 and len(bottom.collections) == 3  # finished, stopped / and failed below
    assert "early-stopped (at its step)" in [t.get_text() for t in top.get_legend().get_texts()]


def test_run_label_names_a_ce_only_run_without_its_unused_temperature():
    run_label = analysis.run_label
    kd = pd.Series({"student.n_layer": 2, "student.n_embd": 128, "loss.temperature": 2.0, "loss.kd_weight": 0.5,
                    "train.seed": 1}, dtype=object)  # a row of the runs frame: ints stay ints
    assert run_label(kd) == "2x128 T=2 w=0.5 s=1" and run_label(kd, seed=False) == "2x128 T=2 w=0.5"
    ce = kd.copy()
    ce["loss.kd_weight"] = 0.0
    assert run_label(ce) == "2x128 CE only s=1" and run_label(ce, seed=False) == "2x128 CE only"
