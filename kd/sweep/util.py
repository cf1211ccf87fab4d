"""Small helpers of the sweep layer (no Ray)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kd.cache import write_atomic


def without_credentials(uri: str) -> str:
    """``uri`` with any ``user:password@`` removed (what may be printed or written)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def dump_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temp file, then a rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(_finite(data), indent=1, sort_keys=True, default=str).encode())


def _finite(v: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


#: The schemes MLflow's own tracking store registry holds without plugins (mlflow 3): known
#: here so that the usual URIs need no mlflow import (seconds) to be accepted.
_MLFLOW_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                   "databricks-uc", "uc")
_STAY_LOCAL = "unset MLFLOW_TRACKING_URI to log to a local mlflow.db"


def probe_tracking(uri: str, timeout_s: float = 5.0, *, key: str = "MLFLOW_TRACKING_URI",
                   instead: str = _STAY_LOCAL) -> None:
    """Fail in seconds, in one line, when ``uri`` is no MLflow store MLflow can open: a scheme it
    has no store for, or an http(s) address where no MLflow server answers (MLflow itself
    retries for minutes, or fails after Ray started, in a long traceback).

    ``key`` names where the URI came from and ``instead`` what else to do, in the message;
    the URI is printed without credentials.
    """
    from kd.sweep.spec import SweepError

    if not uri:
        return
    shown = without_credentials(uri)
    schemes = unsupported_scheme(uri)
    if schemes is not None:
        raise SweepError(f"{key}={shown} is not allowed: MLflow has no tracking store for the scheme "
                         f"{_scheme(uri)!r}; use a URI of scheme {', '.join(s for s in schemes if s)}, "
                         "or a plain directory path")
    if _scheme(uri) not in ("http", "https"):
        return
    status, body, reason = _get_health(shown, timeout_s)
    if reason is not None:
        raise SweepError(f"{key}={shown} does not answer ({reason}): start the tracking server, or {instead}")
    if status in (401, 403):
        return  # an auth proxy in front of MLflow may refuse /health: it is there, MLflow will say more
    if status != 200 or body.strip() != b"OK":
        answer = f"HTTP {status}" if status != 200 else f"HTTP 200 {body[:40]!r}"
        raise SweepError(f"{key}={shown} answers but is not an MLflow server (GET /health gave {answer}, "
                         f"MLflow's gives 'OK'): set it to the tracking server's URL, or {instead}")


def _scheme(uri: str) -> str:
    """The scheme as MLflow reads it: ``postgresql+psycopg2`` is ``postgresql``, a path has none."""
    return urlsplit(uri).scheme.lower().split("+", 1)[0]


def unsupported_scheme(uri: str) -> list[str] | None:
    """None when MLflow has a tracking store for ``uri``'s scheme, else the schemes it has.

    A scheme outside the built-in ones is looked up in MLflow's own registry, which also
    holds the stores that plugins register (entry points).
    """
    if _scheme(uri) in _MLFLOW_SCHEMES:
        return None
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry
    except ImportError:  # a private path of mlflow's: if it moves, the built-in list still answers
        return list(_MLFLOW_SCHEMES)
    try:
        registry.get_store_builder(uri)
    except MlflowException:
        return sorted(registry._registry)
    return None


def _get_health(uri: str, timeout_s: float) -> tuple[int, bytes, str | None]:
    """``(status, first bytes of the body, None)`` of ``GET uri/health``, or ``(0, b"", why)``
    when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status, r.read(64), None
    except urllib.error.HTTPError as e:
        return e.code, b"", None
    except (OSError, ValueError) as e:
        return 0, b"", str(getattr(e, "reason", e))


def probe_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds, in one line, when ``--address host:port`` has no Ray listening
    (``ray.init`` retries for minutes). ``auto`` is left to Ray, which fails fast."""
    import socket

    from kd.sweep.spec import SweepError

    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address={address!r} is not allowed: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise SweepError(f"--address={address}: no Ray there ({e.strerror or e}); start the cluster "
                         "(ray up / ray start --head) or drop --address for a local Ray") from None


def preflight(use_gpu: bool, address: str | None) -> None:
    """The checks that need no Ray, run before Ray or torch is even imported where possible:
    the tracking server, the cluster address, and a GPU for ``--gpu`` on a local Ray."""
    probe_tracking(os.environ.get("MLFLOW_TRACKING_URI", ""))
    probe_address(address)
    if use_gpu and not address:
        import torch

        from kd.sweep.spec import SweepError

        if not torch.cuda.is_available():  # else the trial waits for a GPU forever (PENDING)
            raise SweepError("--gpu is not possible here: torch sees no CUDA device on this machine; drop --gpu")
