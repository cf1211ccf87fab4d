"""Publishing cache entries atomically and naming them by their inputs: one place for both.

Readers of a cache (other trials, other nodes on shared storage) must see an entry whole
or not at all, so an entry is written under a temp name in the same directory and
renamed into place (``os.replace`` is atomic within a filesystem): :func:`atomic_file`
and :func:`write_atomic` for files, :func:`building_dir` and :func:`publish_dir` for
directories. Every cache of the project (worlds, tokenizers, packed blocks, teachers,
teacher metrics, soft labels) and every file a run or a sweep must never leave half
written (checkpoints, sweep state) goes through them.

An entry is named by :func:`fingerprint` of a key dict: canonical JSON of everything the
entry depends on, hashed. A key holds values, never names of things that can change
under the same name: a local file is in a key by its contents' sha256
(:func:`file_digest`), not by its path.

This module imports nothing from ``kd``: every other module may import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Hex digits of a fingerprint: 64 bits, a directory or file name.
FINGERPRINT_CHARS = 16


# ------------------------------------------------------------------------- keys


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"a cache key holds JSON values, dataclasses and paths, not {type(obj).__name__}: {obj!r}")


def canonical_json(key: Any) -> str:
    """``key`` as one canonical JSON text: sorted keys, no spaces, no NaN.

    Strict on purpose: a value JSON cannot spell (an object whose ``str`` holds a memory
    address, say) raises ``TypeError`` instead of entering a key as text that differs in
    every process or hides what it stands for.
    """
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_jsonable)


def fingerprint(key: Any) -> str:
    """The name of a cache entry: sha256 of :func:`canonical_json` of ``key``, shortened.

    ``key`` is a dict of everything the entry depends on (a dataclass counts as its
    fields); two keys that differ anywhere give different names.
    """
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:FINGERPRINT_CHARS]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (a large shard is never held in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file's contents, remembered in the JSON file ``memo`` when given.

    The memo maps a file's identity (resolved path, size, inode, mtime and ctime in ns) to
    its digest, so a file that has not changed is hashed once, not by every trial; any
    write to the file changes its mtime and ctime, so an edited file is hashed again.
    """
    if memo is None:
        return sha256_file(path)
    st = Path(path).stat()
    ident = f"{Path(path).resolve()}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if ident not in known:
        known[ident] = sha256_file(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps(known, indent=1, sort_keys=True).encode())  # a lost race only re-hashes
    return known[ident]


# ------------------------------------------------------------------- publishing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; renamed to ``path`` when the block ends.

    If the block raises, the temp file is removed and ``path`` is untouched. The file gets
    the permissions the umask allows (``mkstemp`` alone would make it 0600, unreadable by
    the other users of a shared cache).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a reader sees the old file or the new one, never half."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def publish_dir(tmp: Path, path: Path, complete: Callable[[Path], bool] | None = None) -> bool:
    """Rename the finished directory ``tmp`` to ``path``; True when ours is the one there.

    A directory already at ``path`` that ``complete`` accepts (another process published
    first: built from the same inputs, as good as ours) is kept. Any other directory there
    is a bad entry (with ``complete=None``, every one: a good one would not be rebuilt):
    it is moved aside atomically and deleted. ``tmp`` is left for the caller to remove
    when it was not published (:func:`building_dir` does).
    """
    if path.exists():
        if complete is not None and complete(path):
            return False
        trash = path.parent / f".bad-{path.name}-{os.getpid()}-{time.time_ns()}"
        try:
            os.replace(path, trash)
        except OSError:  # another process moved or replaced it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process published first: theirs is as good as ours
        return False
    return True


def temp_dir_beside(path: Path) -> Path:
    """A new empty directory beside ``path`` (made if missing) to build its entry in.

    It gets the permissions the umask allows (``mkdtemp`` alone would make it 0700: a
    cache on shared storage must be readable by the cluster's other nodes and users).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def building_dir(path: Path, complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temp directory beside ``path`` to build an entry in; published when the block ends.

    The block writes the entry's files into the directory it is given; on a normal exit it
    is published as :func:`publish_dir` says, and whatever is left (a failed build, or a
    build another process beat) is removed. The directory is :func:`temp_dir_beside`'s.
    """
    path = Path(path)
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        publish_dir(tmp, path, complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
