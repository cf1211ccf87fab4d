"""Thin matplotlib functions that draw frames computed elsewhere, and ``save_plots``.

Figures are built with ``matplotlib.figure.Figure`` (Agg), never pyplot, so nothing
opens a window, nothing leaks between calls, and a notebook can display the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.load import Sweep, finished, learning_curves
from analysis.pareto import objective_directions, pareto_mask
from analysis.knobs import knob_frame, sensitivity, size_grid
from kd.metrics import METRICS

FRONT_COLOR, DOMINATED_COLOR, TEACHER_COLOR = "#1f77b4", "#9e9e9e", "#d62728"


def _label(name: str) -> str:
    unit = METRICS[name.removeprefix("teacher_")].unit if name.removeprefix(
        "teacher_") in METRICS else ""
    return f"{name} ({unit})" if unit and unit not in ("fraction", "count") else name


def run_label(row: pd.Series, seed: bool = True) -> str:
    """A short name for a trial: ``2x128 T=2 w=0.5 s=0`` (from the params it has); a
    CE-only run (``w=0``, where the temperature plays no part) reads ``2x128 CE only s=0``."""
    parts = []
    if "student.n_layer" in row and "student.n_embd" in row:
        parts.append(f"{row['student.n_layer']}x{row['student.n_embd']}")
    ce_only = "loss.kd_weight" in row and pd.notna(row["loss.kd_weight"]) and float(row["loss.kd_weight"]) == 0.0
    keys = (("train.seed", "s"),) if ce_only else (("loss.temperature", "T"), ("loss.kd_weight", "w"), ("train.seed", "s"))
    if ce_only:
        parts.append("CE only")
    for key, short in keys:
        if key in row and pd.notna(row[key]) and (seed or key != "train.seed"):
            parts.append(f"{short}={row[key]:g}")
    return " ".join(parts) or str(row.get("trial_id") or row["run_id"][:8])


def front_frame(df: pd.DataFrame, x: str, y: str = "acc_mean") -> pd.DataFrame:
    """Finished runs with finite ``x`` and ``y``, plus an ``on_front`` column for (x, y)."""
    dirs = objective_directions([y, x])
    runs = finished(df)
    runs = runs[np.isfinite(runs[[x, y]].to_numpy(dtype=float)).all(axis=1)].copy()
    runs["on_front"] = pareto_mask(runs, dirs)
    runs.attrs = {**df.attrs, "objectives": dirs, "x": x, "y": y}
    return runs


def plot_front(frame: pd.DataFrame, teacher: dict[str, float] | None = None,
               logx: bool | None = None) -> Figure:
    """Scatter of a :func:`front_frame`: the front joined and highlighted, the rest faded,
    the teacher (``teacher[x]``, ``teacher[y]``) as a star."""
    x, y = frame.attrs["x"], frame.attrs["y"]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    dom, front = frame[~frame["on_front"]], frame[frame["on_front"]].sort_values(x)
    ax.scatter(dom[x], dom[y], color=DOMINATED_COLOR, alpha=0.35, s=28, label="dominated")
    ax.plot(front[x], front[y], "-o", color=FRONT_COLOR, ms=7, lw=1.5, label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(run_label(row), (row[x], row[y]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if teacher and x in teacher and y in teacher:
        ax.scatter([teacher[x]], [teacher[y]], marker="*", s=220, color=TEACHER_COLOR,
                   zorder=5, label="teacher")
    if logx if logx is not None else x in ("params", "params_non_embedding", "flops_per_token"):
        ax.set_xscale("log")
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.set_title(f"{y} vs {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_sensitivity(sens: pd.DataFrame, teacher: dict[str, float] | None = None) -> Figure:
    """Mean +- std across seeds of a :func:`sensitivity` frame, one line per ``by`` group."""
    param, metric, by = sens.attrs["param"], sens.attrs["metric"], sens.attrs["by"]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    groups = sens.groupby(by, sort=True) if by else [((), sens)]
    for key, g in groups:
        name = ", ".join(f"{b}={k}" for b, k in zip(by, np.atleast_1d(key))) or metric
        ax.errorbar(g[param], g["mean"], yerr=g["std"].fillna(0.0), marker="o", capsize=3,
                    label=f"{name} (n_seeds max {int(g['n_seeds'].max())})")
        ax.fill_between(g[param], g["min"], g["max"], alpha=0.12)
    if teacher and metric in teacher:
        ax.axhline(teacher[metric], color=TEACHER_COLOR, ls="--", lw=1, label="teacher")
    ax.set_xlabel(param)
    ax.set_ylabel(_label(metric))
    held = ", ".join(f"{k}={v}" for k, v in sens.attrs.get("held", {}).items())
    ax.set_title(f"{metric} vs {param}" + (f"\n(at {held})" if held else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_knob(frame: pd.DataFrame, sens: pd.DataFrame | None = None,
              reference: tuple[float, float] | None = None, teacher: dict[str, float] | None = None,
              region: tuple[float, float] | None = None) -> Figure:
    """Every trial of a :func:`knob_frame` against its knob, in two panels.

    Top: the metric of each evaluated trial (filled: trained to the full budget; hollow:
    early-stopped, evaluated at the step it reached), the mean +- seed std of each value
    from ``sens`` where there are repeats, the CE-only ``reference`` (mean, std) as a band,
    and the best ``region`` (low, high: values whose runs cannot be told apart from the
    best) shaded. Bottom: validation loss at the last step each trial reached, for every trial.
    """
    param, metric = frame.attrs["param"], frame.attrs["metric"]
    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    styles = {"finished": dict(edgecolors=FRONT_COLOR, marker="o", facecolors=FRONT_COLOR),
              "stopped": dict(edgecolors=DOMINATED_COLOR, marker="o", facecolors="none")}
    for state, g in frame.groupby("state"):
        style = styles.get(state, dict(color=TEACHER_COLOR, marker="x"))  # failed, interrupted
        label = {"finished": "finished", "stopped": "early-stopped (at its step)"}.get(state, state)
        ok = g[np.isfinite(g[metric].to_numpy(dtype=float))]
        if len(ok):
            top.scatter(ok[param], ok[metric], s=36, label=label, zorder=3, **style)
        loss = g[np.isfinite(g["val_loss"].to_numpy(dtype=float))]
        if len(loss):
            bottom.scatter(loss[param], loss["val_loss"], s=30, label=label, **style)
    if sens is not None and len(sens) and (sens["n"] > 1).any():
        rep = sens[sens["n"] > 1]
        # These pool every seed of the value, the searched run's too, which the search
        # picked for being high; the verdict tests the seeds run after the pick alone.
        top.errorbar(rep[param], rep["mean"], yerr=rep["std"].fillna(0.0), fmt="s", color="k", capsize=4,
                     ms=5, label="mean +- std over seeds (the searched one included)", zorder=4)
    if reference is not None and np.isfinite(reference[0]):
        mean, std = reference
        top.axhline(mean, color="#2ca02c", ls="--", lw=1, label="CE-only reference")
        if np.isfinite(std) and std > 0:
            top.axhspan(mean - std, mean + std, color="#2ca02c", alpha=0.12)
    if teacher and metric in teacher:
        top.axhline(teacher[metric], color=TEACHER_COLOR, ls=":", lw=1, label="teacher")
    if region is not None:
        for ax in (top, bottom):
            label = "best region (not behind the best)" if ax is top else None
            if region[0] < region[1]:
                ax.axvspan(region[0], region[1], color="#ff7f0e", alpha=0.10, lw=0, label=label)
            else:  # the best alone: a span would have no width
                ax.axvline(region[0], color="#ff7f0e", alpha=0.5, lw=3, label=label)
    if param in ("loss.temperature",):
        top.set_xscale("log")
    top.set_ylabel(_label(metric))
    bottom.set_ylabel("val_loss at last step reached")
    bottom.set_xlabel(param)
    top.set_title(f"{metric} vs {param}: all {len(frame)} trials")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
    return fig


def plot_heatmap(grid: pd.DataFrame) -> Figure:
    """A :func:`size_grid` as a depth x width heatmap, each cell annotated."""
    fig = Figure(figsize=(5.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    values = grid.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", origin="lower",
                   aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index])
    lo, hi = np.nanmin(values), np.nanmax(values)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):  # dark text on the bright end of viridis, light on the dark end
            bright = hi > lo and (v - lo) / (hi - lo) > 0.6
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9,
                    color="k" if bright else "w")
    ax.set_xlabel(grid.attrs.get("cols", grid.columns.name))
    ax.set_ylabel(grid.attrs.get("rows", grid.index.name))
    ax.set_title(f"{grid.attrs.get('agg', '')} {grid.attrs.get('metric', '')} "
                 "by depth x width".strip())
    fig.colorbar(im, ax=ax)
    return fig


def plot_learning_curves(curves: pd.DataFrame, labels: dict[str, str] | None = None,
                         metric: str = "val_loss") -> Figure:
    """One line per run of a :func:`analysis.learning_curves` frame."""
    fig = Figure(figsize=(8.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for run_id, g in curves.groupby("run_id", sort=False):
        ax.plot(g["step"], g["value"], marker=".", lw=1.2,
                label=(labels or {}).get(run_id, run_id[:8]))
    ax.set_xlabel("step")
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{metric} during training")
    ax.grid(alpha=0.3)
    if curves["run_id"].nunique() <= 24:  # beyond that a legend hides more than it tells
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _varies(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and finished(df)[col].nunique(dropna=True) > 1


def save_plots(df: pd.DataFrame, sweep: Sweep, out_dir: str | Path,
               curves: pd.DataFrame | None = None) -> dict[str, Path]:
    """Draw every plot the sweep's frame supports and write PNGs (MLflow is not queried).

    Args:
        df: the sweep's runs (:func:`analysis.load_runs`); sweep: its parent
            (:func:`analysis.load_sweep`); curves: :func:`analysis.learning_curves` of
            ``val_loss``, if a learning-curve plot is wanted.

    Front plots need ``acc_mean`` with ``params`` / ``latency_ms_per_token``; the
    temperature and kd_weight plots need two or more values of the knob; the heatmap needs
    depth or width to vary.

    Returns:
        ``{"acc_vs_params": Path(...), ...}`` for the files written, under ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Figure] = {}
    for x, name in (("params", "acc_vs_params"), ("latency_ms_per_token", "acc_vs_latency")):
        if {x, "acc_mean"} <= set(df.columns) and len(front_frame(df, x)):
            figs[name] = plot_front(front_frame(df, x), sweep.teacher)
    ref = _reference(df, "acc_mean")
    for param, name in (("loss.temperature", "acc_vs_temperature"),
                        ("loss.kd_weight", "acc_vs_kd_weight")):
        if _varies(df, param) and "acc_mean" in df.columns:
            sens = sensitivity(df, param, "acc_mean", hold="others")
            region = sweep.region[1:] if sweep.region and sweep.region[0] == param else None
            figs[name] = plot_knob(knob_frame(df, param), sens,
                                   None if param == "loss.kd_weight" else ref, sweep.teacher, region)
    if (_varies(df, "student.n_layer") or _varies(df, "student.n_embd")) \
            and "acc_mean" in df.columns:
        figs["size_heatmap"] = plot_heatmap(size_grid(df, "acc_mean"))
    if curves is not None and len(curves):
        labels = {r["run_id"]: run_label(r) for _, r in df.iterrows()}
        figs["learning_curves"] = plot_learning_curves(curves, labels)
    paths = {}
    for name, fig in figs.items():
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
    return paths


def _reference(df: pd.DataFrame, metric: str) -> tuple[float, float] | None:
    """(mean, std over seeds) of the CE-only reference runs, if the sweep has any."""
    if "role" not in df.columns or metric not in df.columns:
        return None
    ref = finished(df[df["role"] == "reference"])[metric].dropna()
    if not len(ref):
        return None
    return float(ref.mean()), float(ref.std()) if len(ref) > 1 else float("nan")
