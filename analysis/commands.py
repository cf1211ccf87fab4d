"""``kd report`` and ``kd ui`` (also ``python -m analysis report|ui``): find a sweep's store,
write its report folder, serve the MLflow UI. ``kd.cli`` registers these from the top."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Where ``python sweeps/X.py`` keeps its store unless told (kd.sweep.cli's default).
SWEEPS_DIR = Path("runs") / "sweeps"


def resolve_store(store: str | None, experiment: str | None = None, flag: str = "--store",
                  sweeps_dir: str | os.PathLike = SWEEPS_DIR) -> str:
    """A tracking URI from ``--store``: a URI as is, a ``.db`` file, or a directory holding
    ``mlflow.db``; default ``$MLFLOW_TRACKING_URI``, else the newest store under
    ``runs/sweeps/<experiment>/`` (any experiment when none is named)."""
    if store is None:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            from kd.tracking import env_tracking_uri  # credentials go to MLflow's own variables

            return env_tracking_uri()
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
        from kd.sweep.util import without_credentials

        if without_credentials(store) != store:
            raise ValueError(f"{flag}: put no password in a URI (it would be printed and written); "
                             "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
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
    from analysis.report import write_report  # pandas and matplotlib: only when a report is asked for

    try:
        uri = resolve_store(args.tracking_uri, args.experiment, flag="--tracking-uri")
        if args.out:
            out = Path(args.out)
        elif uri.startswith("sqlite:///"):
            out = Path(uri.removeprefix("sqlite:///")).parent / "report"
        else:
            out = Path("runs") / "reports" / args.experiment
        path = write_report(uri, args.experiment, out)
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"kd report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """``kd ui``: serve the MLflow UI for the store on 127.0.0.1 until interrupted."""
    try:
        uri = resolve_store(args.store)
    except (FileNotFoundError, ValueError) as e:
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
    """``python -m analysis report|ui ...``: the same subcommands without ``kd.cli``."""
    parser = argparse.ArgumentParser(prog="kd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)

