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


def probe_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, in one line, when an MLflow server is not there (MLflow itself
    retries for minutes and ends in a long traceback)."""
    import urllib.error
    import urllib.request

    from kd.sweep.spec import SweepError

    if not uri.startswith(("http://", "https://")):
        return
    uri = without_credentials(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answers (an auth proxy may refuse /health): MLflow will say more
    except (OSError, ValueError) as e:
        raise SweepError(f"MLFLOW_TRACKING_URI={uri} does not answer ({getattr(e, 'reason', e)}): start the "
                         "tracking server, or unset MLFLOW_TRACKING_URI to log to a local mlflow.db") from None


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
