"""Is the Hugging Face hub reachable? If not, say so to ``huggingface_hub``, ``datasets`` and
``transformers`` before they try.

Without ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` a machine with no network spends 30 s
or more in the hub clients' retries and ends in a long ConnectionError traceback; with them
set, the same lookups fail at once and the callers' one-line errors (a local path that does
not exist, a data set that is not cached) come first. :func:`offline_unless_reachable`
probes the hub once per process (a TCP connect, seconds at most) and, when it cannot be
reached, sets both variables for this process and its children, and the flags of the hub
clients already imported (they read the variables once, at import).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

#: What the hub clients treat as "on" (huggingface_hub's ``_is_true``, datasets' ENV_VARS_TRUE_VALUES).
_TRUE = ("1", "on", "yes", "true")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_DEFAULT_ENDPOINT = "https://huggingface.co"

_reachable: bool | None = None  # one probe per process: every later lookup gets the same answer


def offline() -> bool:
    """Whether the environment already asks the hub clients to stay offline."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in (*_OFFLINE_VARS, "TRANSFORMERS_OFFLINE"))


def hub_address() -> tuple[str, int]:
    """``(host, port)`` a hub request first connects to: ``$HF_ENDPOINT`` (default huggingface.co),
    or the HTTPS proxy when one is set (the hub is then reached through it)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = proxy if proxy and not _no_proxy(hub_host()) else os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def hub_host() -> str:
    return urlsplit(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).hostname or ""


def _no_proxy(host: str) -> bool:
    entries = (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
    return any(e.strip() == "*" or (e.strip() and host.endswith(e.strip().lstrip("."))) for e in entries)


def reachable(address: tuple[str, int] | None = None, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``address`` (default :func:`hub_address`) opens within
    ``timeout_s``, name lookup included (``getaddrinfo`` has no timeout of its own: it runs
    in a thread that is abandoned when it takes too long)."""
    host, port = address or hub_address()
    if not host:
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True, name="kd-hub-probe")
    worker.start()
    worker.join(timeout_s + 0.5)  # create_connection's own timeout covers the connect, not the lookup
    return bool(result and result[0])


def offline_unless_reachable(timeout_s: float = 3.0) -> bool:
    """Go offline (for this process and its children) when the hub cannot be reached.

    Returns whether hub lookups are offline now. Does nothing, and probes nothing, when the
    environment already says offline; probes once per process otherwise.
    """
    global _reachable
    if offline():
        return True
    if _reachable is None:
        _reachable = reachable(timeout_s=timeout_s)
    if _reachable:
        return False
    set_offline()
    return True


def set_offline() -> None:
    """``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` here, and in the hub clients already
    imported (each copies the variable into a module flag at import and reads that flag)."""
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # transformers asks huggingface_hub.is_offline_mode(), which reads this
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


def is_path_like(source: str) -> bool:
    """Whether ``source`` is clearly meant as a path, never a hub id: absolute, ``~``-rooted,
    or relative with ``./``/``../`` (``.`` and ``..`` included). A bare ``name`` or
    ``org/name`` may be either, and is a hub id unless it exists locally."""
    return source in (".", "..") or source.startswith(("/", "~", "./", "../"))


def not_a_folder(source: str) -> str | None:
    """Why ``source``, clearly meant as a path, is no folder ("no such folder", "it is a
    file, not a folder"), or None (a folder, or a name that may be a hub id)."""
    import os.path

    if not is_path_like(source):
        return None
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return None
    return "it is a file, not a folder" if os.path.exists(path) else "no such folder"


def check_local_folder(source: str) -> None:
    """Raise :class:`FileNotFoundError` (one line) when ``source`` is clearly a path and not a
    folder: the hub clients would call it a malformed repo id, or retry the hub for it."""
    why = not_a_folder(source)
    if why is not None:
        raise FileNotFoundError(f"{source}: {why} (give a save_pretrained directory, or a hub id such as gpt2)")
