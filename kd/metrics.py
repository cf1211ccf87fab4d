"""Every metric name the project reports, once, with its unit and direction.

Sweeps choose objectives from these names, analysis reads their direction from here,
and MLflow runs carry exactly these keys (the teacher's copies on a sweep's parent run
are prefixed with ``teacher_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["max", "min"]


@dataclass(frozen=True)
class Metric:
    """A reported quantity: its name, unit and whether larger is better."""

    name: str
    unit: str
    direction: Direction
    description: str


_METRICS = [
    Metric("val_loss", "nats/token", "min", "cross-entropy on held-out blocks"),
    Metric("val_ppl", "", "min", "exp(val_loss)"),
    Metric("kd_loss", "nats/token", "min", "distillation divergence (times T^2) on training batches"),
    Metric("ce_loss", "nats/token", "min", "cross-entropy on training batches"),
    Metric("train_loss", "nats/token", "min", "the combined training objective"),
    Metric("acc_completion", "fraction", "max", "final word exactly predicted (LAMBADA-style)"),
    Metric("acc_choice", "fraction", "max", "multiple-choice accuracy (HellaSwag-style)"),
    Metric("em_qa", "fraction", "max", "closed-book QA exact match (NQ-open-style)"),
    Metric("f1_qa", "fraction", "max", "closed-book QA token F1"),
    Metric("acc_mean", "fraction", "max", "mean of acc_completion, acc_choice, em_qa, f1_qa"),
    Metric("retention", "fraction", "max", "student acc_mean / teacher acc_mean"),
    Metric("params", "count", "min", "all parameters"),
    Metric("params_non_embedding", "count", "min", "parameters outside token/position embeddings"),
    Metric("size_mb", "MB", "min", "bytes of the safetensors weights / 1e6"),
    Metric("flops_per_token", "FLOP", "min", "analytic forward FLOPs per token"),
    Metric("latency_ms_per_token", "ms", "min", "batch-1 decode with KV cache, median"),
    Metric("prefill_tokens_per_s", "tokens/s", "max", "batch-1 prompt processing throughput"),
    Metric("tokens_per_s", "tokens/s", "max", "training throughput"),
    Metric("train_time_s", "s", "min", "wall time of the training loop"),
]

METRICS: dict[str, Metric] = {m.name: m for m in _METRICS}

#: The task accuracies whose mean is ``acc_mean``.
TASK_METRICS = ("acc_completion", "acc_choice", "em_qa", "f1_qa")


def direction(name: str) -> Direction:
    """Return ``"max"`` or ``"min"`` for a metric name (``teacher_`` prefix allowed)."""
    key = name.removeprefix("teacher_")
    if key not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[key].direction
