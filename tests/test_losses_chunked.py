"""The chunked loss (kd.losses_chunked) equals the unchunked one: values and gradients,
for every divergence and every kind of teacher target, masked rows included."""

from __future__ import annotations

import pytest
import torch

from kd.losses import DIVERGENCES, distillation_loss
from kd.losses_chunked import should_chunk
from tests.test_compact import _compact, _inputs


def _targets(kind: str, teacher: torch.Tensor) -> dict:
    if kind == "dense":
        return dict(teacher_logits=teacher)
    c = _compact(teacher)
    if kind == "topk":
        return dict(topk_indices=c["topk_indices"], topk_values=c["topk_values"])
    return c


def _run(student, labels, targets, div, chunk, kd_weight, dtype=torch.float32):
    s = student.clone().to(dtype).requires_grad_(True)
    parts = distillation_loss(s, labels, temperature=2.0, kd_weight=kd_weight, divergence=div, jsd_beta=0.3,
                              skew_alpha=0.2, chunk_tokens=chunk, **targets)
    parts.loss.backward()
    return parts, s.grad


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("kind", ["dense", "topk", "compact"])
@pytest.mark.parametrize("kd_weight", [0.0, 0.4, 1.0])
def test_chunked_equals_unchunked(div, kind, kd_weight):
    student, teacher, labels = _inputs(seed=21)
    targets = _targets(kind, teacher)
    ref, ref_grad = _run(student, labels, targets, div, 0, kd_weight)
    for chunk in (1, 3, 7):  # 10 rows: uneven chunks, and a chunk holding only masked rows
        parts, grad = _run(student, labels, targets, div, chunk, kd_weight)
        for a, b in zip(parts, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["dense", "compact"])
def test_chunked_ce_and_kd_stay_differentiable(kind):
    student, teacher, labels = _inputs(seed=22)
    targets = _targets(kind, teacher)
    grads = []
    for chunk in (0, 4):
        s = student.clone().requires_grad_(True)
        parts = distillation_loss(s, labels, temperature=2.0, kd_weight=0.5, chunk_tokens=chunk, **targets)
        (0.3 * parts.loss + 2.0 * parts.ce - 0.7 * parts.kd).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)


def test_chunked_low_precision_and_no_grad():
    student, teacher, labels = _inputs(seed=23)
    ref, ref_grad = _run(student, labels, dict(teacher_logits=teacher), "forward_kl", 0, 0.5, torch.bfloat16)
    parts, grad = _run(student, labels, dict(teacher_logits=teacher), "forward_kl", 4, 0.5, torch.bfloat16)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad)
    with torch.no_grad():  # evaluation: no gradient buffer is made
        got = distillation_loss(student.bfloat16(), labels, teacher_logits=teacher, temperature=2.0,
                                kd_weight=0.5, chunk_tokens=4).loss
    torch.testing.assert_close(got, ref.loss.detach())


def test_auto_chunk_rows():
    from kd.losses_chunked import AUTO_CHUNK_ROW_ELEMENTS, auto_rows

    assert auto_rows(128_256) == AUTO_CHUNK_ROW_ELEMENTS // 128_256 == 261 and auto_rows(10**9) == 1


def test_chunks_reuse_one_pair_of_buffers(monkeypatch):
    """Every chunk of forward KL writes its log-softmaxes into the same two buffers (fresh
    (rows, V) buffers per chunk cost page faults on a CPU): the same storage each call."""
    import kd.losses_fused as fused

    seen, real = [], fused.forward_rows

    def spy(*a, **kw):
        if kw.get("work") is not None:  # a chunk (the unchunked node passes none)
            seen.append(tuple(w.data_ptr() for w in kw["work"]))
        return real(*a, **kw)

    monkeypatch.setattr(fused, "forward_rows", spy)
    student, teacher, labels = _inputs(seed=24)
    parts, grad = _run(student, labels, _targets("compact", teacher), "forward_kl", 3, 0.5)
    assert len(seen) == 4 and len(set(seen)) == 1, seen
    ref, ref_grad = _run(student, labels, _targets("compact", teacher), "forward_kl", 0, 0.5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


def test_auto_chunking_threshold_and_bad_value():
    assert not should_chunk(None, 16 * 127, 2048)  # the world's batches stay one fused node
    assert should_chunk(None, 8192, 128_256)
    assert not should_chunk(0, 8192, 128_256) and should_chunk(1024, 8192, 128_256)
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens=-1 is not allowed"):
        distillation_loss(student, labels, teacher_logits=teacher, temperature=2.0, kd_weight=0.5, chunk_tokens=-1)
