"""The compact soft-label format (kd.compact): top-k + the tail's log-partition grid, and
the (k + 1)-bucket losses against fp64 references from the dense logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.compact import compress, interpolate, tail_log_partition, temperature_grid
from kd.losses import DIVERGENCES, distillation_loss
from tests.test_losses import reference

B, T, V, K = 2, 5, 40, 6
BETAS = temperature_grid(0.5, 8.0, 9)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = (torch.randn(B, T, V, generator=g) * 3).half().float()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    return student, teacher, labels


def _compact(teacher: torch.Tensor, k: int = K, betas=BETAS) -> dict:
    values, indices, lse, slope = compress(teacher.reshape(-1, teacher.shape[-1]), k, betas)
    shape = teacher.shape[:-1]
    return dict(topk_values=values.reshape(*shape, k), topk_indices=indices.reshape(*shape, k),
                topk_tail_lse=lse.reshape(*shape, -1), topk_tail_slope=slope.reshape(*shape, -1), tail_betas=betas)


def _buckets(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(N, V) probabilities -> (N, k + 1): the kept ids, then the rest summed (fp64)."""
    head = x.gather(-1, idx)
    return torch.cat([head, (x.sum(-1) - head.sum(-1)).clamp(min=0)[:, None]], -1)


def test_grid_is_geometric_and_checked():
    betas = temperature_grid(0.5, 8.0, 5)
    assert betas[0] == pytest.approx(1 / 8) and betas[-1] == pytest.approx(2.0)
    assert [b2 / b1 for b1, b2 in zip(betas, betas[1:])] == pytest.approx([2.0] * 4)
    with pytest.raises(ValueError, match="need 0 < t_min <= t_max"):
        temperature_grid(4.0, 2.0, 3)
    with pytest.raises(ValueError, match="points=1"):
        temperature_grid(1.0, 2.0, 1)


def test_tail_log_partition_is_exact_and_interpolates_closely():
    _, teacher, _ = _inputs()
    z = teacher.reshape(-1, V).double()
    values, idx = z.topk(K, -1)
    lse, slope = tail_log_partition(z, idx, BETAS)
    off = z.scatter(-1, idx, -math.inf)
    for g, b in enumerate(BETAS):
        torch.testing.assert_close(lse[:, g].double(), torch.logsumexp(b * off, -1), rtol=1e-6, atol=1e-6)
        w = F.softmax(b * off, -1)
        torch.testing.assert_close(slope[:, g].double(), (w * off.nan_to_num(neginf=0)).sum(-1), rtol=1e-5, atol=1e-5)
        # On the grid the interpolation returns the stored column itself.
        assert torch.equal(interpolate(lse, slope, BETAS, b), lse[:, g])
    for b in (0.15, 0.3, 0.7, 1.3):  # between grid points (T = 6.7, 3.3, 1.4, 0.77)
        exact = torch.logsumexp(b * off, -1)
        err = (interpolate(lse, slope, BETAS, b).double() - exact).abs().max().item()
        assert err < 2e-3, (b, err)
    with pytest.raises(ValueError, match="temperature=16 is not allowed.*T in \\[0.5, 8\\]"):
        interpolate(lse, slope, BETAS, 1 / 16)
    with pytest.raises(ValueError, match="no slopes"):
        interpolate(lse, None, BETAS, 0.3)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 3.0])  # 3.0 lies between grid points
def test_bucket_loss_matches_fp64_reference_from_dense_logits(div, temperature):
    student, teacher, labels = _inputs(seed=3)
    targets = _compact(teacher)
    keep = labels.reshape(-1) != -100
    idx = targets["topk_indices"].reshape(-1, K)[keep]
    p = F.softmax(teacher.reshape(-1, V)[keep].double() / temperature, -1)
    s = student.clone().double().requires_grad_(True)
    q = F.softmax(s.reshape(-1, V)[keep] / temperature, -1)
    expected = temperature**2 * reference(div, _buckets(p, idx), _buckets(q, idx), 0.3, 0.2).mean()
    expected.backward()
    s32 = student.clone().requires_grad_(True)
    got = distillation_loss(s32, labels, temperature=temperature, kd_weight=1.0, divergence=div, jsd_beta=0.3,
                            skew_alpha=0.2, **targets).kd
    got.backward()
    tol = 1e-5 if temperature in (0.5, 1.0, 4.0) else 2e-3  # off the grid: the interpolation's error
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s.grad, rtol=tol, atol=1e-6 if tol < 1e-4 else 1e-4)


@pytest.mark.parametrize("kd_weight", [0.3, 1.0])
def test_fused_bucket_forward_kl_equals_the_autograd_path(kd_weight):
    student, teacher, labels = _inputs(seed=5)
    targets = _compact(teacher)
    out = []
    for div, alpha in (("forward_kl", 0.1), ("skew_kl", 0.0)):  # skew 0 = forward KL, generic path
        s = student.clone().requires_grad_(True)
        parts = distillation_loss(s, labels, temperature=2.0, kd_weight=kd_weight, divergence=div,
                                  skew_alpha=alpha, **targets)
        (parts.loss + 0.5 * parts.kd + 0.25 * parts.ce).backward()
        out.append((parts, s.grad))
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-7)


def test_bucket_loss_beats_the_renormalised_top_k_at_high_temperature():
    student, teacher, labels = _inputs(seed=7)
    dense = distillation_loss(student, labels, teacher_logits=teacher, temperature=4.0, kd_weight=1.0).kd
    c = _compact(teacher)
    compact = distillation_loss(student, labels, temperature=4.0, kd_weight=1.0, **c).kd
    topk = distillation_loss(student, labels, topk_indices=c["topk_indices"], topk_values=c["topk_values"],
                             temperature=4.0, kd_weight=1.0).kd
    assert abs(compact - dense) < abs(topk - dense)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_masked_rows_and_minus_inf_logits_keep_buckets_finite(div):
    student, teacher, labels = _inputs(seed=9)
    labels = torch.where(labels == -100, -100, labels % 10)  # labels among the finite logits
    teacher[..., -30:] = -math.inf  # only 10 finite logits, all of them kept: an empty tail
    student[..., -30:] = -math.inf
    targets = _compact(teacher, k=10)
    assert (targets["topk_tail_lse"] == -math.inf).all()
    targets["topk_tail_lse"][0, 1] = math.nan  # a masked row's tail holds garbage
    s = student.clone().requires_grad_(True)
    parts = distillation_loss(s, labels, temperature=3.0, kd_weight=0.5, divergence=div, **targets)
    parts.loss.backward()
    assert torch.isfinite(s.grad).all() and all(torch.isfinite(x) for x in parts)
    # An empty tail bucket is the dense loss on the finite logits (the reduced vocabulary).
    r = student[..., :10].clone().requires_grad_(True)
    ref = distillation_loss(r, labels, teacher_logits=teacher[..., :10], temperature=3.0, kd_weight=0.5,
                            divergence=div)
    ref.loss.backward()
    for a, b in zip(parts, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad[..., :10], r.grad, rtol=1e-5, atol=1e-7)
