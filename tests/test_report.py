"""kd report (analysis.report, analysis.commands): the report folder's numbers are MLflow's, and the CLI wiring."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.metrics import direction
from analysis.commands import add_parser, main, resolve_store
from analysis.report import fmt, parse_objectives

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_fixture import build_store  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.getbasetemp() / "mlflow_store")


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    from analysis.report import write_report

    path = write_report(store.tracking_uri, store.experiment, out)
    return path


def tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Each Markdown table of the report as rows of {header: cell}, keyed by its section."""
    out, section, lines = {}, "", md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                cells = [c.strip() for c in lines[j].strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                j += 1
            out[section] = rows
    return out


def same(cell: str, value: float) -> bool:
    return cell == fmt(value) or float(cell) == pytest.approx(value, rel=5e-6)


def test_report_files(report, store):
    out = report.parent
    assert report.name == "report.md" and (out / "report.html").is_file()
    md = report.read_text()
    for img in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / img).stat().st_size > 10_000, img
    assert "plots/acc_vs_params.png" in md and "plots/acc_vs_temperature.png" in md
    page = (out / "report.html").read_text()
    for run_id in re.findall(r"\b[0-9a-f]{32}\b", md):
        assert run_id in page
    logged = {Path(a.path).name for a in
              MlflowClient(store.tracking_uri).list_artifacts(store.parent_run_id, "report")}
    assert logged == {"report.md", "report.html"}


def test_best_student_per_objective_is_mlflows(report, store):
    client = MlflowClient(store.tracking_uri)
    children = client.search_runs(
        [store.experiment_id], f"tags.`mlflow.parentRunId` = '{store.parent_run_id}' "
        "and attributes.status = 'FINISHED'")
    teacher = client.get_run(store.parent_run_id).data.metrics["teacher_acc_mean"]
    best = tables(report.read_text())["Best student per objective"]
    assert [r["objective"] for r in best][:3] == ["acc_mean", "params", "latency_ms_per_token"]
    for row in best:
        name = row["objective"]
        values = {r.info.run_id: r.data.metrics[name] for r in children}
        pick = max if direction(name) == "max" else min
        winner = pick(values, key=values.get)
        assert row["run_id"] == winner, name
        assert same(row["best"], values[winner]), name
        metrics = client.get_run(winner).data.metrics
        assert same(row["acc_mean"], metrics["acc_mean"])
        assert row["params"] == str(int(metrics["params"]))
        assert same(row["retention"], metrics["retention"])
        assert metrics["retention"] == pytest.approx(metrics["acc_mean"] / teacher)
        # The winner is one draw: the row also gives its configuration's mean and spread over seeds.
        params = client.get_run(winner).data.params
        config = {k: v for k, v in params.items() if k != "train.seed"}
        seeds = [r.data.metrics[name] for r in children
                 if {k: v for k, v in r.data.params.items() if k != "train.seed"} == config]
        if len(seeds) > 1:
            mean, std = statistics.fmean(seeds), statistics.stdev(seeds)
            assert row["its configuration's seeds"] == f"{fmt(mean, name)} ± {fmt(std, name)} ({len(seeds)} seeds)"
        else:
            assert row["its configuration's seeds"] == "1 seed: spread unknown"


def test_best_row_gives_the_winners_configuration_over_its_seeds():
    """The best run is its configuration's luckiest draw: the row adds that configuration's
    mean and spread over seeds, and says so when it ran with one seed."""
    import pandas as pd

    from analysis.report import _best_rows

    df = pd.DataFrame({"status": ["FINISHED"] * 4 + ["FAILED"], "trial_id": list("abcde"),
                       "run_id": [c * 32 for c in "abcde"], "loss.temperature": [2.0, 2.0, 2.0, 4.0, 2.0],
                       "train.seed": [0, 1, 2, 0, 3], "acc_mean": [0.70, 0.60, 0.62, 0.65, 0.99],
                       "params": [10.0, 10.0, 10.0, 5.0, 10.0]})
    rows = {r[0]: r for r in _best_rows(df, ["acc_mean", "params"], [], None, ["loss.temperature", "train.seed"])}
    assert rows["acc_mean"][2:5] == ["0.7", f"{fmt(0.64)} ± {fmt(statistics.stdev([0.7, 0.6, 0.62]))} (3 seeds)", "a"]
    assert rows["params"][2:5] == ["5", "1 seed: spread unknown", "d"]


def test_seed_rows_give_the_seeds_after_the_pick_apart():
    """The verdict tests the searched best on its repeats alone (the picked run leans upward):
    the seeds table gives their mean beside the mean over every seed."""
    import pandas as pd

    from analysis.report import _seed_rows

    df = pd.DataFrame({"status": ["FINISHED"] * 6, "trial_id": list("abcdef"),
                       "run_id": [c * 32 for c in "abcdef"],
                       "role": ["trial", "repeat", "repeat", "reference", "reference", "trial"],
                       "loss.temperature": [2.0, 2.0, 2.0, None, None, 4.0],
                       "loss.kd_weight": [0.5, 0.5, 0.5, 0.0, 0.0, 0.5],
                       "train.seed": [0, 1, 2, 0, 1, 0], "acc_mean": [0.70, 0.60, 0.62, 0.5, 0.52, 0.65]})
    rows = {r[1]: r for r in _seed_rows(df, ["acc_mean"], ["loss.temperature", "loss.kd_weight", "train.seed"])}
    assert set(rows) == {"searched", "reference"}  # a one-seed searched configuration has no row
    assert rows["searched"][2:] == ["3", f"{fmt(0.64)} ± {fmt(statistics.stdev([0.7, 0.6, 0.62]))}",
                                    f"{fmt(0.61)} ± {fmt(statistics.stdev([0.6, 0.62]))} (2)"]
    assert rows["reference"][-1] == "-"


def test_report_says_where_the_label_alone_reaches_the_teacher():
    """A "does not beat" verdict means little where the teacher knows no more than the
    labels teach: the report names the task metrics on which CE-only matches or passes it."""
    import pandas as pd

    from analysis.report import _label_catches_teacher

    df = pd.DataFrame({"status": ["FINISHED"] * 4, "trial_id": list("abcd"), "run_id": [c * 32 for c in "abcd"],
                       "role": ["trial", "reference", "reference", "reference"],
                       "em_qa": [0.80, 0.70, 0.74, 0.78], "acc_completion": [0.8, 0.7, 0.7, 0.7],
                       "acc_mean": [0.8, 0.70, 0.72, 0.74]})
    said = _label_catches_teacher(df, {"em_qa": 0.69, "acc_completion": 0.83, "acc_mean": 0.75})
    assert "em_qa 0.74 against the teacher's 0.69" in said and "3 seeds" in said
    assert "acc_completion" not in said and "acc_mean" not in said  # the teacher is ahead on those
    assert _label_catches_teacher(df, {"em_qa": 0.9, "acc_mean": 0.9}) == ""
    assert _label_catches_teacher(df.assign(acc_choice=1.0), {"acc_choice": 1.0, "em_qa": 0.9}) == ""  # a ceiling
    assert _label_catches_teacher(df[df["role"] != "reference"], {"em_qa": 0.1}) == ""  # no reference ran


def test_pareto_table_and_teacher_are_mlflows(report, store):
    client = MlflowClient(store.tracking_uri)
    t = tables(report.read_text())
    front = t["Pareto front (acc_mean max, params min, latency_ms_per_token min)"]
    assert len(front) >= 3 and sum(r["knee"] == "yes" for r in front) == 1
    for row in front:
        data = client.get_run(row["run_id"]).data
        assert data.tags["kd.trial_id"] == row["trial"]
        for k in ("acc_mean", "params", "latency_ms_per_token", "size_mb"):
            assert same(row[k], data.metrics[k]), k
        assert row["student.n_layer"] == data.params["student.n_layer"]
        assert float(row["loss.temperature"]) == float(data.params["loss.temperature"])
        # one run of the front is one draw: the row gives its configuration over its seeds too
        cell = row["acc_mean, its configuration's seeds"]
        assert cell == "1 seed: spread unknown" or re.fullmatch(r"\S+ ± \S+ \(\d+ seeds\)", cell), cell
    # no finished run outside the table dominates one inside it
    ids = {r["run_id"] for r in front}
    others = [r for r in client.search_runs([store.experiment_id],
              f"tags.`mlflow.parentRunId` = '{store.parent_run_id}' and "
              "attributes.status = 'FINISHED'") if r.info.run_id not in ids]
    for o in others:
        m = o.data.metrics
        assert any(float(r["acc_mean"]) >= m["acc_mean"] and int(r["params"]) <= m["params"]
                   and float(r["latency_ms_per_token"]) <= m["latency_ms_per_token"]
                   for r in front), o.info.run_id
    parent = client.get_run(store.parent_run_id).data.metrics
    teacher = {r["metric"]: r["teacher"] for r in t["Teacher (reference)"]}
    assert teacher.keys() == {k.removeprefix("teacher_") for k in parent}
    for k, cell in teacher.items():
        assert same(cell, parent[f"teacher_{k}"]), k
    failed = t["Trials that did not finish"]
    assert [r["run_id"] for r in failed] == [store.failed_run_id]


def test_temperature_table(report):
    rows = tables(report.read_text())["acc_mean vs loss.temperature"]
    assert [r["loss.temperature"] for r in rows] == ["1", "2", "4"]
    assert max(rows, key=lambda r: float(r["mean"]))["loss.temperature"] == "2"
    assert {r["seeds"] for r in rows} == {"2"}


def test_parse_objectives():
    assert parse_objectives("acc_mean:max,params:min") == ["acc_mean", "params"]
    assert parse_objectives("['acc_mean', 'latency_ms_per_token']") == \
        ["acc_mean", "latency_ms_per_token"]
    assert parse_objectives('{"acc_mean": "max", "size_mb": "min"}') == ["acc_mean", "size_mb"]
    assert parse_objectives("[('acc_mean', 'max')]") == ["acc_mean"]
    assert parse_objectives("acc_mean") == ["acc_mean"]


def test_cli_report_and_errors(store, tmp_path, capsys):
    rc = main(["report", store.experiment, "--tracking-uri", store.tracking_uri,
               "--out", str(tmp_path / "r")])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")
    rc = main(["report", "nope", "--tracking-uri", store.tracking_uri])
    assert rc == 2 and "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_add_parser_and_store_resolution(store, tmp_path):
    parser = argparse.ArgumentParser(prog="kd")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui", "--store", str(store.root), "--port", "5123"])
    assert args.func.__name__ == "run_ui" and args.port == 5123
    args = parser.parse_args(["report", "pareto"])
    assert args.func.__name__ == "run_report" and args.tracking_uri is None
    assert resolve_store(str(store.root)) == store.tracking_uri
    assert resolve_store(str(store.root / "mlflow.db")) == store.tracking_uri
    assert resolve_store("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(FileNotFoundError, match="no MLflow store there"):
        resolve_store(str(tmp_path))


def test_report_on_a_sweep_with_no_finished_trial(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("temperature")
    parent = client.create_run(exp, run_name="temperature",
                               tags={"kd.role": "sweep", "kd.sweep": "temperature"})
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id,
                                         "kd.role": "trial", "kd.trial_id": "a"})
    client.log_param(child.info.run_id, "loss.temperature", "2.0")
    client.set_tag(child.info.run_id, "kd.error", "out of memory")
    client.set_terminated(child.info.run_id, "FAILED")
    from analysis.report import write_report

    md = write_report(uri, "temperature", tmp_path / "r").read_text()
    assert "No finished trial." in md and "out of memory" in md
    assert "Pareto front" not in md
    assert mlflow.get_tracking_uri() != uri  # the global tracking URI was left alone


def test_missing_store_is_an_error_not_a_new_store(tmp_path, capsys):
    missing = tmp_path / "typo" / "mlflow.db"
    rc = main(["report", "pareto", "--tracking-uri", f"sqlite:///{missing}"])
    assert rc == 2 and "no MLflow store" in capsys.readouterr().err
    assert not missing.exists()


def test_default_store_is_the_newest_sweep_of_the_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FileNotFoundError, match="no MLflow store found"):
        resolve_store(None, "temperature")
    old = tmp_path / "runs/sweeps/temperature/20261101-000000/mlflow.db"
    new = tmp_path / "runs/sweeps/temperature/20261102-000000/mlflow.db"
    other = tmp_path / "runs/sweeps/pareto/mlflow.db"
    for i, p in enumerate((old, new, other)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    assert resolve_store(None, "temperature") == f"sqlite:///{new.resolve()}"
    assert resolve_store(None) == f"sqlite:///{other.resolve()}"
