"""After the search: read its trials back, pick the finalists, and re-run them with seeds.

Trials come from Tune's public :class:`~ray.tune.ResultGrid` (config, last result, error)
joined with our own MLflow child runs (the status we wrote: FINISHED, FAILED, or KILLED
with ``kd.stopped`` for an early-stopped trial).

The finalists phase runs, as one grid of fixed *variants* (no searcher, no pruning):
the CE-only reference (``loss.kd_weight=0`` at the base config's shape and budget) on the
seeds of :func:`reference_seeds`, and the best configuration (one objective) or every front
member (several) with ``repeats - 1`` more seeds. A sweep that searches kd_weight already
has its CE-only point among the trials: that trial is the reference.
"""

from __future__ import annotations

import re
from typing import Any

from kd.config import KDConfig
from kd.sweep.results import MIN_PAIRS, best_trial, front_trials
from kd.sweep.spec import META, VARIANT, trial_config

MAX_FRONT = 6  # front members re-run with seeds (a large front would double the sweep)
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_")  # grid trials / searcher trials


def _py(v: Any) -> Any:
    """numpy scalars as Python numbers (they go to JSON and back)."""
    return v.item() if hasattr(v, "item") else v


def collect(grid, tracker, parent_id: str, role: str | None) -> list[dict[str, Any]]:
    """One dict per trial of a ResultGrid: trial_id, role, status, run_id, params, seed, shape,
    metrics, error, stopped_step."""
    runs = {r.data.tags.get("kd.trial_id"): r for r in tracker.children(parent_id)}
    out = []
    for result in grid:
        config, last = result.config or {}, dict(result.metrics or {})
        tid = last.get("trial_id")
        if not tid:  # a trial that never reported: its id is in its folder's name
            found = _TRIAL_ID.search(str(result.path or ""))
            tid = found.group(1) if found else ""
        meta, variant = config.get(META, {}), config.get(VARIANT) or {}
        cfg = trial_config(meta.get("base", {}), config)
        values = {**config, **variant.get("overrides", {})}
        run = runs.get(tid)
        status = run.info.status if run is not None else ("FAILED" if result.error else "INTERRUPTED")
        stopped = run.data.tags.get("kd.stopped_step") if run is not None else None
        if status == "KILLED" and stopped is not None:
            status = "STOPPED"
        elif status in ("RUNNING", "KILLED"):
            status = "INTERRUPTED"
        out.append({
            "trial_id": tid, "role": (run.data.tags.get("kd.role") if run is not None else None)
            or variant.get("role") or role or "trial",
            "status": status, "run_id": run.info.run_id if run is not None else None,
            "params": {k: _py(values[k]) for k in meta.get("searched", []) if k in values},
            "seed": cfg.train.seed, "shape": {k: _py(v) for k, v in vars(cfg.student).items()},
            "metrics": {k: float(v) for k, v in last.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "error": (run.data.tags.get("kd.error") if run is not None else None)
            or (str(result.error).splitlines()[0] if result.error else None),
            "stopped_step": int(stopped) if stopped is not None else None,
        })
    return out


def mark_references(trials: list[dict[str, Any]], tracker) -> None:
    """A searched trial with ``loss.kd_weight=0`` is the sweep's CE-only reference."""
    for t in trials:
        if t["role"] == "trial" and t["params"].get("loss.kd_weight") == 0 and t["run_id"]:
            t["role"] = "reference"
            tracker.client.set_tag(t["run_id"], "kd.role", "reference")


def reference_seeds(seed0: int, repeats: int) -> list[int]:
    """The CE-only reference's seeds: those of the finalists' repeats (``seed0 + 1`` to
    ``seed0 + repeats - 1``), and ``seed0`` too while they are fewer than the paired test's
    :data:`~kd.sweep.results.MIN_PAIRS`.

    The verdict pairs the reference with the best's repeats seed by seed; the best's own
    ``seed0`` run is left out of it (the search picked it for scoring high), so the
    reference's ``seed0`` run has no partner. Once the repeats alone give the paired test
    its pairs, the reference runs exactly their seeds: on 2 trial slots, 4 repeats and a
    reference on the same 4 seeds take the 4 waves that 3 repeats and a reference of
    seeds 0-3 took, with 4 pairs instead of 3.
    """
    paired = list(range(seed0 + 1, seed0 + max(repeats, 1)))
    return paired if len(paired) >= MIN_PAIRS else [seed0, *paired]


def variants(trials: list[dict[str, Any]], objectives: list[str], base: KDConfig, *, repeats: int,
             references: bool = True, anchor: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The finalist runs: ``{"role", "of", "overrides"}`` each (JSON, kept in sweep.json).

    ``anchor``: the sweep's first declared point; where the sweep searches the student's
    shape, the reference takes that point's shape (the base config's default shape would
    be arbitrary).
    """
    seed0 = base.train.seed
    shape = {k: v for k, v in (anchor or {}).items() if k.startswith("student.")}
    out: list[dict[str, Any]] = []
    if references:
        done = [t for t in trials if t["role"] == "reference" and t["status"] == "FINISHED"]
        of = done[0]["trial_id"] if done else ""
        ran = {t["seed"] for t in done}
        for seed in reference_seeds(seed0, repeats):
            if seed not in ran:
                out.append({"role": "reference", "of": of,
                            "overrides": {**shape, "loss.kd_weight": 0.0, "train.seed": seed}})
    if repeats > 1:
        if len(objectives) == 1:
            best = best_trial(trials, objectives[0])
            chosen = [best] if best else []
        else:
            chosen = front_trials(trials, objectives)[:MAX_FRONT]
        for t in chosen:
            for i in range(1, repeats):
                out.append({"role": "repeat", "of": t["trial_id"],
                            "overrides": {**t["params"], "train.seed": seed0 + i}})
    return out
