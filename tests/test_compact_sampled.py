"""The compact format's sampled tail (kd.compact.sample_tail / sampled_targets, RS-KD):
draws from the right distribution, targets that are exact on the head and consistent on
the tail, and a fused loss whose values and gradients equal autograd through its formula
(the importance-weighted estimate, its gradient with the control variate of
kd.losses_fused), a gradient that is the dense one on average and nearer to it per draw
than the plain estimate's where the student's tail resembles the teacher's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.compact import compress, sample_tail, sampled_targets, temperature_grid
from kd.losses import distillation_loss

V, K = 48, 5
BETAS = temperature_grid(0.5, 8.0, 9)


def _teacher(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g) * 2.5).half().float()


def _pack(teacher: torch.Tensor, samples: int, proposal: float, seed: int = 1) -> dict:
    values, idx, lse, slope = compress(teacher, K, BETAS)
    sid, sval = sample_tail(teacher, idx, samples, proposal, torch.Generator().manual_seed(seed))
    return dict(topk_values=values[None], topk_indices=idx[None], topk_tail_lse=lse[None],
                topk_tail_slope=slope[None], tail_betas=BETAS, tail_sample_indices=sid[None],
                tail_sample_values=sval[None], proposal_temperature=proposal)


def test_samples_come_from_the_tail_at_the_proposal_temperature():
    teacher = _teacher(1).expand(4, V).contiguous()
    values, idx, _, _ = compress(teacher, K, BETAS)
    sid, sval = sample_tail(teacher, idx, 20000, 2.0, torch.Generator().manual_seed(0))
    assert not torch.isin(sid[0], idx[0]).any()  # never a kept id
    torch.testing.assert_close(sval.float(), teacher.gather(-1, sid))  # their raw logits
    freq = torch.bincount(sid.flatten(), minlength=V).double() / sid.numel()
    r = F.softmax(teacher[0].double().scatter(-1, idx[0], -math.inf) / 2.0, -1)
    assert (freq - r).abs().max().item() < 0.01  # 80,000 draws: the proposal's frequencies
    again, _ = sample_tail(teacher, idx, 20000, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(sid, again)  # seeded: a rebuilt cache draws the same ids


def test_targets_are_exact_on_the_head_and_converge_on_the_tail():
    teacher = _teacher(6)
    values, idx, lse, _ = compress(teacher, K, BETAS)
    sid, sval = sample_tail(teacher, idx, 40000, 2.0, torch.Generator().manual_seed(3))
    for t in (0.5, 1.0, 2.0, 4.0, 8.0):
        g = min(range(len(BETAS)), key=lambda i: abs(BETAS[i] - 1 / t))
        p, log_p, _ = sampled_targets(values, lse[:, g], sval, t, 2.0)
        exact = F.softmax(teacher.double() / t, -1)
        # fp32 weights over 40,000 samples: one row's sum was off by 1.13e-5 on an AVX2 EPYC
        torch.testing.assert_close(p.sum(-1).double(), torch.ones(6, dtype=torch.float64), rtol=0, atol=5e-5)
        torch.testing.assert_close(p[:, :K].double(), exact.gather(-1, idx), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(log_p.double(), exact.log().gather(-1, torch.cat([idx, sid], -1)),
                                   rtol=1e-4, atol=1e-4)
        est = torch.zeros_like(exact).scatter_add_(-1, torch.cat([idx, sid], -1), p.double())
        assert (est - exact).abs().sum(-1).max().item() < 0.03, t  # self-normalised IS: consistent


def test_equal_weights_at_the_proposal_temperature():
    teacher = _teacher(3)
    values, idx, lse, _ = compress(teacher, K, BETAS)
    sid, sval = sample_tail(teacher, idx, 7, 2.0, torch.Generator().manual_seed(0))
    p, _, _ = sampled_targets(values, lse[:, BETAS.index(min(BETAS, key=lambda b: abs(b - 0.5)))], sval, 2.0, 2.0)
    tail = p[:, K:]
    torch.testing.assert_close(tail, tail[:, :1].expand_as(tail))  # RS-KD's own case: counts


def _reference_kd(student: torch.Tensor, pack: dict, t: float, keep: torch.Tensor, control: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, surrogate) of T^2 * KL on one sequence in fp64 by autograd: the value is the
    importance-weighted estimate on the slots; the surrogate's gradient adds the control
    variate (the student's exact tail shape minus its estimate from the same samples, times
    c = clamp(sum(w v) / sum(v^2), 0, 1); no gradient through w, v, c or the shape)."""
    g = BETAS.index(min(BETAS, key=lambda b: abs(b - 1 / t)))
    tp = pack["proposal_temperature"]
    sval = pack["tail_sample_values"][0].double()
    p, log_p, log_r = sampled_targets(pack["topk_values"][0].double(), pack["topk_tail_lse"][0, :, g].double(),
                                      sval, t, tp)
    head, sid = pack["topk_indices"][0], pack["tail_sample_indices"][0]
    log_q = F.log_softmax(student / t, -1)
    slots = torch.cat([head, sid], -1)
    rows = torch.where(p > 0, p * (log_p - log_q.gather(-1, slots)), 0.0).sum(-1)
    value = t * t * rows[keep].sum() / keep.sum()
    if not control:
        return value, value
    q = log_q.detach().exp()
    tail_q = q.scatter(-1, head, 0.0)
    shape = tail_q / tail_q.sum(-1, keepdim=True)  # qt: the student's tail, exactly
    v = F.softmax(log_q.detach().gather(-1, sid) - log_r.double(), -1)
    p_tail = p[:, K:].sum(-1, keepdim=True)
    w = p[:, K:] / p_tail
    c = ((w * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)).clamp(0, 1)
    extra = p_tail * c * ((shape * log_q).sum(-1, keepdim=True) - (v * log_q.gather(-1, sid)).sum(-1, keepdim=True))
    control_rows = -extra.squeeze(-1)  # value ~ 0, gradient the control variate's
    return value, value + t * t * control_rows[keep].sum() / keep.sum()


@pytest.mark.parametrize("kd_weight", [1.0, 0.4])
def test_fused_sampled_loss_equals_autograd_through_its_formula(kd_weight):
    n, t, tp = 12, 4.0, 2.0
    teacher = _teacher(n)
    student = torch.randn(1, n, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    labels = torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(6))
    labels[0, 3] = -100
    pack = _pack(teacher, 9, tp)
    s1 = student.clone().float().requires_grad_(True)
    got = distillation_loss(s1, labels, temperature=t, kd_weight=kd_weight, **pack)
    got.loss.backward()

    s2 = student.clone().requires_grad_(True)
    keep = labels[0] != -100
    kd, surrogate = _reference_kd(s2[0], pack, t, keep)
    ce = F.cross_entropy(s2[0][keep], labels[0][keep])
    ((1 - kd_weight) * ce + kd_weight * surrogate).backward()
    assert got.kd.item() == pytest.approx(kd.item(), rel=1e-5)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)
    assert s1.grad[0, 3].abs().max().item() == 0.0  # a masked row gets no gradient

    s3 = student.clone().float().requires_grad_(True)
    chunked = distillation_loss(s3, labels, temperature=t, kd_weight=kd_weight, chunk_tokens=5, **pack)
    chunked.loss.backward()
    assert chunked.loss.item() == pytest.approx(got.loss.item(), rel=1e-6)
    torch.testing.assert_close(s3.grad, s1.grad, rtol=1e-6, atol=1e-8)


def test_the_control_variate_brings_each_draw_nearer_the_dense_gradient():
    """A student whose tail resembles the teacher's (a trained one): each draw's gradient
    is much nearer the dense one with the control variate than the plain estimate's."""
    n, t = 16, 8.0
    teacher = _teacher(n, seed=4)
    noise = torch.randn(n, V, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    student = (teacher.double() * 0.9 + 0.3 * noise).requires_grad_(True)
    keep = torch.ones(n, dtype=torch.bool)
    labels = torch.zeros(1, n, dtype=torch.long)
    (dense,) = torch.autograd.grad(distillation_loss(student[None], labels, teacher_logits=teacher[None].double(),
                                                     temperature=t, kd_weight=1.0).kd, student)
    errors = {True: [], False: []}
    for seed in range(20):
        pack = _pack(teacher, 8, 4.0, seed=seed)
        (fused,) = torch.autograd.grad(distillation_loss(student[None], labels, temperature=t, kd_weight=1.0,
                                                         **pack).kd, student)
        for control in (True, False):
            (g,) = torch.autograd.grad(_reference_kd(student, pack, t, keep, control)[1], student)
            errors[control].append(((g - dense).norm() / dense.norm()).item())
            if control:
                torch.testing.assert_close(fused, g, rtol=1e-4, atol=1e-7)  # what training uses
    with_cv, plain = sum(errors[True]) / 20, sum(errors[False]) / 20
    assert with_cv < 0.5 * plain, (with_cv, plain)


def test_the_sampled_gradient_is_the_dense_one_on_average():
    """Consistency where it matters: averaged over independent draws, the logit gradient
    from head + sampled tail tends to the dense teacher's; the buckets' does not."""
    n, t = 16, 4.0
    teacher = _teacher(n, seed=2)
    student = (torch.randn(1, n, V, generator=torch.Generator().manual_seed(9)) * 2).requires_grad_(True)
    labels = torch.zeros(1, n, dtype=torch.long)

    def grad(**targets) -> torch.Tensor:
        (g,) = torch.autograd.grad(distillation_loss(student, labels, temperature=t, kd_weight=1.0, **targets).kd,
                                   student)
        return g.flatten()

    dense = grad(teacher_logits=teacher[None])
    mean = torch.stack([grad(**_pack(teacher, 16, 4.0, seed=s)) for s in range(200)]).mean(0)
    pack = _pack(teacher, 16, 4.0)
    bucket = grad(**{k: v for k, v in pack.items() if not k.startswith(("tail_sample", "proposal"))})
    assert F.cosine_similarity(mean, dense, dim=0).item() > 0.99, F.cosine_similarity(bucket, dense, dim=0)
    assert F.cosine_similarity(bucket, dense, dim=0).item() < 0.9, F.cosine_similarity(bucket, dense, dim=0)


def test_a_sampled_tail_is_refused_where_it_does_not_apply():
    teacher = _teacher(4)
    student, labels = torch.randn(1, 4, V), torch.zeros(1, 4, dtype=torch.long)
    pack = _pack(teacher, 3, 2.0)
    with pytest.raises(ValueError, match="forward_kl only"):
        distillation_loss(student, labels, temperature=2.0, kd_weight=0.5, divergence="jsd", **pack)
    with pytest.raises(ValueError, match="proposal_temperature"):
        distillation_loss(student, labels, temperature=2.0, kd_weight=0.5, **{**pack, "proposal_temperature": None})
    bad = pack["tail_sample_indices"].clone()
    bad[0, 0, 0] = V + 3  # a drawn id past the student's vocabulary
    with pytest.raises(ValueError, match="token ids in"):
        distillation_loss(student, labels, temperature=2.0, kd_weight=0.5, **{**pack, "tail_sample_indices": bad})
    no_tail = {k: v for k, v in pack.items() if not k.startswith("topk_tail")}
    with pytest.raises(ValueError, match="need the compact format"):
        distillation_loss(student, labels, temperature=2.0, kd_weight=0.5, **{**no_tail, "tail_betas": None})


def test_an_empty_tail_keeps_the_head_exact():
    teacher = _teacher(2)
    teacher[0, K:] = -math.inf  # only K finite logits: nothing outside the kept ids
    values, idx, lse, _ = compress(teacher, K, BETAS)
    sid, sval = sample_tail(teacher, idx, 4, 2.0)
    assert torch.isinf(sval[0].float()).all()
    p, _, _ = sampled_targets(values, lse[:, 4], sval, 1 / BETAS[4], 2.0)
    assert torch.isfinite(p).all() and p[0, K:].abs().max().item() == 0.0
    assert p[0].sum().item() == pytest.approx(1.0, abs=1e-5)
