"""Where the project keeps what it can rebuild: worlds, trained teachers, soft labels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$KD_CACHE_DIR`` or ``~/.cache/kd``. Not created here."""
    env = os.environ.get("KD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kd"
