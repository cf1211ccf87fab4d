"""What a sweep found, as numbers and one sentence: per-configuration seed statistics,
the finalists to re-run, and the verdict. Plain Python (no Ray, no MLflow, no pandas), so
the report in ``analysis/`` computes the same verdict from MLflow's records.

A *configuration* is a trial's searched values (``train.seed`` aside), or the CE-only
reference. Its entry is ``{"config": {...}, "n_seeds": n, "mean": {metric: v},
"std": {metric: v}}`` (``std`` across seeds, ddof=1; absent for one seed). The best's
``best_fresh`` entry holds only its repeats: the seeds run after the search picked it,
which the verdict tests against the reference (the picked run's score leans upward).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.metrics import TASK_METRICS, direction

SEED = "train.seed"
#: Metrics summarised per configuration besides the objectives.
SUMMARY_METRICS = ("acc_mean", *TASK_METRICS, "retention", "val_loss", "params", "size_mb",
                   "latency_ms_per_token")


@dataclass
class SweepResults:
    """What a sweep produced and where it lies."""

    name: str
    experiment: str
    output_dir: Path
    tracking_uri: str
    parent_run_id: str
    objectives: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    """One dict per trial: trial_id, role, status, run_id, params, metrics, error."""
    summary: dict[str, Any] = field(default_factory=dict)
    """teacher, reference, best or front, configs, best_region, verdict (see :func:`summarize`)."""
    wall_time_s: float = 0.0
    interrupted: bool = False
    error: str | None = None
    """Why the sweep failed (no searched trial finished), else None."""

    def best(self, metric: str | None = None) -> dict[str, Any] | None:
        """The finished searched trial best on ``metric`` (default: the first objective)."""
        return best_trial(self.trials, metric or self.objectives[0])

    def text(self) -> str:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        lines = [f"sweep {self.name}: {len(self.trials)} trials "
                 f"({', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))}) in {self.wall_time_s:.0f} s"]
        best = self.best()
        if best:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
            vals = ", ".join(f"{m}={best['metrics'].get(m, float('nan')):.4g}" for m in self.objectives)
            lines.append(f"best by {self.objectives[0]}: {vals}  ({params})")
        if self.summary.get("verdict"):
            lines.append(f"verdict: {self.summary['verdict']}")
        lines.append(f"MLflow store: {self.tracking_uri}  (experiment {self.experiment!r}, "
                     f"parent run {self.parent_run_id})")
        lines.append(f"results: {self.output_dir / 'results.json'}")
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1")
        return "\n".join(lines)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_trial(trials: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The finished searched trial with the best ``metric``."""
    done = [t for t in trials if t["status"] == "FINISHED" and t.get("role", "trial") == "trial"
            and _finite(t["metrics"].get(metric))]
    if not done:
        return None
    sign = 1 if direction(metric) == "max" else -1
    return max(done, key=lambda t: sign * t["metrics"][metric])


def front_trials(trials: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """The finished searched trials no other dominates on ``objectives``."""
    done = [t for t in trials if t["status"] == "FINISHED" and t.get("role", "trial") == "trial"
            and all(_finite(t["metrics"].get(m)) for m in objectives)]
    signs = [1 if direction(m) == "min" else -1 for m in objectives]
    loss = [[s * t["metrics"][m] for s, m in zip(signs, objectives)] for t in done]

    def dominated(i: int) -> bool:
        return any(all(a <= b for a, b in zip(loss[j], loss[i])) and loss[j] != loss[i]
                   for j in range(len(done)) if j != i)

    return [t for i, t in enumerate(done) if not dominated(i)]


def config_of(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial's configuration: what identifies it across seeds."""
    if trial.get("role") == "reference":
        return {"loss.kd_weight": 0.0, **{k: v for k, v in trial["params"].items() if k.startswith("student.")}}
    return {k: v for k, v in trial["params"].items() if k != SEED}


def entry(trials: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """``{"config", "n_seeds", "mean", "std"}`` over the finished runs of one configuration."""
    done = [t for t in trials if t["status"] == "FINISHED"]
    out: dict[str, Any] = {"config": config_of(trials[0]), "n_seeds": len(done), "mean": {}, "std": {},
                           "trial_ids": [t["trial_id"] for t in done], "by_seed": {}}
    for m in metrics:
        values = [t["metrics"][m] for t in done if _finite(t["metrics"].get(m))]
        if values:
            out["mean"][m] = statistics.fmean(values)
            if len(values) > 1:
                out["std"][m] = statistics.stdev(values)
        # Per seed (JSON keys are strings), for the paired test: runs of one seed see the
        # same batches in the same order.
        seeded = {str(t["seed"]): t["metrics"][m] for t in done
                  if t.get("seed") is not None and _finite(t["metrics"].get(m))}
        if seeded:
            out["by_seed"][m] = seeded
    return out


def group(trials: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Trials grouped by configuration (references together), in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        key = "reference" if t.get("role") == "reference" else repr(sorted(config_of(t).items()))
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _name(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in config.items()) or "the base config"


def _pm(e: dict[str, Any], m: str) -> str:
    std = e["std"].get(m)
    seeds = f"{e['n_seeds']} seed{'s' if e['n_seeds'] != 1 else ''}"
    return f"{_fmt(e['mean'][m])} ± {_fmt(std)} ({seeds})" if std is not None else f"{_fmt(e['mean'][m])} ({seeds})"


def label_reaches_teacher(m: str, reference_mean: float, teacher: dict[str, float]) -> bool:
    """Whether students trained on the label alone (the CE-only reference's mean) match or
    pass the teacher on task metric ``m``: there the teacher knows no more than the labels
    teach, so a distillation effect on ``m`` cannot show. Task accuracies only (``acc_mean``
    and :data:`TASK_METRICS`); a perfect teacher (1.0) is no weak one, so students level
    with it say nothing. The verdict and the report's teacher section share this rule."""
    return (m in (*TASK_METRICS, "acc_mean") and m in teacher and teacher[m] < 1.0
            and reference_mean >= teacher[m])


def verdict(objectives: list[str], best: dict | None, runner_up: dict | None, reference: dict | None,
            front: list[dict] | None = None, fresh: dict | None = None, near: dict | None = None,
            teacher: dict[str, float] | None = None) -> str:
    """One plain sentence: what the sweep found and how sure it is, from the entries.

    "Beats" only when a one-sided t-test over the seeds says so at 95% (:func:`compare`):
    paired over the seeds both sides ran where they are one shape and share three or more
    (:func:`paired`), else
    Welch's (:func:`welch`: with 2 seeds a side the mean difference must be ~2.9 times its
    standard error, with 3 ~2.1). One seed on either side leaves the spread unknown, and
    the sentence says so. ``fresh``, the best's seeds run after the search picked it
    (its repeats), is what the test against the reference uses when given: the searched
    run was picked for being high, so a test that counts it favours the best. ``near``
    (:func:`best_region`), when given, replaces the runner-up's clause: it tells every
    configuration tried apart from the best or not, the runner-up among them. ``teacher``
    (its metrics), when given, explains a "does not beat" whose CE-only students already
    reach the teacher: there the teacher's soft labels hold little the labels do not, which
    is the usual reason distillation does not pay on the embedded world (BENCHMARKS.md).
    """
    m = objectives[0] if len(objectives) == 1 else "acc_mean"
    sign = 1 if direction(m) == "max" else -1
    if front is not None:
        ok = [e for e in front if m in e["mean"]]
        if not ok:
            return "No trial finished with every objective, so there is no front to report."
        text = f"The Pareto front has {len(ok)} configuration{'s' if len(ok) != 1 else ''}"
        if reference and m in reference["mean"]:
            ref = f"the CE-only reference's {m} ({_pm(reference, m)})"
            tests = [compare(e, reference, m, sign) for e in ok]
            beat = sum(1 for t in tests if t is not None and t.significant)
            above = sum(1 for e in ok if sign * (e["mean"][m] - reference["mean"][m]) > 0)
            unknown = sum(1 for t in tests if t is None)
            text += (f"; {beat} of them beat {ref} (one-sided t-test over seeds, paired where one shape "
                     "shares seeds, 95%), "
                     f"{above} are above it by their mean")
            if unknown:
                text += f", and {unknown} ran one seed, whose spread is unknown"
        return text + "."
    if best is None or m not in best["mean"]:
        return f"No searched trial finished with {m}, so the sweep found nothing to report."
    text = f"The best configuration ({_name(best['config'])}) reaches {m} {_pm(best, m)}"
    tested = best
    if fresh is not None and m in fresh["mean"]:
        tested = fresh
        text += f", {_pm(fresh, m)} on the seeds run after the search picked it"
    if reference and m in reference["mean"]:
        test = compare(tested, reference, m, sign)
        # What was tested (a paired test: over the seeds both ran), else the means' difference.
        diff = test.diff if test is not None else sign * (tested["mean"][m] - reference["mean"][m])
        shape = _other_shape(best["config"], reference["config"])
        ref = f"the CE-only reference{' at ' + shape if shape else ''} ({_pm(reference, m)})"
        if test is None:
            text += (f"; it is {'above' if diff > 0 else 'not above'} {ref} by {_fmt(abs(diff))}, "
                     "but with one seed the spread is unknown, so it is not a verdict")
        elif test.significant:
            text += f" and beats {ref} by {_fmt(diff)}: {test.text()}"
        else:
            text += f" and does not beat {ref}: the difference ({_fmt(diff)}) is not significant, {test.text()}"
            if teacher and label_reaches_teacher(m, reference["mean"][m], teacher):
                text += (f"; the CE-only students already reach the teacher's {m} ({_fmt(teacher[m])}), "
                         "so it has little to teach them")
        if shape:
            text += "; the two differ in shape, so the gap is not distillation's alone"
    else:
        text += "; no CE-only reference finished to compare with"
    if near is not None:
        return text + ". " + region_text(near)
    if runner_up and m in runner_up["mean"]:
        gap = sign * (best["mean"][m] - runner_up["mean"][m])
        test = compare(best, runner_up, m, sign)
        if test is None:
            text += (f"; the runner-up ({_name(runner_up['config'])}, {_pm(runner_up, m)}) is "
                     f"{_fmt(abs(gap))} {'behind' if gap >= 0 else 'ahead'}, with no seed spread to tell "
                     "them apart")
        elif test.significant:
            text += f"; the runner-up ({_name(runner_up['config'])}) is significantly behind"
        else:
            text += (f"; the runner-up ({_name(runner_up['config'])}, {_pm(runner_up, m)}) cannot be "
                     "told apart from it")
    return text + "."


#: One-sided 95% quantiles of Student's t by degrees of freedom (a standard table; Welch's
#: fractional df is interpolated linearly in 1/df, the usual way to read such a table; the
#: project keeps no scipy for one quantile).
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697, 60: 1.671, 120: 1.658, math.inf: 1.645}


def t95(df: float) -> float:
    """The one-sided 95% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    df = max(1.0, df)
    keys = sorted(_T95)
    hi = next(k for k in keys if k >= df)
    if hi == df:
        return _T95[hi]
    lo = keys[keys.index(hi) - 1]
    w = (1 / lo - 1 / df) / (1 / lo - (0.0 if math.isinf(hi) else 1 / hi))
    return _T95[lo] + w * (_T95[hi] - _T95[lo])


@dataclass(frozen=True)
class _OneSided:
    """A one-sided t-test at 95% of ``a`` above ``b`` (in the objective's direction)."""

    t: float
    df: float
    diff: float
    """The mean difference tested."""

    @property
    def needed(self) -> float:
        return t95(self.df)

    @property
    def significant(self) -> bool:
        return self.t > self.needed

    def _t_text(self) -> str:
        return "inf" if math.isinf(self.t) else f"{self.t:.2f}"


def _t_stat(diff: float, se: float) -> float:
    """``diff / se``; with no spread at all (identical values) the difference is all there is."""
    if se == 0:
        return math.inf if diff > 0 else -math.inf if diff < 0 else 0.0
    return diff / se


@dataclass(frozen=True)
class Welch(_OneSided):
    """Welch's test over the two sides' seeds."""

    n_a: int
    n_b: int

    def text(self) -> str:
        return (f"Welch's t = {self._t_text()} over {self.n_a} and {self.n_b} seeds, where a one-sided 95% test "
                f"needs {self.needed:.2f}")


def welch(a: dict, b: dict, m: str, sign: int = 1) -> Welch | None:
    """Welch's t of ``a``'s mean over ``b``'s (times ``sign``), or None when either ran one
    seed (its spread is unknown; the other's says nothing about it)."""
    if m not in a["std"] or m not in b["std"] or a["n_seeds"] < 2 or b["n_seeds"] < 2:
        return None
    na, nb = a["n_seeds"], b["n_seeds"]
    va, vb = a["std"][m] ** 2 / na, b["std"][m] ** 2 / nb
    diff = sign * (a["mean"][m] - b["mean"][m])
    se = math.sqrt(va + vb)
    df = math.inf if se == 0 else (va + vb) ** 2 / ((va**2 / (na - 1) if va else 0.0) + (vb**2 / (nb - 1) if vb else 0.0))
    return Welch(_t_stat(diff, se), df, diff, na, nb)


@dataclass(frozen=True)
class Paired(_OneSided):
    """A paired test over the ``n`` seeds both sides ran."""

    n: int

    def text(self) -> str:
        return (f"paired t = {self._t_text()} over the {self.n} seeds both ran (the same batches per seed), "
                f"where a one-sided 95% test needs {self.needed:.2f}")


def paired(a: dict, b: dict, m: str, sign: int = 1) -> Paired | None:
    """The paired t of ``a`` over ``b`` (times ``sign``) on the seeds both ran, or None when
    they share fewer than two.

    Two runs of one ``train.seed`` see the same batches in the same order (and the same
    initialisation), so what a seed does to a student (on the embedded world it moved QA
    exact match by 0.05-0.1 either way, for CE-only and distilled students alike) cancels in
    their difference: the differences' spread is the noise to test against, not the
    seeds'. Welch's test, which takes the two sides as independent, counts that shared part
    as noise on both.
    """
    sa, sb = a.get("by_seed", {}).get(m, {}), b.get("by_seed", {}).get(m, {})
    common = sorted(set(sa) & set(sb))
    if len(common) < 2:
        return None
    d = [sign * (sa[k] - sb[k]) for k in common]
    n, mean = len(d), statistics.fmean(d)
    return Paired(_t_stat(mean, statistics.stdev(d) / math.sqrt(n)), n - 1, mean, n)


#: Fewest shared seeds for the paired test: with two pairs it has one degree of freedom
#: (t > 6.31), and Welch's over 2 and 3 seeds is then the stronger test (loss-weight demo:
#: paired t = 6.22 for a 0.034 gap that every seed showed).
MIN_PAIRS = 3


def compare(a: dict, b: dict, m: str, sign: int = 1) -> Paired | Welch | None:
    """The test the verdict uses: paired where ``a`` and ``b`` are one student shape and share
    :data:`MIN_PAIRS` seeds or more, else Welch's.

    The rule is fixed by the design (shapes and seed counts), never by which test says
    more: a seed's effect is shared by two students of one shape (the same initialisation
    and batches), which pairing removes; students of different shapes start from
    different weights, so little of it is shared (size demo: a 0.14 gap over 2 pairs had
    paired t = 6.09, Welch's t = 8.80).
    """
    same_shape = not _other_shape(a.get("config", {}), b.get("config", {}))
    test = paired(a, b, m, sign) if same_shape else None
    return test if test is not None and test.n >= MIN_PAIRS else welch(a, b, m, sign)


def _other_shape(config: dict[str, Any], reference: dict[str, Any]) -> str:
    """The reference's student shape when ``config`` searched another one ("" when the same)."""
    keys = sorted(k for k in config if k.startswith("student.") and k in reference)
    if all(config[k] == reference[k] for k in keys):
        return ""
    return ", ".join(f"{k}={reference[k]}" for k in keys)


def best_region(searched: list[dict[str, Any]], best: dict[str, Any], fresh: dict[str, Any] | None,
                reference: dict[str, Any] | None, m: str) -> dict[str, Any] | None:
    """Which configurations tried cannot be told apart from the best: the answer's region.

    Most searched configurations ran one seed, so their own spread is unknown; the spread
    of one run is taken from the configurations that ran several seeds (the best's repeats
    and the CE-only reference, pooled; one student shape, so one seed's effect on a run is
    alike). A configuration is *behind* the best when a one-sided 95% t-test says its mean
    is below the best's repeats' mean, with that pooled spread; else it is *near*. The best
    temperature of one run is a draw among the near ones (on the embedded world the top
    moved between T ~ 1 and T >= 4 from one world seed to the next while the near set
    overlapped), so the region, not the single best, is the answer a user can act on.

    Returns None when no configuration ran two seeds (no spread to test with). Else
    ``{"metric", "noise_std", "df", "margin" (how far behind a one-seed run may be and still
    be near), "near": [config, ...], "behind": [config, ...]}``, plus ``"knob"``, ``"low"``,
    ``"high"`` and ``"gaps"`` (behind values inside [low, high]) when the configurations
    differ in one numeric key only.
    """
    sign = 1 if direction(m) == "max" else -1
    top = fresh if fresh is not None and fresh["n_seeds"] >= 2 and m in fresh["std"] else best
    spread = [e for e in (top, reference) if e is not None and e["n_seeds"] >= 2 and m in e["std"]]
    if m not in top["mean"] or not spread:
        return None
    df = sum(e["n_seeds"] - 1 for e in spread)
    noise = math.sqrt(sum((e["n_seeds"] - 1) * e["std"][m] ** 2 for e in spread) / df)
    need = t95(df)
    near, behind = [], []
    for e in searched:
        if m not in e["mean"]:
            continue
        gap = sign * (top["mean"][m] - e["mean"][m])
        se = noise * math.sqrt(1 / top["n_seeds"] + 1 / e["n_seeds"])
        is_behind = e is not best and _t_stat(gap, se) > need
        (behind if is_behind else near).append(e["config"])
    out: dict[str, Any] = {"metric": m, "noise_std": noise, "df": df,
                           "margin": need * noise * math.sqrt(1 / top["n_seeds"] + 1),
                           "near": near, "behind": behind}
    keys = {k for c in near + behind for k in c}
    varied = [k for k in keys if len({repr(c.get(k)) for c in near + behind}) > 1]
    if len(varied) == 1 and all(_finite(c.get(varied[0])) for c in near + behind):
        k = varied[0]
        lo, hi = min(c[k] for c in near), max(c[k] for c in near)
        out.update(knob=k, low=lo, high=hi, gaps=sorted(c[k] for c in behind if lo < c[k] < hi))
    return out


def region_text(near: dict[str, Any]) -> str:
    """The sentence :func:`best_region`'s answer is given in (after the verdict's)."""
    n_near, n_all = len(near["near"]), len(near["near"]) + len(near["behind"])
    what = "configurations" if "knob" not in near else near["knob"].split(".")[-1] + "s"
    why = (f"the {n_near} of the {n_all} {what} tried that cannot be told apart from the best "
           f"(a one-seed run within {_fmt(near['margin'])} of the best's mean, from the seed spread "
           f"{_fmt(near['noise_std'])} of the runs with several seeds)")
    if "knob" not in near:
        return f"Best region: {why}: " + "; ".join(_name(c) for c in near["near"]) + "."
    span = (f"{near['knob']}={_fmt(near['low'])}" if near["low"] == near["high"]
            else f"{near['knob']} {_fmt(near['low'])} to {_fmt(near['high'])}")
    gaps = f"; inside it, {', '.join(_fmt(v) for v in near['gaps'])} fell behind" if near["gaps"] else ""
    return f"Best region: {span}, {why}{gaps}."


def summarize(trials: list[dict[str, Any]], objectives: list[str], teacher: dict[str, float]) -> dict[str, Any]:
    """``teacher``, ``reference``, ``best`` + ``runner_up`` + ``best_region`` (one objective) or
    ``front`` (several), ``configs`` (every configuration) and ``verdict``: what
    ``results.json`` carries."""
    metrics = list(dict.fromkeys([*objectives, *SUMMARY_METRICS]))
    entries = [(g, entry(g, metrics)) for g in group(trials)]
    out: dict[str, Any] = {"teacher": teacher, "configs": [e for _, e in entries]}
    ref = next((e for g, e in entries if g[0].get("role") == "reference" and e["n_seeds"]), None)
    if ref is not None:
        out["reference"] = ref
    searched = [e for g, e in entries if g[0].get("role", "trial") != "reference" and e["n_seeds"]]
    if len(objectives) == 1:
        m, sign = objectives[0], (1 if direction(objectives[0]) == "max" else -1)
        # The best is the configuration the search found best (the one re-run with more
        # seeds); the runner-up the best of the others by mean.
        top = best_trial(trials, m)
        key = repr(sorted(config_of(top).items())) if top else None
        best = next((e for e in searched if repr(sorted(e["config"].items())) == key), None)
        others = sorted((e for e in searched if e is not best and m in e["mean"]), key=lambda e: -sign * e["mean"][m])
        runner = others[0] if others else None
        fresh = None
        if best is not None:
            out["best"] = best
            # The search picked this configuration for its high searched run, so that run's
            # score leans upward (the winner's curse); its repeats, run after the pick, do not.
            repeats = [t for g, e in entries if e is best for t in g if t.get("role") == "repeat"]
            fresh = entry(repeats, metrics) if repeats else None
            if fresh is not None and fresh["n_seeds"]:
                out["best_fresh"] = fresh
        if runner is not None:
            out["runner_up"] = runner
        near = best_region(searched, best, fresh, ref, m) if best is not None else None
        if near is not None:
            out["best_region"] = near
        out["verdict"] = verdict(objectives, best, runner, ref, fresh=fresh, near=near, teacher=teacher)
    else:
        keys = {repr(sorted(config_of(t).items())) for t in front_trials(trials, objectives)}
        front = [e for e in searched if repr(sorted(e["config"].items())) in keys]
        out["front"] = front
        out["verdict"] = verdict(objectives, None, None, ref, front=front)
    return out
