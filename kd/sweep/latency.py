"""The latency pass: decode latency per distinct student shape, measured after the trials.

Latency depends on the architecture, not the weights, and timing it inside each trial
measured the machine instead: two 2x128 students of one sweep read 0.98 and 1.49 ms per
token, and that noise chose the Pareto knee. So the driver times each distinct shape
(and the teacher) once, after Ray has shut down (nothing else running), in this one
process with a fixed thread count, warming every model up first and then interleaving the
repeats (shape A, B, C, A, B, C, ...) so that a slow moment of the machine falls on every
shape alike. The median and its spread are logged on every child run of that shape, which
therefore all carry the same latency.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from kd.config import KDConfig

REPEATS = 9
THREADS = 1  # the same on every machine and the least sensitive to other processes


def _key(shape: dict[str, Any]) -> str:
    return repr(sorted((k, v) for k, v in shape.items() if k not in ("init", "source")))


def _student_dir(t: dict[str, Any], trials_dir: Path, tracker, tmp: Path) -> Path | None:
    local = trials_dir / t["trial_id"] / "student"
    if local.is_dir():
        return local
    if t.get("run_id"):  # a cluster: the trial ran on another node; MLflow has the student
        try:
            return Path(tracker.client.download_artifacts(t["run_id"], "student", str(tmp)))
        except Exception:  # noqa: BLE001 - no artifact (a stopped trial): another run of the shape will do
            return None
    return None


def time_models(models: dict[str, Any], repeats: int = REPEATS, threads: int = THREADS) -> dict[str, dict[str, float]]:
    """``{name: {"median", "std", "cv", "runs"}}`` of ms per decoded token, interleaved repeats."""
    from kd.measure import latency

    samples: dict[str, list[float]] = {name: [] for name in models}
    for name, (model, tok) in models.items():  # warm-up: allocator, caches, lazy init
        latency(model, tok, repeats=1, warmup=1, threads=threads, **_lengths(model))
    for _ in range(repeats):
        for name, (model, tok) in models.items():
            samples[name].append(latency(model, tok, repeats=1, warmup=0, threads=threads,
                                         **_lengths(model))["latency_ms_per_token"])
    out = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out[name] = {"median": med, "std": std, "cv": std / med if med else 0.0, "runs": len(xs)}
    return out


def _lengths(model: Any) -> dict[str, int]:
    from kd.evaluate import max_length

    ctx = max_length(model)
    new = min(32, ctx // 2)
    return {"new_tokens": new, "prompt_len": min(32, ctx - new)}


def pass_(trials: list[dict[str, Any]], tracker, base: KDConfig, trials_dir: Path | None = None) -> dict[str, Any]:
    """Time every distinct shape among ``trials`` and the teacher; log and store the figures.

    Each trial's ``metrics["latency_ms_per_token"]`` is replaced by its shape's median
    (and ``latency_ms_per_token_std`` added); the child runs get the same two metrics at
    their last step. Returns ``{"shapes": {key: figures}, "teacher": figures}``.
    """
    from kd.measure import torch_threads
    from kd.models import load_pretrained
    from kd.teacher import ensure_teacher

    shapes: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        if t.get("shape") and t["status"] in ("FINISHED", "STOPPED"):
            shapes.setdefault(_key(t["shape"]), []).append(t)
    if not shapes:
        return {}
    trials_dir = trials_dir or Path(tracker.uri.removeprefix("sqlite:///")).parent / "trials"
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kd-latency-") as tmp:
        for key, members in shapes.items():
            for t in members:
                path = _student_dir(t, trials_dir, tracker, Path(tmp) / t["trial_id"])
                if path is not None:
                    models[key] = load_pretrained(str(path))
                    break
        models["teacher"] = load_pretrained(ensure_teacher(base), trust_remote_code=base.teacher.trust_remote_code)
        with torch_threads(None):  # time_models fixes its own threads; restore the driver's after
            figures = time_models(models)
    for key, members in shapes.items():
        if key not in figures:
            continue
        f = figures[key]
        for t in members:
            t["metrics"]["latency_ms_per_token"] = f["median"]
            t["metrics"]["latency_ms_per_token_std"] = f["std"]
            if t.get("run_id"):
                step = int(t["metrics"].get("step", 0) or 0)
                tracker.log_metrics(t["run_id"], {"latency_ms_per_token": f["median"],
                                                  "latency_ms_per_token_std": f["std"]}, step=step)
    teacher = figures["teacher"]
    return {"shapes": {k: v for k, v in figures.items() if k != "teacher"}, "teacher": teacher}
