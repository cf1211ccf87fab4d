"""How a metric moves with one knob (temperature, kd_weight), every trial at its knob, the size grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.load import evaluated, finished, searched

SEED = "train.seed"
#: The knobs a sweep varies; :func:`sensitivity` can hold the others fixed.
KNOBS = ("loss.temperature", "loss.kd_weight", "student.n_layer", "student.n_embd")


def sensitivity(df: pd.DataFrame, param: str = "loss.temperature", metric: str = "acc_mean",
                by: str | Sequence[str] | None = None, hold: Sequence[str] | str = ()
                ) -> pd.DataFrame:
    """The metric's mean and spread across seeds for each value of ``param``.

    Only finished runs with a finite metric count. Runs that differ in other knobs are
    pooled unless those knobs are named in ``by`` (e.g. ``by="loss.kd_weight"`` gives one
    curve per kd_weight) or in ``hold``: held knobs are fixed at their most common value
    (so a temperature curve is not mixed with students of other sizes); ``hold="others"``
    holds every knob of :data:`KNOBS` except ``param`` and ``by``. If holding leaves fewer
    than two values of ``param``, nothing is held (a random multi-knob sweep rarely repeats
    a setting) and ``attrs["held"]`` is empty.

    Returns:
        One row per (``by`` values, ``param`` value), sorted, with columns ``mean``,
        ``std`` (across runs, ddof=1; NaN for a single run), ``min``, ``max``, ``n`` (runs)
        and ``n_seeds`` (distinct ``train.seed`` values). ``attrs`` holds param, metric, by.
    """
    by = [by] if isinstance(by, str) else list(by or [])
    for col in [param, metric, *by]:
        if col not in df.columns:
            raise KeyError(f"{col!r} is not a column of the runs; columns: "
                           f"{', '.join(map(str, df.columns))}")
    runs = finished(_for_knob(df, param))
    runs = runs[np.isfinite(runs[metric].to_numpy(dtype=float))]
    if hold == "others":
        hold = [k for k in KNOBS if k != param and k not in by and k in runs.columns]
    runs, held = _hold(runs, param, [hold] if isinstance(hold, str) else list(hold))
    keys = [*by, param]
    seeds = runs[SEED] if SEED in runs.columns else pd.Series(0, index=runs.index)
    grouped = runs.assign(_seed=seeds).groupby(keys, sort=True, dropna=False)
    out = grouped[metric].agg(["mean", "std", "min", "max", "count"])
    out["n_seeds"] = grouped["_seed"].nunique()
    out = out.rename(columns={"count": "n"}).reset_index()
    out.attrs = {"param": param, "metric": metric, "by": by, "held": held}
    return out


def _for_knob(df: pd.DataFrame, param: str) -> pd.DataFrame:
    """The CE-only references belong on a kd_weight axis (at 0), on no other knob's."""
    return df if param == "loss.kd_weight" else searched(df)


def knob_frame(df: pd.DataFrame, param: str, metric: str = "acc_mean") -> pd.DataFrame:
    """Every trial at its value of ``param``, for a curve that shows them all.

    Columns: ``run_id, trial_id, role, state`` (finished | stopped | failed | ...),
    ``param``, ``metric`` (where the trial was evaluated: finished, or early-stopped and
    evaluated at ``step``), ``val_loss`` (its last evaluation, for every trial that
    reached one) and ``step`` (where that was).
    """
    rows = _for_knob(df, param)
    rows = rows[rows[param].notna()] if param in rows.columns else rows.iloc[:0]
    ev = rows.index.isin(evaluated(rows).index)
    stopped = rows["stopped_step"].notna() if "stopped_step" in rows.columns else pd.Series(False, rows.index)
    state = np.where(stopped, "stopped", rows["status"].str.lower())
    steps = rows["train.steps"] if "train.steps" in rows.columns else pd.Series(np.nan, rows.index)
    out = pd.DataFrame({
        "run_id": rows["run_id"], "trial_id": rows["trial_id"],
        "role": rows["role"] if "role" in rows.columns else "trial", "state": state,
        param: rows[param].astype(float),
        metric: np.where(ev, rows[metric], np.nan) if metric in rows.columns else np.nan,
        "val_loss": rows["val_loss"] if "val_loss" in rows.columns else np.nan,
        "step": np.where(stopped, rows.get("stopped_step", np.nan), steps),
    }).reset_index(drop=True)
    out.attrs = {"param": param, "metric": metric}
    return out


def _hold(runs: pd.DataFrame, param: str, hold: list[str]) -> tuple[pd.DataFrame, dict]:
    """Fix each knob in ``hold`` at its most common value (ties: the smallest)."""
    sliced, held = runs, {}
    for knob in hold:
        if sliced[knob].nunique() > 1:
            value = sliced[knob].mode().iloc[0]
            sliced = sliced[sliced[knob] == value]
            held[knob] = value.item() if hasattr(value, "item") else value
    if sliced[param].nunique() < 2:
        return runs, {}
    return sliced, held


def best_value(sens: pd.DataFrame, direction: str = "max") -> pd.Series:
    """The row of a :func:`sensitivity` frame with the best mean."""
    idx = sens["mean"].idxmax() if direction == "max" else sens["mean"].idxmin()
    return sens.loc[idx]


def size_grid(df: pd.DataFrame, metric: str = "acc_mean", rows: str = "student.n_layer",
              cols: str = "student.n_embd", agg: str = "mean") -> pd.DataFrame:
    """``metric`` over finished runs for each depth (rows) x width (columns).

    Cells with no run are NaN. Runs of one shape that differ in other knobs or seeds are
    pooled with ``agg`` (``"mean"``; ``"max"`` gives the best found at each size).
    """
    runs = finished(df)
    runs = runs[np.isfinite(runs[metric].to_numpy(dtype=float))]
    grid = runs.pivot_table(index=rows, columns=cols, values=metric, aggfunc=agg)
    grid = grid.sort_index().sort_index(axis=1)
    grid.attrs = {"metric": metric, "rows": rows, "cols": cols, "agg": agg}
    return grid
