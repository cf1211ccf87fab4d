"""``kd report`` and ``kd ui``: a sweep's results as a folder, and the MLflow UI.

:func:`write_report` reads the sweep from MLflow (through :mod:`analysis`, never from the
trial processes), draws the plots, and writes ``report.md`` and ``report.html`` with the
best student per objective, the Pareto table with its hypervolume and knee, the teacher
for reference and the temperature / kd_weight tables. Every number is MLflow's, printed
to 6 significant digits (counts in full). MLflow and matplotlib are imported inside the
functions, so importing this module (``kd.cli`` does) stays cheap.
"""

from __future__ import annotations

import argparse
import ast
import html
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kd.metrics import METRICS, TASK_METRICS, direction

#: Where ``python sweeps/X.py`` keeps its store unless told (kd.sweep_cli's default).
SWEEPS_DIR = Path("runs") / "sweeps"
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


def _best_rows(df, objectives: list[str], shown: list[str], teacher_acc: float | None
               ) -> list[list[str]]:
    from analysis import finished, run_label

    runs = finished(df)
    rows = []
    for name in objectives:
        col = runs[name].dropna() if name in runs.columns else []
        if len(col) == 0:
            continue
        idx = col.idxmax() if direction(name) == "max" else col.idxmin()
        r = runs.loc[idx]
        rows.append([name, direction(name), fmt(r[name], name), r["trial_id"], r["run_id"],
                     run_label(r)] + [fmt(r[c], c) for c in shown]
                    + ([fmt(_retention(r, teacher_acc))] if teacher_acc else []))
    return rows


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
    from analysis import (finished, hypervolume, knee, load_runs, load_sweep, pareto_front,
                          reference_point, run_label, save_plots, sensitivity)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = load_sweep(tracking_uri, experiment, parent_run_id)
    df = load_runs(tracking_uri, experiment, sweep=sweep)
    runs = finished(df)
    objectives = _objectives(sweep.params)
    front_objs = [o for o in (objectives if len(objectives) >= 2 else DEFAULT_FRONT)
                  if o in df.columns]
    knobs = [k for k in KNOBS if k in df.columns]
    shown = [c for c in ("acc_mean", "params", "latency_ms_per_token") if c in df.columns]

    n_failed = int((df["status"] == "FAILED").sum())
    b: list[tuple] = [("h1", f"Sweep report: {experiment}")]
    b.append(("p", f"Tracking URI `{tracking_uri}`, experiment `{experiment}` "
                   f"(id {sweep.experiment_id}), parent run `{sweep.run_id}`. "
                   f"Trials: {len(df)} ({len(runs)} finished, {n_failed} failed"
                   + (f", {len(df) - len(runs) - n_failed} killed or still running"
                      if len(df) - len(runs) - n_failed else "") + "). "
                   f"Objectives: {', '.join(f'{o} ({direction(o)})' for o in objectives) or '-'}."))

    b.append(("h2", "Teacher (reference)"))
    t_rows = [[k, fmt(v, k), METRICS[k].unit if k in METRICS else ""]
              for k, v in sorted(sweep.teacher.items())]
    b.append(("table", ["metric", "teacher", "unit"], t_rows) if t_rows else
             ("p", "No teacher metrics on the parent run."))

    b.append(("h2", "Best student per objective"))
    best_objs = list(dict.fromkeys([*objectives, "acc_mean", *TASK_METRICS]))
    teacher_acc = sweep.teacher.get("acc_mean") if "acc_mean" in shown else None
    rows = _best_rows(df, best_objs, shown, teacher_acc)
    if rows and teacher_acc:
        b.append(("p", f"retention: the student's acc_mean / the teacher's acc_mean "
                       f"({fmt(teacher_acc, 'acc_mean')}), as logged by the trial."))
    b.append(("table", ["objective", "direction", "best", "trial", "run_id", "student",
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
        b.append(("table", ["trial", "run_id", *cols, "knee"],
                  [[r["trial_id"], r["run_id"], *[fmt(r[c], c) for c in cols],
                    "yes" if r["run_id"] == k["run_id"] else ""]
                   for _, r in front.iterrows()]))

    for param in ("loss.temperature", "loss.kd_weight"):
        if param in runs.columns and runs[param].nunique() > 1 and "acc_mean" in runs:
            sens = sensitivity(df, param, "acc_mean", hold="others")
            held = ", ".join(f"{h}={v}" for h, v in sens.attrs["held"].items())
            b.append(("h2", f"acc_mean vs {param}"))
            b.append(("p", "Mean and spread across seeds" + (f", at {held}." if held else
                                                            ", all other knobs pooled.")))
            b.append(("table", [param, "mean", "std", "min", "max", "runs", "seeds"],
                      [[fmt(r[param]), fmt(r["mean"]), fmt(r["std"]), fmt(r["min"]),
                        fmt(r["max"]), str(int(r["n"])), str(int(r["n_seeds"]))]
                       for _, r in sens.iterrows()]))

    plots = save_plots(tracking_uri, experiment, out / "plots", parent_run_id=sweep.run_id)
    if plots:
        b.append(("h2", "Plots"))
        for name, path in plots.items():
            b.append(("img", f"plots/{path.name}", name.replace("_", " ")))

    failed = df[df["status"] != "FINISHED"]
    if len(failed):
        b.append(("h2", "Trials that did not finish"))
        b.append(("table", ["trial", "run_id", "status", "error"],
                  [[r["trial_id"], r["run_id"], r["status"], r["error"] or "-"]
                   for _, r in failed.iterrows()]))

    md, page = out / "report.md", out / "report.html"
    md.write_text(_md(b))
    page.write_text(_html(b, f"Sweep report: {experiment}"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in (md, page):
        client.log_artifact(sweep.run_id, str(path), artifact_path="report")
    return md


# ------------------------------------------------------------------------------ CLI


def resolve_store(store: str | None, experiment: str | None = None, flag: str = "--store",
                  sweeps_dir: str | os.PathLike = SWEEPS_DIR) -> str:
    """A tracking URI from ``--store``: a URI as is, a ``.db`` file, or a directory holding
    ``mlflow.db``; default ``$MLFLOW_TRACKING_URI``, else the newest store under
    ``runs/sweeps/<experiment>/`` (any experiment when none is named)."""
    if store is None:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        # A sweep script's default output is runs/sweeps/<name>/<date-time>/; an explicit
        # --output-dir runs/sweeps/<name> puts the store one level up.
        name, root = experiment or "*", Path(sweeps_dir)
        found = sorted([*root.glob(f"{name}/mlflow.db"), *root.glob(f"{name}/*/mlflow.db")],
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"no MLflow store found (looked for {root}/{name}/[*/]mlflow.db "
                f"and $MLFLOW_TRACKING_URI); pass {flag} with a sweep's store")
        return f"sqlite:///{found[-1].resolve()}"
    if "://" in store:
        return store
    path = Path(store).expanduser()
    if path.is_dir():
        path = path / "mlflow.db"
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {store!r}: no MLflow store there (no {path}); give "
                                "a sweep's output directory, its mlflow.db, or a tracking URI")
    return f"sqlite:///{path.resolve()}"


def ui_command(uri: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line ``kd ui`` runs (bound to 127.0.0.1 only)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]


def run_report(args: argparse.Namespace) -> int:
    """``kd report EXPERIMENT``: write the report folder and print report.md's path."""
    try:
        uri = resolve_store(args.tracking_uri, args.experiment, flag="--tracking-uri")
        if args.out:
            out = Path(args.out)
        elif uri.startswith("sqlite:///"):
            out = Path(uri.removeprefix("sqlite:///")).parent / "report"
        else:
            out = Path("runs") / "reports" / args.experiment
        path = write_report(uri, args.experiment, out)
    except (FileNotFoundError, LookupError) as e:
        print(f"kd report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """``kd ui``: serve the MLflow UI for the store on 127.0.0.1 until interrupted."""
    try:
        uri = resolve_store(args.store)
    except FileNotFoundError as e:
        print(f"kd ui: {e}", file=sys.stderr)
        return 2
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": os.environ.get(
        "MLFLOW_DISABLE_TELEMETRY", "true")}
    print(f"MLflow UI for {uri}\n  http://127.0.0.1:{args.port}  (Ctrl-C stops it)",
          flush=True)
    from kd.serve import serve  # the server's whole process group stops with kd ui

    return serve(ui_command(uri, args.port, args.workers), env=env)


def add_parser(subparsers) -> None:
    """Register ``report`` and ``ui`` on the ``kd`` command's subparsers."""
    p = subparsers.add_parser("report", help="write a sweep's report folder (report.md, "
                              "report.html, plots) from MLflow and print its path")
    p.add_argument("experiment", metavar="EXPERIMENT", help="the sweep's experiment name")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow store (a URI, "
                   "an mlflow.db or a sweep's output dir); default $MLFLOW_TRACKING_URI, else "
                   "the newest store under runs/sweeps/EXPERIMENT/")
    p.add_argument("--out", default=None, help="output folder; default report/ next to the "
                   "store's mlflow.db")
    p.set_defaults(func=run_report)

    p = subparsers.add_parser("ui", help="serve the MLflow UI for the project's store on "
                              "127.0.0.1 and print its URL")
    p.add_argument("--store", default=None, metavar="DIR_OR_URI", help="a sweep's output "
                   "dir, an mlflow.db file or a tracking URI; default $MLFLOW_TRACKING_URI, "
                   "else the newest store under runs/sweeps/")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.set_defaults(func=run_ui)


def main(argv: list[str] | None = None) -> int:
    """``python -m kd.report report|ui ...``: the same subcommands without ``kd.cli``."""
    parser = argparse.ArgumentParser(prog="kd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
