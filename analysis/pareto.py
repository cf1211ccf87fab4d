"""Pareto front, hypervolume and knee over a frame of trials; plain numpy and pandas.

Conventions (the same as Optuna's ``study.best_trials``): a point dominates another when
it is no worse in every objective and strictly better in at least one; equal points do
not dominate each other, so duplicates are all on the front. Internally every objective
is turned into a loss to minimise (``max`` objectives are negated).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kd.metrics import direction as metric_direction

Objectives = Mapping[str, str] | Sequence[str]


def objective_directions(objectives: Objectives) -> dict[str, str]:
    """``{"acc_mean": "max", ...}`` from a mapping or a list of metric names.

    Names without a direction take theirs from :mod:`kd.metrics`.
    """
    if isinstance(objectives, str):
        objectives = [objectives]
    if isinstance(objectives, Mapping):
        items = list(objectives.items())
    else:
        items = [(name, None) for name in objectives]
    out = {}
    for name, d in items:
        d = d or metric_direction(name)
        if d not in ("max", "min"):
            raise ValueError(f"direction for {name!r} is {d!r}; expected 'max' or 'min'")
        out[name] = d
    if not out:
        raise ValueError("no objectives given")
    return out


def _as_loss(points, directions: Sequence[str]) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != len(directions):
        raise ValueError(f"points of shape {pts.shape} do not match {len(directions)} "
                         "directions")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return pts * sign


def nondominated(points, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the points no other point dominates. ``points``: (n, m)."""
    loss = _as_loss(points, directions)
    n = len(loss)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        no_worse = np.all(loss <= loss[i], axis=1)
        better = np.any(loss < loss[i], axis=1)
        mask[i] = not np.any(no_worse & better)
    return mask


def _eligible(df: pd.DataFrame, names: Iterable[str]) -> pd.Series:
    names = list(names)
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise KeyError(f"objective(s) {missing} not in the runs; metric columns there: "
                       f"{', '.join(c for c in df.columns if c not in ('run_id',))}")
    ok = np.isfinite(df[names].to_numpy(dtype=float)).all(axis=1)
    if "status" in df.columns:
        ok &= (df["status"] == "FINISHED").to_numpy()
    return pd.Series(ok, index=df.index)


def pareto_mask(df: pd.DataFrame, objectives: Objectives) -> pd.Series:
    """True for the rows on the Pareto front; False for dominated, failed or NaN rows."""
    dirs = objective_directions(objectives)
    ok = _eligible(df, dirs)
    out = pd.Series(False, index=df.index)
    if ok.any():
        sub = df.loc[ok, list(dirs)].to_numpy(dtype=float)
        out[ok] = nondominated(sub, list(dirs.values()))
    return out


def pareto_front(df: pd.DataFrame, objectives: Objectives = ("acc_mean", "params")
                 ) -> pd.DataFrame:
    """The non-dominated rows of ``df`` (finished, with every objective finite).

    Args:
        df: a frame from :func:`analysis.load_runs` (any frame with the objective columns).
        objectives: ``{"acc_mean": "max", "params": "min"}`` or names whose directions
            come from :mod:`kd.metrics`.

    Returns:
        The front's rows, sorted by the objectives in order (best first), with
        ``attrs["objectives"]`` set to the directions used.
    """
    dirs = objective_directions(objectives)
    front = df[pareto_mask(df, dirs)]
    front = front.sort_values(list(dirs), ascending=[d == "min" for d in dirs.values()],
                              kind="stable")
    front.attrs = {**df.attrs, "objectives": dirs}
    return front


def reference_point(points, directions: Sequence[str], pad: float = 0.1) -> np.ndarray:
    """The worst observed value per objective, moved ``pad`` x its range further out.

    Where an objective's range is zero the pad is ``pad`` x its magnitude (or ``pad``).
    """
    pts = np.asarray(points, dtype=float)
    worst = np.array([pts[:, j].min() if d == "max" else pts[:, j].max()
                      for j, d in enumerate(directions)])
    span = pts.max(axis=0) - pts.min(axis=0)
    span = np.where(span > 0, span, np.where(worst != 0, np.abs(worst), 1.0))
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return worst + sign * pad * span


def _hv_loss(loss: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of minimisation points below ``ref``, by slicing the last axis."""
    loss = loss[np.all(loss < ref, axis=1)]  # points on or beyond the boundary add nothing
    if len(loss) == 0:
        return 0.0
    if loss.shape[1] == 1:
        return float(ref[0] - loss[:, 0].min())
    loss = loss[nondominated(loss, ["min"] * loss.shape[1])]
    loss = loss[np.argsort(loss[:, -1], kind="stable")]
    total = 0.0
    for i in range(len(loss)):
        upper = loss[i + 1, -1] if i + 1 < len(loss) else ref[-1]
        if upper > loss[i, -1]:  # the slab [z_i, z_{i+1}) is covered by points 0..i
            total += (upper - loss[i, -1]) * _hv_loss(loss[: i + 1, :-1], ref[:-1])
    return total


@dataclass(frozen=True)
class Hypervolume:
    """A hypervolume and the reference point it was measured from (same units)."""

    value: float
    reference: tuple[float, ...]
    directions: tuple[str, ...]


def hypervolume(points, directions: Sequence[str], reference=None, pad: float = 0.1
                ) -> Hypervolume:
    """The volume of objective space dominated by ``points`` and bounded by ``reference``.

    Args:
        points: (n, m) objective values in their own units (a DataFrame works).
        directions: ``"max"``/``"min"`` per column.
        reference: the bounding point in the same units; by default
            :func:`reference_point` (worst observed, padded by 10% of the range). Points
            that do not dominate it contribute nothing.

    Returns:
        :class:`Hypervolume` with the value and the reference point used.
    """
    directions = list(directions)
    loss = _as_loss(points, directions)
    if reference is None:
        reference = reference_point(points, directions, pad)
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (len(directions),):
        raise ValueError(f"reference {reference!r} needs {len(directions)} values")
    ref_loss = _as_loss(ref[None, :], directions)[0]
    value = _hv_loss(loss, ref_loss) if len(loss) else 0.0
    return Hypervolume(float(value), tuple(float(r) for r in ref), tuple(directions))


def knee(front: pd.DataFrame, objectives: Objectives | None = None) -> pd.Series:
    """The knee of a front: the best compromise, the point with the smallest sum of
    normalised objectives.

    Each objective is scaled to [0, 1] over the front (0 = best). For two objectives the
    extremes then sit at (0, 1) and (1, 0), and the smallest sum is the point farthest
    below the chord joining them: the classic knee. Ties go to the first row.
    """
    dirs = objective_directions(objectives or front.attrs.get("objectives") or {})
    if front.empty:
        raise ValueError("the front is empty: no finished run has every objective")
    loss = _as_loss(front[list(dirs)].to_numpy(dtype=float), list(dirs.values()))
    lo, hi = loss.min(axis=0), loss.max(axis=0)
    norm = (loss - lo) / np.where(hi > lo, hi - lo, 1.0)
    return front.iloc[int(np.argmin(norm.sum(axis=1)))]
