"""Checks that need the machine, the file system or the data, run before any training.

:func:`kd.config.validate` checks values alone; what passes it can still fail an hour
later (``train.device=cuda`` on a machine without CUDA, an ``output_dir`` that is a file, a
read-only cache directory, a batch larger than the data). These checks find that first,
write nothing outside the cache (the world and the packed blocks they load are cached for
the run anyway), and
raise :class:`~kd.config.ConfigError` with one line that names key, value and what to do.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd.config import ConfigError, KDConfig


def check_device(key: str, name: str) -> None:
    """``cuda`` needs a visible CUDA device; ``auto`` and ``cpu`` always run."""
    if name != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"{key}={name!r} is not allowed here: {why}; use auto or cpu")


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> None:
    """``path`` is a directory, or can be made one, and can be written.

    Writability is probed with a temporary file in the nearest existing folder (removed at
    once): permission bits say nothing about read-only mounts, nor about root.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is not allowed: it is a file, not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is not allowed: {str(probe)!r} is a file, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".kd-write-probe-")
    except OSError as e:
        raise ConfigError(f"{key}={str(path)!r} is not allowed: {str(probe)!r} cannot be written "
                          f"({e.strerror}); choose a writable directory") from None
    os.close(fd)
    os.unlink(tmp)


def check_cache_dir() -> None:
    """The cache root (``$KD_CACHE_DIR``, default ``~/.cache/kd``) can be written: the world,
    data blocks, teacher and soft labels are built there before anything else runs."""
    from kd.paths import cache_dir

    check_output_dir(cache_dir(), key="KD_CACHE_DIR")


def check_batch_size(key: str, batch_size: int, n_blocks: int, world_size: int = 1) -> None:
    """A step needs ``batch_size`` blocks on each of ``world_size`` workers (kd.train drops no epoch)."""
    per_worker = n_blocks // max(1, world_size)
    if batch_size > per_worker:
        workers = f" per worker ({world_size} workers)" if world_size > 1 else ""
        raise ConfigError(f"{key}={batch_size} is not allowed: the data has only {per_worker} training "
                          f"blocks{workers}; use at most {per_worker} or add data")


def source_tokenizer(key: str, source: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a hub id or local model directory, or a one-line :class:`ConfigError`."""
    from kd.models import load_tokenizer

    try:
        return load_tokenizer(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:  # offline, unknown id, not a model folder
        if Path(source).expanduser().exists():
            raise ConfigError(f"{key}={source!r} is not allowed: that path holds no loadable tokenizer "
                              f"({_first_line(e)}); give a save_pretrained directory") from None
        raise ConfigError(f"{key}={source!r} is not allowed: it is not an existing local directory and could "
                          f"not be loaded as a hub id ({_first_line(e)})") from None


def teacher_tokenizer(cfg: KDConfig) -> Any:
    """The tokenizer the run trains with: the data's for a project-trained teacher, else the teacher's."""
    if cfg.teacher.source == "train":
        from kd.teacher import data_tokenizer

        return data_tokenizer(cfg)
    return source_tokenizer("teacher.source", cfg.teacher.source, trust_remote_code=cfg.teacher.trust_remote_code)


def check_training(cfg: KDConfig, *, world_size: int = 1, student: bool = True) -> Any:
    """Device, teacher source and batch sizes against the data; returns the tokenizer.

    ``student=False`` checks only what ``kd teacher`` needs.
    """
    check_device("train.device", cfg.train.device)
    check_cache_dir()
    from kd.data import load_blocks

    with _quiet_datasets():  # a refusal is one line on stderr, not progress bars and then a line
        tokenizer = teacher_tokenizer(cfg)
        n = len(load_blocks(cfg.data, tokenizer).train)
    if cfg.teacher.source == "train":
        check_batch_size("teacher.batch_size", cfg.teacher.batch_size, n)
    if student:
        check_batch_size("train.batch_size", cfg.train.batch_size, n, world_size)
    return tokenizer


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` without its progress bars (they go to stderr), restored afterwards."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
