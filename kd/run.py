"""One distillation run end to end: teacher, data, student, training, evaluation.

This is what ``kd distill`` runs and what every sweep trial runs (``kd.sweep`` wraps it
with Ray; nothing here imports Ray or MLflow). The output directory gets the student
(``save_pretrained``, safetensors, with the tokenizer), its checkpoints and
``metrics.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from kd.cache import fingerprint, write_atomic
from kd.config import KDConfig
from kd.data import load_blocks
from kd.models import build_student, check_same_tokenizer, load_pretrained, load_tokenizer
from kd.paths import cache_dir
from kd.teacher import ensure_teacher
from kd.device import pick_device, use_threads
from kd.train import Hooks, Report, online_teacher, train


def _world_dir(cfg: KDConfig) -> Path | None:
    if cfg.data.source != "world":
        return None
    from kd.world import ensure_world

    return ensure_world(cfg.data.world_size, cfg.data.world_seed)


def evaluate_model(model: torch.nn.Module, tokenizer: Any, cfg: KDConfig, *, latency: bool = True) -> dict[str, float]:
    """Task accuracies on the world's sets (when training on the world) plus size and speed
    (``latency=False``: size only, for a sweep whose latency pass times every shape)."""
    from kd.evaluate import evaluate_world
    from kd.measure import measure_model, measure_size

    model.eval()
    out: dict[str, float] = {}
    world = _world_dir(cfg)
    if world is not None:
        out.update(evaluate_world(model, tokenizer, world))
    out.update(measure_model(model, tokenizer) if latency else measure_size(model))
    return out


#: Bump whenever what the teacher's reference figures measure changes (it is in their key).
TEACHER_METRICS_VERSION = 2


def teacher_metrics(teacher: torch.nn.Module | None, tokenizer: Any, teacher_source: str, cfg: KDConfig,
                    val_blocks: torch.Tensor, load: Callable[[], torch.nn.Module] | None = None,
                    device: torch.device | None = None) -> dict[str, float]:
    """The teacher's reference figures, computed once per teacher and data and cached.

    ``teacher`` may be None with a ``load`` callable: the teacher is then loaded only when
    the figures are not cached yet (a cache-mode trial never loads it: kd.sweep computes
    them before the trials start). ``device``: where the teacher runs (default: where
    ``teacher`` is, else the CPU), which resolves ``train.precision=auto`` for the key.
    The key holds the teacher's weights (by contents), the tokenizer, the blocks (data
    settings and the source's contents) and the precision; latency figures are those of
    the machine that computed them.
    """
    from kd.data import blocks_fingerprint, tokenizer_fingerprint
    from kd.device import precisions_served
    from kd.soft_labels import weights_fingerprint
    from kd.train import validation_loss

    if device is None:
        device = next(teacher.parameters()).device if teacher is not None else torch.device("cpu")
    base = {"kind": "teacher_metrics", "version": TEACHER_METRICS_VERSION,
            "teacher": weights_fingerprint(teacher_source), "tokenizer": tokenizer_fingerprint(tokenizer),
            "blocks": blocks_fingerprint(cfg.data, tokenizer)}
    served = precisions_served(device, cfg.train.precision)
    paths = [cache_dir() / "teacher_metrics" / f"{fingerprint({**base, 'precision': p})}.json" for p in served]
    for path in paths:
        if path.exists():
            return json.loads(path.read_text())
    if teacher is None:
        teacher = load()
    teacher = teacher.to(device)
    metrics = evaluate_model(teacher, tokenizer, cfg)
    metrics["val_loss"] = validation_loss(teacher, val_blocks, len(tokenizer), device=device, precision=served[0])
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    write_atomic(paths[0], json.dumps(metrics, indent=1).encode())
    return metrics


#: Items of each task set scored at an early-stopping rung. Every trial is scored on the
#: same items, so trials rank fairly; the final evaluation scores every item. On the
#: default world (300 completion, 400 choice, 500 QA items) this is a quarter of the cost.
RUNG_ITEMS = 100


def _with_tasks(report: Report, student: torch.nn.Module, tokenizer: Any, cfg: KDConfig,
                steps: set[int]) -> Report:
    """``report`` with the world's task accuracies added at ``steps`` (before the last)."""
    world = _world_dir(cfg)
    if world is None:  # no task sets to score: the rungs see val_loss only
        return report
    from kd.evaluate import evaluate_world

    def wrapped(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        step = int(metrics.get("step", -1))
        if checkpoint_dir is not None and step in steps and step < cfg.train.steps:
            was = student.training
            student.eval()
            with torch.no_grad():  # the first RUNG_ITEMS of each set: a rung ranks, it does not report
                metrics = {**metrics, **evaluate_world(student, tokenizer, world, limit=RUNG_ITEMS)}
            student.train(was)
        report(metrics, checkpoint_dir)

    return wrapped


def preflight(cfg: KDConfig) -> None:
    """Checks that need files but write nothing to the output: run before any training.

    A pretrained student must share the teacher's tokenizer; for a teacher the project
    trains, that is the data's tokenizer. Device, output_dir and batch sizes against the
    data: :mod:`kd.preflight` (after the tokenizers, which are quicker to check).
    """
    from kd.preflight import check_output_dir, check_training

    check_output_dir(cfg.output_dir)
    if not cfg.student.source:
        check_training(cfg)
        return
    from kd.preflight import source_tokenizer, teacher_tokenizer

    student_tok = source_tokenizer("student.source", cfg.student.source, trust_remote_code=cfg.teacher.trust_remote_code)
    check_same_tokenizer(teacher_tokenizer(cfg), student_tok)
    check_training(cfg)


def distill(
    cfg: KDConfig,
    *,
    report: Report | None = None,
    resume_from: str | os.PathLike | None = None,
    hooks: Hooks | None = None,
    progress: bool = False,
    evaluate: bool = True,
    eval_steps: Collection[int] = (),
    latency: bool = True,
) -> dict[str, float]:
    """Distill one student as ``cfg`` says; return its final metrics (teacher's as ``teacher_*``).

    Writes ``cfg.output_dir/student/`` and ``cfg.output_dir/metrics.json`` (rank 0).
    ``report`` gets every evaluation and, last, the final metrics with no checkpoint.
    At the evaluations of ``eval_steps`` (a sweep's early-stopping rungs) rank 0 also
    scores the student on the world's task sets, so the report carries the objective
    itself where a scheduler decides (and a stopped trial has its accuracies), on the
    first :data:`RUNG_ITEMS` items of each set. ``latency=False`` skips timing the student.
    """
    hooks = hooks or Hooks()
    preflight(cfg)
    out = Path(cfg.output_dir)
    device = hooks.device or pick_device(cfg.train.device)
    use_threads(cfg.train.threads)

    teacher_source = ensure_teacher(cfg, progress=progress)
    trust = cfg.teacher.trust_remote_code
    cached = cfg.teacher.mode == "cache"

    def load_teacher() -> torch.nn.Module:
        return load_pretrained(teacher_source, trust_remote_code=trust)[0].to(device)

    if cached:  # the teacher's weights stay on disk: its soft labels come from the cache
        teacher, tokenizer = None, load_tokenizer(teacher_source, trust_remote_code=trust)
    else:
        teacher, tokenizer = load_pretrained(teacher_source, trust_remote_code=trust)
    if cfg.student.source:
        student, student_tok = load_pretrained(cfg.student.source, trust_remote_code=trust)
        check_same_tokenizer(tokenizer, student_tok)
    elif teacher is None and cfg.student.init != "teacher":
        # A random student needs only the teacher's config (build_student reads .config).
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(teacher_source, trust_remote_code=trust)
        student = build_student(SimpleNamespace(config=config), cfg.student, seed=cfg.train.seed)
    else:  # init=teacher copies the teacher's weights: load it for that alone in cache mode
        student = build_student(teacher if teacher is not None else load_teacher(), cfg.student, seed=cfg.train.seed)
    blocks = load_blocks(cfg.data, tokenizer)
    n_vocab = len(tokenizer)

    teacher_fn = None
    if cfg.loss.kd_weight > 0 and cached:
        from kd.soft_labels import ensure_soft_labels

        # Built before the trials by a sweep; built here (a plain loop) when missing or bad.
        teacher_fn = ensure_soft_labels(cfg, teacher_source, tokenizer, blocks.train,
                                        progress=progress).teacher_fn(device)
    elif cfg.loss.kd_weight > 0:
        teacher_fn = online_teacher(teacher.to(device), n_vocab, device, cfg.train.precision, top_k=cfg.teacher.top_k)
    if report is not None and eval_steps and hooks.rank == 0:
        report = _with_tasks(report, student, tokenizer, cfg, set(eval_steps))
    final = train(student, blocks.train, blocks.val, n_vocab=n_vocab, loss_cfg=cfg.loss, cfg=cfg.train,
                  teacher=teacher_fn, report=report, checkpoint_dir=out / "checkpoints",
                  resume_from=resume_from, hooks=hooks, progress=progress)
    metrics = dict(final)
    if hooks.rank != 0:
        return metrics

    student = getattr(student, "module", student)
    student.save_pretrained(out / "student")  # safetensors
    tokenizer.save_pretrained(out / "student")
    if evaluate:
        metrics.update(evaluate_model(student, tokenizer, cfg, latency=latency))
        ref = teacher_metrics(teacher.to(device) if teacher is not None else None, tokenizer, teacher_source, cfg,
                              blocks.val, load=load_teacher, device=device)
        metrics.update({f"teacher_{k}": v for k, v in ref.items()})
        if "acc_mean" in metrics and ref.get("acc_mean"):
            metrics["retention"] = metrics["acc_mean"] / ref["acc_mean"]
    metrics = {k: float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if report is not None:
        report(metrics, None)
    return metrics


