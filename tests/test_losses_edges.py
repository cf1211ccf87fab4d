"""kd.losses at the edges: -inf logits (masked vocabulary entries) and vocabularies past
int16 (65,536) and Megatron's 17-bit ids (131,072)."""

from __future__ import annotations

import math

import pytest
import torch

from kd.losses import DIVERGENCES, distillation_loss

B, T, V, MASKED = 2, 4, 12, 5  # the last MASKED ids are -inf for teacher and student


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V - MASKED, (B, T), generator=g)
    labels[0, 0] = -100
    student[..., V - MASKED:] = -math.inf
    teacher[..., V - MASKED:] = -math.inf
    return student, teacher.half().float(), labels


def _loss_and_grad(student, labels, div, temperature, **targets):
    s = student.clone().requires_grad_(True)
    parts = distillation_loss(s, labels, temperature=temperature, kd_weight=0.6, divergence=div,
                              jsd_beta=0.3, skew_alpha=0.2, **targets)
    parts.loss.backward()
    return parts, s.grad


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_minus_inf_logits_equal_the_reduced_vocabulary(div, sparse, temperature):
    student, teacher, labels = _inputs()
    kept = V - MASKED
    if sparse:  # k = V - 2: two -inf logits are among the kept ones
        values, indices = teacher.topk(V - 2, dim=-1)
        full = dict(topk_indices=indices, topk_values=values.half())
        rv, ri = teacher[..., :kept].topk(kept, dim=-1)
        reduced = dict(topk_indices=ri, topk_values=rv.half())
    else:
        full, reduced = dict(teacher_logits=teacher), dict(teacher_logits=teacher[..., :kept])
    parts, grad = _loss_and_grad(student, labels, div, temperature, **full)
    ref, ref_grad = _loss_and_grad(student[..., :kept].contiguous(), labels, div, temperature, **reduced)
    assert torch.isfinite(grad).all(), f"{div}: NaN/inf in the gradient"
    for a, b in zip(parts, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[..., :kept], ref_grad, rtol=1e-5, atol=1e-7)
    assert (grad[..., kept:] == 0).all()


@pytest.mark.parametrize("vocab", [70_000, 140_000])
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_large_vocabulary_ids_past_int16_and_17_bits(vocab, div):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 3, vocab, generator=g)
    teacher = torch.randn(1, 3, vocab, generator=g)
    teacher[..., -7:] += 20.0  # the teacher's favourites are the last ids (> 65,536 / > 131,072)
    labels = torch.tensor([[vocab - 1, vocab - 3, 5]])
    values, indices = teacher.topk(vocab, dim=-1)  # k = V: the sparse loss must be the dense one
    assert indices[..., :7].min() >= vocab - 7
    _, dense_grad = _loss_and_grad(student, labels, div, 2.0, teacher_logits=teacher.half().float())
    parts, grad = _loss_and_grad(student, labels, div, 2.0, topk_indices=indices.int(), topk_values=values.half())
    dense, _ = _loss_and_grad(student, labels, div, 2.0, teacher_logits=teacher.half().float())
    torch.testing.assert_close(parts.kd, dense.kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-3, atol=1e-8)
    assert grad[..., -7:].abs().sum() > 0
