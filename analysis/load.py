"""MLflow -> pandas: one row per trial of a sweep, in the layout of kd/CONTRACTS.md.

Reads only MLflow (no torch, no Ray). Params come back from MLflow as strings; they are
typed here from the config's declared types (``kd.config.flat_keys``) where the key is a
config key, and inferred (int, float, bool, else str) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Columns every frame from :func:`load_runs` has, before the params and metrics.
RUN_COLUMNS = ("run_id", "run_name", "trial_id", "role", "status", "error", "stopped_step",
               "parent_run_id", "start_time", "end_time")


@dataclass
class Sweep:
    """The parent run of a sweep: its id, params and the teacher's metrics."""

    run_id: str
    experiment_id: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, float] = field(default_factory=dict)
    """The parent's ``teacher_*`` metrics with the prefix removed."""
    verdict: str = ""
    """The sentence the sweep ended with (tag ``kd.verdict``; see kd.sweep.results)."""
    region: tuple[str, float, float] | None = None
    """(knob, low, high): the values of the one searched knob whose runs cannot be told
    apart from the best (tag ``kd.best_region_knob``, metrics ``best_region_low/high``)."""


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):  # MLflow would create an empty store
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {tracking_uri!r} ({path} does not "
                                    "exist); check the sweep's output directory")

    return MlflowClient(tracking_uri=tracking_uri)


def _search(client, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_id(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:  # an id works too
            exp = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - mlflow raises several kinds for a bad id
            exp = None
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"no MLflow experiment {experiment!r} in this store; "
                          f"experiments there: {', '.join(names) or '(none)'}")
    return exp.experiment_id


def load_sweep(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> Sweep:
    """The sweep's parent run: the given one, else the most recently started one.

    A parent run is one tagged ``kd.role=sweep``. An experiment that holds several
    sweeps (the same sweep run twice) is read one sweep at a time.
    """
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment)
    if parent_run_id is None:
        parents = _search(client, exp_id, "tags.`kd.role` = 'sweep'")
        if not parents:
            raise LookupError(f"experiment {experiment!r} has no sweep parent run "
                              "(a run tagged kd.role=sweep); was it written by kd.tracking?")
        parent = max(parents, key=lambda r: r.info.start_time or 0)
    else:
        parent = client.get_run(parent_run_id)
    teacher = {k.removeprefix("teacher_"): float(v) for k, v in parent.data.metrics.items()
               if k.startswith("teacher_")}
    params = {k: _parse_value(v) for k, v in parent.data.params.items()}
    knob, m = parent.data.tags.get("kd.best_region_knob"), parent.data.metrics
    region = (knob, float(m["best_region_low"]), float(m["best_region_high"])) \
        if knob and {"best_region_low", "best_region_high"} <= set(m) else None
    return Sweep(run_id=parent.info.run_id, experiment_id=exp_id,
                 name=parent.info.run_name or "", params=params, teacher=teacher,
                 verdict=parent.data.tags.get("kd.verdict", ""), region=region)


def load_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
              sweep: Sweep | None = None) -> pd.DataFrame:
    """One row per trial (child run) of a sweep, with typed params and final metrics.

    Args:
        tracking_uri: e.g. ``sqlite:///runs/pareto/mlflow.db`` or ``http://127.0.0.1:5000``.
        experiment: the experiment's name (the sweep's name) or id.
        parent_run_id: which sweep; default the latest parent run in the experiment.
        sweep: an already loaded :class:`Sweep` (saves a query).

    Returns:
        Columns ``run_id, run_name, trial_id, role (trial|reference|repeat), status, error,
        stopped_step (NaN unless ASHA stopped it), parent_run_id, start_time, end_time``, then one column per param under its MLflow key (``loss.temperature``,
        ``student.n_layer``, ...), typed, then one column per metric (its final, i.e.
        latest-step value; NaN where a run never logged it, e.g. a failed trial), then the
        parent's teacher metrics as constant ``teacher_*`` columns. Sorted by start time.
        ``df.attrs`` holds ``parent_run_id``, ``experiment_id``, ``tracking_uri``.
    """
    client = _client(tracking_uri)
    sweep = sweep or load_sweep(tracking_uri, experiment, parent_run_id)
    children = _search(client, sweep.experiment_id,
                       f"tags.`mlflow.parentRunId` = '{sweep.run_id}'")
    rows, param_keys, metric_keys = [], {}, {}
    for run in children:
        tags = run.data.tags
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "trial_id": tags.get("kd.trial_id", ""),
            "role": tags.get("kd.role", "trial"),
            "status": run.info.status,
            "error": tags.get("kd.error", ""),
            # an early-stopped trial: KILLED, evaluated at the step it reached
            "stopped_step": float(tags["kd.stopped_step"]) if "kd.stopped_step" in tags else np.nan,
            "parent_run_id": sweep.run_id,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
            "end_time": (pd.to_datetime(run.info.end_time, unit="ms", utc=True)
                         if run.info.end_time else pd.NaT),
        }
        for k, v in run.data.params.items():
            param_keys[k] = None
            row[("p", k)] = v
        for k, v in run.data.metrics.items():
            metric_keys[k] = None
            row[("m", k)] = float(v)
        rows.append(row)

    data: dict[str, Any] = {c: [r[c] for r in rows] for c in RUN_COLUMNS}
    for k in sorted(param_keys):
        data[k] = _typed_param(k, [r.get(("p", k)) for r in rows])
    for k in sorted(metric_keys):
        if k in data:  # a param and a metric of the same name: keep both, say which
            data[f"metric.{k}"] = data.pop(k)
        data[k] = np.array([r.get(("m", k), np.nan) for r in rows], dtype=float)
    for k, v in sorted(sweep.teacher.items()):
        data[f"teacher_{k}"] = np.full(len(rows), v, dtype=float)
    df = pd.DataFrame(data)
    df = df.sort_values("start_time", kind="stable").reset_index(drop=True)
    df.attrs.update(parent_run_id=sweep.run_id, experiment_id=sweep.experiment_id,
                    tracking_uri=tracking_uri)
    return df


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Only the trials whose status is FINISHED (trained to the full budget)."""
    return df[df["status"] == "FINISHED"]


def evaluated(df: pd.DataFrame) -> pd.DataFrame:
    """Finished trials and early-stopped ones (evaluated at the step they reached)."""
    stopped = df["stopped_step"].notna() if "stopped_step" in df.columns else False
    return df[(df["status"] == "FINISHED") | stopped]


def searched(df: pd.DataFrame) -> pd.DataFrame:
    """The searched trials and their seed repeats, without the CE-only references."""
    return df[df["role"] != "reference"] if "role" in df.columns else df


def learning_curves(tracking_uri: str, run_ids, metric: str = "val_loss") -> pd.DataFrame:
    """The logged history of one metric for some runs: columns ``run_id, step, value``.

    Where a step was logged twice (an evaluation and then the final metrics at the same
    step) the later value is kept.
    """
    client = _client(tracking_uri)
    rows = []
    for run_id in run_ids:
        for m in client.get_metric_history(run_id, metric):
            rows.append((run_id, int(m.step), m.timestamp, float(m.value)))
    df = pd.DataFrame(rows, columns=["run_id", "step", "timestamp", "value"])
    df = (df.sort_values(["run_id", "step", "timestamp"], kind="stable")
            .drop_duplicates(["run_id", "step"], keep="last")
            .drop(columns="timestamp").reset_index(drop=True))
    df["step"] = df["step"].astype("int64")
    return df


# ------------------------------------------------------------------------ typing params


def _parse_value(text: str | None) -> Any:
    """Best-effort typing of one MLflow param string: int, float, bool, else str."""
    if text is None:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("True", "False", "true", "false"):
        return text.lower() == "true"
    return text


def _config_types() -> dict[str, type]:
    try:
        from kd.config import flat_keys
    except ImportError:  # analysis used outside the project: infer everything
        return {}
    return flat_keys()


def _typed_param(key: str, values: list[str | None]) -> pd.Series | np.ndarray | list:
    """Type one param column; missing values stay missing."""
    tp = _config_types().get(key)
    present = [v for v in values if v is not None]
    if tp is None:  # infer one type for the whole column
        parsed = [_parse_value(v) for v in present]
        if parsed and all(isinstance(p, bool) for p in parsed):
            tp = bool
        elif parsed and all(isinstance(p, int) and not isinstance(p, bool) for p in parsed):
            tp = int
        elif parsed and all(isinstance(p, (int, float)) and not isinstance(p, bool)
                            for p in parsed):
            tp = float
        else:
            tp = str
    try:
        if tp is bool:
            col = [None if v is None else v.lower() in ("true", "1", "yes") for v in values]
            return pd.array(col, dtype="boolean") if None in col else np.array(col, dtype=bool)
        if tp is int:
            col = [None if v is None else int(float(v)) for v in values]
            return pd.array(col, dtype="Int64") if None in col else np.array(col, dtype=np.int64)
        if tp is float:
            return np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    except ValueError:
        pass  # a value that does not fit the declared type: keep the text
    return pd.array(values, dtype="string")
