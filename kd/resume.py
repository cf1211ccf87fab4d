"""``kd distill`` from the command line: continue from the checkpoint in ``output_dir``.

:func:`kd.train.train` checkpoints every ``train.eval_every`` steps to
``output_dir/checkpoints/checkpoint`` and resumes from it exactly. What the command line
adds is knowing *which* run a checkpoint belongs to: ``output_dir/kd_config.json`` holds
the config that wrote it, so a rerun of the same command continues, and a rerun with
other settings is refused (in one line naming what differs) instead of silently mixing
two runs or overwriting one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kd.config import ConfigError, KDConfig, to_flat_dict

#: Settings that may change between an interrupted run and its continuation: where the
#: run lives and how many threads it takes change no number it computes.
_FREE_KEYS = ("output_dir", "train.threads")
MARKER = "kd_config.json"


def checkpoint_path(cfg: KDConfig) -> Path:
    """Where :func:`kd.run.distill` has :func:`kd.train.train` write its checkpoint."""
    return Path(cfg.output_dir).expanduser() / "checkpoints" / "checkpoint"


def _settings(cfg: KDConfig) -> dict:
    flat = to_flat_dict(cfg)
    return {k: v for k, v in flat.items() if k not in _FREE_KEYS}


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint was taken at."""
    return int(json.loads((checkpoint / "state.json").read_text())["step"])


def _differences(cfg: KDConfig, marker: Path) -> list[str]:
    try:
        before = json.loads(marker.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return ["(no record of the settings that wrote it)"]
    now = _settings(cfg)
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]


def plan(cfg: KDConfig, *, resume: bool = False, fresh: bool = False) -> Path | None:
    """The checkpoint to resume from, or None to start at step 0.

    A checkpoint written by the same settings is resumed (also without ``resume``);
    ``fresh`` discards it; one written by other settings is refused with a
    :class:`ConfigError`. ``resume`` without a checkpoint is refused too.
    """
    ckpt = checkpoint_path(cfg)
    marker = Path(cfg.output_dir).expanduser() / MARKER
    has_ckpt = (ckpt / "state.json").is_file()
    if fresh:
        if marker.parent.is_dir():  # else nothing to discard (and preflight says what is wrong)
            shutil.rmtree(ckpt.parent, ignore_errors=True)
            marker.unlink(missing_ok=True)
        return None
    if not has_ckpt:
        if resume:
            raise ConfigError(f"--resume is not allowed: output_dir={cfg.output_dir!r} holds no checkpoint "
                              f"({ckpt} is missing); run without --resume to start")
        return None
    diff = _differences(cfg, marker)
    if diff:
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not allowed: it holds a checkpoint of other "
                          f"settings ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); rerun with "
                          "those settings to resume, pass --fresh to start over, or choose another output_dir")
    return ckpt


def mark(cfg: KDConfig) -> None:
    """Record the settings behind ``output_dir``'s checkpoint (once; the first checkpoint calls it)."""
    marker = Path(cfg.output_dir).expanduser() / MARKER
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"config": _settings(cfg)}, indent=1, sort_keys=True) + "\n")


def interrupted(cfg: KDConfig) -> str:
    """What an interrupted ``kd distill`` leaves, as the one line it ends with."""
    ckpt = checkpoint_path(cfg)
    if not (ckpt / "state.json").is_file():
        return (f"no checkpoint yet (one is written every train.eval_every={cfg.train.eval_every} steps); "
                "the same command starts over")
    mark(cfg)
    return f"checkpoint at step {step_of(ckpt)} in {ckpt}; rerun the same command to resume"
