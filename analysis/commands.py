"""``kd report`` and ``kd ui`` (also ``python -m analysis report|ui``): find a sweep's store,
write its report folder, serve the MLflow UI. ``kd.cli`` registers these from the top."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
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
    try:
        uri = resolve_store(args.tracking_uri, args.experiment, flag="--tracking-uri")
        _probe(uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI",
               "pass --tracking-uri with a sweep's output dir or mlflow.db")
        from analysis.report import write_report  # pandas and matplotlib: only when a report is asked for

        if args.out:
            out = Path(args.out)
        elif uri.startswith("sqlite:///"):
            out = Path(uri.removeprefix("sqlite:///")).parent / "report"
        else:
            out = Path("runs") / "reports" / args.experiment
        path = write_report(uri, args.experiment, out)
    except (FileNotFoundError, LookupError, ValueError, StoreUnusable) as e:
        print(f"kd report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


class StoreUnusable(Exception):
    """A store MLflow cannot use here (its server down, not MLflow, a scheme it has no store for)."""


def _probe(uri: str, key: str, instead: str) -> None:
    """:func:`kd.sweep.util.probe_tracking` as a :class:`StoreUnusable`: seconds and one line,
    not minutes of MLflow's retries (``kd report`` against a server that is down hung)."""
    from kd.sweep.spec import SweepError
    from kd.sweep.util import probe_tracking

    try:
        probe_tracking(uri, key=key, instead=instead)
    except SweepError as e:
        raise StoreUnusable(str(e)) from None


def run_ui(args: argparse.Namespace) -> int:
    """``kd ui``: serve the MLflow UI for the store on 127.0.0.1 until interrupted.

    Refused in one line, status 2, before anything starts: an http(s) store (a tracking
    server already serves its own UI: the line gives the URL to open), a port that cannot
    be listened on. A server that exits on its own ends kd ui with status 1.
    """
    try:
        uri = resolve_store(args.store)
        check_servable(uri, "--store" if args.store else "MLFLOW_TRACKING_URI")
        check_port(args.port)
        if args.workers < 1:
            raise ValueError(f"--workers={args.workers} is not allowed: must be >= 1")
    except (FileNotFoundError, ValueError) as e:
        print(f"kd ui: {e}", file=sys.stderr)
        return 2
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": os.environ.get(
        "MLFLOW_DISABLE_TELEMETRY", "true")}
    print(f"MLflow UI for {uri}\n  http://127.0.0.1:{args.port}  (Ctrl-C stops it)",
          flush=True)
    from kd.serve import ServerExited, serve  # the server's whole process group stops with kd ui

    try:
        return serve(ui_command(uri, args.port, args.workers), env=env)
    except ServerExited as e:  # mlflow server exits 0 even when it could not serve
        print(f"kd ui: the MLflow server exited on its own (status {e.status}) before it was stopped; "
              "its output above says why", file=sys.stderr)
        return 1


def check_servable(uri: str, key: str) -> None:
    """An http(s) store is a tracking server with its own UI: refuse to start a second
    server in front of it, and say which URL to open instead (without credentials)."""
    from urllib.parse import urlsplit

    from kd.sweep.util import without_credentials

    if urlsplit(uri).scheme.lower() in ("http", "https"):
        shown = without_credentials(uri)
        raise ValueError(f"{key}={shown} is already an MLflow server, which serves its own UI: open {shown} "
                         "in a browser (kd ui serves a local store: give --store with a sweep's output dir)")


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """``port`` can be listened on at ``host`` now (else uvicorn logs the error and mlflow
    server exits 0, seconds after kd ui printed a URL that does not work)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port={port} is not allowed: must be in 1..65535")
    from kd.serve import cannot_listen

    why = cannot_listen(host, port)
    if why is not None:
        raise ValueError(f"--port={port} is not allowed: {host}:{port} cannot be listened on ({why}); "
                         "pick a free port with --port, or stop what holds it")


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
                              "127.0.0.1 and print its URL",
                              description=textwrap.fill("Serve the MLflow UI for a local store on 127.0.0.1 until "
                              "Ctrl-C. An http(s) tracking URI is not served again: it is already a "
                              "server with its own UI, so kd ui prints the URL to open and exits with "
                              "status 2, starting nothing; so does a port in use. A server that exits "
                              "on its own ends kd ui with status 1.", 88))
    p.add_argument("--store", default=None, metavar="DIR_OR_URI", help="a sweep's output "
                   "dir, an mlflow.db file or a tracking URI; default $MLFLOW_TRACKING_URI, "
                   "else the newest store under runs/sweeps/ (an http(s) URI is a server already: "
                   "kd ui prints its URL and exits 2)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1, which must be free "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes "
                   "(default: %(default)s)")
    p.set_defaults(func=run_ui)


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis report|ui ...``: the same subcommands without ``kd.cli``."""
    parser = argparse.ArgumentParser(prog="kd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)

