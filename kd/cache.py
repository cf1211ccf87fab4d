"""Publishing cache entries atomically and hashing their inputs: one place for both.

Readers of a cache (other trials, other nodes on shared storage) must see an entry whole
or not at all, so an entry is written under a temp name in the same directory and
renamed into place (``os.replace`` is atomic within a filesystem). Used by
:mod:`kd.soft_labels`; kd.data and kd.teacher still carry their own copies (issue 14,
item 8: their owners move them here).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (a large shard is never held in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory ``tmp`` to ``path``.

    A directory already at ``path`` is a bad entry (a good one would not be rebuilt): it is
    moved aside atomically and deleted. If another process publishes first, theirs is kept
    (it is built from the same inputs) and ``tmp`` is left for the caller to remove.
    """
    if path.exists():
        trash = path.parent / f".bad-{path.name}-{os.getpid()}-{time.time_ns()}"
        try:
            os.replace(path, trash)
        except OSError:  # another process moved or replaced it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process published first: theirs is as good as ours
        pass
