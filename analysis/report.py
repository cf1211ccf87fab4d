"""A sweep's report: ``report.md`` and ``report.html`` from MLflow's records.

:func:`write_report` reads the sweep from MLflow once (never from the trial processes),
draws the plots from that frame, and writes the verdict first, then the teacher, the
CE-only reference and the finalists with their seed spread, the best student per
objective, the Pareto table with its hypervolume and knee, the temperature / kd_weight
tables with every trial, and the trials that did not finish. Every number is MLflow's,
printed to 6 significant digits (counts in full). ``kd report`` (:mod:`analysis.commands`)
calls it.
"""

from __future__ import annotations

import ast
import html
import math
import os
from pathlib import Path
from typing import Any

from kd.metrics import METRICS, TASK_METRICS, direction
from kd.sweep.results import label_reaches_teacher

DEFAULT_FRONT = ("acc_mean", "params", "latency_ms_per_token")
KNOBS = ("student.n_layer", "student.n_embd", "loss.temperature", "loss.kd_weight",
         "train.seed")
COUNTS = {"params", "params_non_embedding", "flops_per_token", "student.n_layer",
          "student.n_embd", "train.seed"}


def fmt(value: Any, name: str = "") -> str:
    """How the report prints a number: counts in full, others to 6 significant digits."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name in COUNTS and float(value).is_integer():
        return str(int(value))
    return f"{float(value):.6g}"


def parse_objectives(value: Any) -> list[str]:
    """Metric names from a parent run's ``objectives`` param, however it was written:
    ``["acc_mean", "params"]``, ``{"acc_mean": "max"}``, ``acc_mean:max,params:min`` ..."""
    if value is None:
        return []
    text = str(value)
    try:
        obj = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        obj = [part.split(":")[0] for part in text.strip("[](){}").split(",")]
    if isinstance(obj, dict):
        obj = list(obj)
    elif isinstance(obj, str):
        obj = [obj]
    names = [(o[0] if isinstance(o, (list, tuple)) else str(o)).strip().strip("'\" ")
             for o in obj]
    return [n for n in names if n in METRICS]


def _objectives(params: dict[str, Any]) -> list[str]:
    for key in ("objectives", "sweep.objectives", "objective", "metric"):
        if key in params:
            return parse_objectives(params[key])
    return []


# ------------------------------------------------------------------- document model
# A report is a list of blocks rendered twice (Markdown and HTML) from the same data, so
# the two files cannot disagree: ("h1"|"h2"|"p", text), ("table", header, rows),
# ("img", relative path, caption).


def _md(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            header, rows = rest
            out.append("\n".join(["| " + " | ".join(header) + " |",
                                  "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(r) + " |" for r in rows]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


def _html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}"
           "div.t{overflow-x:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:2px 8px;text-align:right;white-space:nowrap}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0]).replace('`', '')}</p>")
        elif kind == "table":
            header, rows = rest
            out.append("<div class='t'><table><tr>"
                       + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                                 for r in rows) + "</table></div>")
        elif kind == "img":
            out.append(f"<figure><img src='{e(rest[0])}' alt='{e(rest[1])}' width='640'>"
                       f"<figcaption>{e(rest[1])}</figcaption></figure>")
    return "\n".join(out) + "\n</body></html>\n"


# ---------------------------------------------------------------------------- report


def _retention(row, teacher_acc: float) -> float:
    """MLflow's ``retention`` where the run logged it, else acc_mean / teacher acc_mean."""
    logged = row.get("retention")
    if logged is not None and math.isfinite(logged):
        return float(logged)
    return float(row["acc_mean"]) / teacher_acc


def _best_rows(df, objectives: list[str], shown: list[str], teacher_acc: float | None,
               knobs: list[str]) -> list[list[str]]:
    """One row per objective: the finished run best on it, and the objective over the seeds
    of that run's configuration (one run is the luckiest draw of its configuration; its
    seeds' mean and spread are what to compare)."""
    from analysis import finished, run_label

    runs = finished(df)
    rows = []
    for name in objectives:
        col = runs[name].dropna() if name in runs.columns else []
        if len(col) == 0:
            continue
        idx = col.idxmax() if direction(name) == "max" else col.idxmin()
        r = runs.loc[idx]
        rows.append([name, direction(name), fmt(r[name], name), _across_seeds(runs, r, name, knobs), r["trial_id"],
                     r["run_id"], run_label(r)] + [fmt(r[c], c) for c in shown]
                    + ([fmt(_retention(r, teacher_acc))] if teacher_acc else []))
    return rows


def _across_seeds(runs, r, name: str, knobs: list[str]) -> str:
    """``name`` over the finished runs of ``r``'s configuration (every knob but the seed):
    one run is its configuration's luckiest or unluckiest draw; the seeds' mean and spread
    are what to compare."""
    same = runs
    for k in (k for k in knobs if k != "train.seed" and k in runs.columns):
        same = same[same[k].isna()] if r.isna()[k] else same[same[k] == r[k]]
    seeds = same[name].dropna() if name in same.columns else []
    if len(seeds) < 2:
        return "1 seed: spread unknown"
    return f"{fmt(seeds.mean(), name)} ± {fmt(seeds.std(), name)} ({len(seeds)} seeds)"


def write_report(tracking_uri: str, experiment: str, out_dir: str | os.PathLike,
                 parent_run_id: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for a sweep; return report.md.

    Args:
        tracking_uri: the sweep's MLflow store (``sqlite:///.../mlflow.db`` or a server).
        experiment: the experiment (= sweep) name.
        out_dir: the folder to write (created).
        parent_run_id: which sweep in the experiment; default the latest.

    The plots and both report files are also logged as artifacts of the parent run
    (``plots/``, ``report/``).
    """
    from analysis import (finished, hypervolume, knee, knob_frame, learning_curves, load_runs, load_sweep,
                          pareto_front, reference_point, run_label, save_plots, searched, sensitivity)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = load_sweep(tracking_uri, experiment, parent_run_id)
    every = load_runs(tracking_uri, experiment, sweep=sweep)
    df = searched(every)  # best, front: the searched students and their repeats
    runs = finished(df)
    objectives = _objectives(sweep.params)
    front_objs = [o for o in (objectives if len(objectives) >= 2 else DEFAULT_FRONT)
                  if o in df.columns]
    knobs = [k for k in KNOBS if k in df.columns]
    shown = [c for c in ("acc_mean", "params", "latency_ms_per_token") if c in df.columns]

    n_failed = int((every["status"] == "FAILED").sum())
    n_stopped = int(every["stopped_step"].notna().sum()) if "stopped_step" in every else 0
    n_done = int((every["status"] == "FINISHED").sum())
    n_ref = int((every["role"] == "reference").sum()) if "role" in every else 0
    n_other = len(every) - n_done - n_failed - n_stopped
    b: list[tuple] = [("h1", f"Sweep report: {experiment}")]
    b.append(("p", f"Verdict: {sweep.verdict}" if sweep.verdict else
              "Verdict: none recorded on the parent run (tag kd.verdict): the sweep did not finish."))
    b.append(("p", f"Tracking URI `{tracking_uri}`, experiment `{experiment}` "
                   f"(id {sweep.experiment_id}), parent run `{sweep.run_id}`. "
                   f"Runs: {len(every)} ({n_done} finished, {n_stopped} early-stopped, {n_failed} failed"
                   + (f", {n_other} killed or still running" if n_other else "")
                   + f"; {n_ref} of them CE-only references). "
                   f"Objectives: {', '.join(f'{o} ({direction(o)})' for o in objectives) or '-'}."))

    b.append(("h2", "Teacher (reference)"))
    t_rows = [[k, fmt(v, k), METRICS[k].unit if k in METRICS else ""]
              for k, v in sorted(sweep.teacher.items())]
    b.append(("table", ["metric", "teacher", "unit"], t_rows) if t_rows else
             ("p", "No teacher metrics on the parent run."))
    caught = _label_catches_teacher(every, sweep.teacher)
    if caught:
        b.append(("p", caught))

    seeds = _seed_rows(every, list(dict.fromkeys([*objectives, "acc_mean"])), knobs)
    if seeds:
        metric_cols = list(dict.fromkeys([*objectives, "acc_mean"]))
        b.append(("h2", "CE-only reference and finalists across seeds"))
        b.append(("p", "Mean +- standard deviation over the seeds each configuration ran with "
                       "(finished runs only; std needs two seeds). The last column is the first "
                       "metric over the seeds run after the search picked the configuration "
                       "alone: the verdict tests those."))
        b.append(("table", ["configuration", "role", "seeds", *metric_cols,
                            f"{metric_cols[0]}, seeds after the pick"], seeds))

    b.append(("h2", "Best student per objective"))
    best_objs = list(dict.fromkeys([*objectives, "acc_mean", *TASK_METRICS]))
    teacher_acc = sweep.teacher.get("acc_mean") if "acc_mean" in shown else None
    rows = _best_rows(df, best_objs, shown, teacher_acc, knobs)
    if rows and teacher_acc:
        b.append(("p", f"retention: the student's acc_mean / the teacher's acc_mean "
                       f"({fmt(teacher_acc, 'acc_mean')}), as logged by the trial."))
    b.append(("table", ["objective", "direction", "best", "its configuration's seeds", "trial", "run_id",
                        "student",
                        *shown, *(["retention"] if teacher_acc else [])], rows)
             if rows else ("p", "No finished trial."))

    if len(front_objs) >= 2 and len(runs):
        front = pareto_front(df, front_objs)
        k = knee(front)
        dirs = [direction(o) for o in front_objs]
        ref = reference_point(runs[front_objs].dropna().to_numpy(dtype=float), dirs)
        hv = hypervolume(front[front_objs], dirs, ref)
        b.append(("h2", f"Pareto front ({', '.join(f'{o} {direction(o)}' for o in front_objs)})"))
        b.append(("p", f"{len(front)} of {len(runs)} finished trials are non-dominated. "
                       f"Hypervolume {fmt(hv.value)} with reference point "
                       f"({', '.join(f'{o}={fmt(r, o)}' for o, r in zip(front_objs, ref))}): "
                       "the worst finished value of each objective, padded by 10% of its "
                       f"range. Knee (smallest sum of normalised objectives): trial "
                       f"{k['trial_id']} ({run_label(k)})."))
        cols = [*front_objs, *[c for c in ("size_mb", "acc_mean") if c in df.columns
                               and c not in front_objs], *knobs]
        seed_obj = "acc_mean" if "acc_mean" in cols else front_objs[0]
        b.append(("table", ["trial", "run_id", *cols, f"{seed_obj}, its configuration's seeds", "knee"],
                  [[r["trial_id"], r["run_id"], *[fmt(r[c], c) for c in cols],
                    _across_seeds(runs, r, seed_obj, knobs), "yes" if r["run_id"] == k["run_id"] else ""]
                   for _, r in front.iterrows()]))

    for param in ("loss.temperature", "loss.kd_weight"):
        if param in runs.columns and runs[param].nunique() > 1 and "acc_mean" in runs:
            sens = sensitivity(every, param, "acc_mean", hold="others")
            held = ", ".join(f"{h}={v}" for h, v in sens.attrs["held"].items())
            b.append(("h2", f"acc_mean vs {param}"))
            b.append(("p", "Mean and spread across seeds" + (f", at {held}." if held else
                                                            ", all other knobs pooled.")))
            b.append(("table", [param, "mean", "std", "min", "max", "runs", "seeds"],
                      [[fmt(r[param]), fmt(r["mean"]), fmt(r["std"]), fmt(r["min"]),
                        fmt(r["max"]), str(int(r["n"])), str(int(r["n_seeds"]))]
                       for _, r in sens.iterrows()]))
            frame = knob_frame(every, param)
            b.append(("h2", f"Every run at its {param}"))
            b.append(("p", f"Every run at its {param}: acc_mean where it was evaluated (early-stopped "
                           "runs at the step they reached), val_loss at its last evaluation."))
            b.append(("table", [param, "run", "role", "state", "step", "acc_mean", "val_loss"],
                      [[fmt(r[param]), r["trial_id"], r["role"], r["state"], fmt(r["step"], "train.seed"),
                        fmt(r["acc_mean"]), fmt(r["val_loss"])]
                       for _, r in frame.sort_values(param).iterrows()]))

    curves = learning_curves(tracking_uri, every["run_id"], "val_loss")
    plots = save_plots(every, sweep, out / "plots", curves=curves)
    if plots:
        b.append(("h2", "Plots"))
        for name, path in plots.items():
            b.append(("img", f"plots/{path.name}", name.replace("_", " ")))

    failed = every[every["status"] != "FINISHED"]
    if len(failed):
        b.append(("h2", "Trials that did not finish"))
        b.append(("table", ["trial", "run_id", "status", "error"],
                  [[r["trial_id"], r["run_id"],
                    f"stopped at step {int(r['stopped_step'])}" if r["stopped_step"] == r["stopped_step"]
                    else r["status"], r["error"] or "-"]
                   for _, r in failed.iterrows()]))

    md, page = out / "report.md", out / "report.html"
    md.write_text(_md(b))
    page.write_text(_html(b, f"Sweep report: {experiment}"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in plots.values():
        client.log_artifact(sweep.run_id, str(path), artifact_path="plots")
    for path in (md, page):
        client.log_artifact(sweep.run_id, str(path), artifact_path="report")
    return md


def _seed_rows(df, metrics: list[str], knobs: list[str]) -> list[list[str]]:
    """One row per configuration that is a reference or ran with several seeds."""
    from analysis import finished, run_label

    runs = finished(df)
    if not len(runs):
        return []
    keys = [k for k in knobs if k != "train.seed" and k in runs.columns]
    rows = []
    for _, g in runs.groupby(keys, dropna=False, sort=True) if keys else [((), runs)]:
        role = "reference" if (g.get("role") == "reference").any() else "searched"
        if role != "reference" and len(g) < 2:
            continue
        cells = [_mean_pm(g[m].dropna() if m in g.columns else []) for m in metrics]
        # The verdict tests a searched configuration on the seeds run after the search
        # picked it (the picked run's score leans upward): give those apart too.
        repeats = g[g["role"] == "repeat"][metrics[0]].dropna() if "role" in g.columns else []
        after = _mean_pm(repeats) + (f" ({len(repeats)})" if len(repeats) else "")
        rows.append([run_label(g.iloc[0], seed=False), role,
                     str(len(g)), *cells, after])
    return rows


def _label_catches_teacher(every, teacher: dict[str, float]) -> str:
    """A sentence naming the task metrics on which the CE-only students match or pass the
    teacher (empty if none, or no reference ran).

    Where the label alone brings students to the teacher, the teacher has nothing more to
    give on that task, and a distillation effect there cannot show: a user reading "does not
    beat" should know whether the teacher or the method is the limit. (It happens: three
    teachers of one recipe, by ``teacher.seed``, had held-out QA 0.69-0.99 on one world.)
    """
    from analysis import finished

    runs = finished(every)
    if "role" not in runs.columns:
        return ""
    ref = runs[runs["role"] == "reference"]
    at = []
    for m in (*TASK_METRICS, "acc_mean"):
        if m in ref.columns and ref[m].notna().any() and label_reaches_teacher(m, ref[m].mean(), teacher):
            at.append(f"{m} {fmt(ref[m].mean(), m)} against the teacher's {fmt(teacher[m], m)}")
    if not at:
        return ""
    return ("The CE-only students, which never see the teacher, match or pass it on "
            + "; ".join(at) + f" (mean over {int(ref['run_id'].nunique())} seeds): there the teacher "
            "knows no more than the labels teach, so distillation has little to add on those.")


def _mean_pm(values) -> str:
    """``mean ± std`` of a column of seeds (``mean`` alone for one, ``-`` for none)."""
    if not len(values):
        return "-"
    return fmt(values.mean()) + (f" ± {fmt(values.std())}" if len(values) > 1 else "")
