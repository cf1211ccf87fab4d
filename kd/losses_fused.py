"""Cross-entropy + T^2-scaled forward KL in one autograd node: the training loop's hot path.

Autograd on the textbook formulas (:mod:`kd.losses`) keeps a dozen (N, V) fp32 tensors
alive and runs a backward kernel for each: on the world's students the loss took more
than half of a training step. The gradient of this loss with respect to the student's
logits has a closed form,

    d/ds [(1 - a) CE + a T^2 KL(p_T || q_T)] = (1 - a) (q - onehot(y)) + a T (q_T - p_T)

(q = softmax(s), q_T = softmax(s / T), p_T the tempered teacher, per unmasked row, all
divided by the number of unmasked rows), so the forward pass computes the three
distributions once, keeps them for the backward, and the backward is two
multiply-adds. Masked rows (label ``-100``) are excluded by ``torch.where`` on their
per-row values and gradient rows, never by boolean indexing (which copies (N, V)
tensors, scatters in the backward and syncs with the device): whatever a masked row
holds (padding, inf) changes neither the value nor the gradients.

Teacher targets are dense logits (N, V) or top-k raw logits (N, k) at ids (N, k): the
truncated teacher of :mod:`kd.losses` (softmax over its k kept logits, 0 elsewhere), so
the sparse gradient is the dense one with p_T scattered onto the k ids. With the compact
format's ``tail_lse`` (N,) (:mod:`kd.compact`: the log-partition of the teacher's logits
outside the kept ids at this temperature) the teacher is instead the exact tempered
distribution on k + 1 buckets, the student's bucket being its mass outside the ids:

    KL = sum_S p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)
    d(T^2 KL)/ds_j = T (q_j - p_j) on S,   T q_j (1 - p_tail / q_tail) off S

With a sampled tail (:func:`kd.compact.sampled_targets`) the target is explicit: the head's
exact p_T and the tail's mass split over S drawn ids by self-normalised importance weights
w_s (RS-KD), (N, k + S) summing to 1. The value is estimated on those slots. Its gradient,
T (q_T - target) on the slots, is an S-spike estimate of a tail that at T >= 4 holds most
of p_T, and its variance cost grad_cos 0.23-0.95 at T = 8 on real students. So the
gradient takes a control variate: the student's own tail shape qt = q_T / q_tail off S,
known exactly, minus its estimate from the same samples (weights v_s ~ qt(s) / r(s), r
the proposal), times a coefficient c per row,

    tail target = p_tail * (sum_s w_s delta_s + c (qt - sum_s v_s delta_s))

whose added term has mean zero as S grows (both estimates are consistent). Where the
student's tail looks like the teacher's, w and v nearly cancel and what is left is the
exact bucket gradient plus a small correction. c = sum(w v) / sum(v^2), clamped to [0, 1],
minimises the spikes' squared size, sum_s (w_s - c v_s)^2, from the samples themselves: 0
(the plain estimate) where the student's tail is unlike the teacher's, near 1 where it is
alike. The gradient is then the bucket form with p_tail / q_tail scaled by c, plus
-T p_tail (w - c v) on the samples. On WikiText-2 students after 0, 10, 60 and 300 CE
steps (BENCHMARKS.md) it lifted grad_cos at T = 8 from 0.23, 0.47, 0.95, 0.60 to 0.72,
0.92, 0.998, 0.98, and cost at most 0.003 at T <= 1.

Values and gradients equal :func:`kd.losses.distillation_loss`'s reference path
(tests/test_losses.py, tests/test_compact.py, tests/test_compact_sampled.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.compact import bucket_log_probs


def known(x: float | Tensor, value: float) -> bool:
    """Whether ``x`` is the Python number ``value``.

    The temperature and the loss weight arrive as Python floats, or as 0-d tensors from a
    compiled training step (:mod:`kd.step`), which passes them as runtime inputs so that one
    graph serves every trial of a sweep. A tensor is never assumed to equal anything: its
    path is the general one (``T = 1`` then costs one more softmax, with the same result),
    and no Python branch reads its value, which would split or break the traced graph.
    """
    return not isinstance(x, Tensor) and x == value


def _kl_rows(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(p || q) per row, p) from log-probs; ``log_p`` is overwritten with p.

    In place where it can be: on a CPU every fresh (N, V) buffer costs page faults, and
    they, not the arithmetic, were most of this loss's time. A -inf teacher logit (a
    masked vocabulary entry) has p = 0 and adds 0, not 0 * inf = NaN.
    """
    diff = log_p - log_q  # (N, V)
    p = log_p.exp_()
    diff.nan_to_num_(nan=0.0, neginf=0.0)  # only where p = 0 (log p = -inf)
    # Row-wise dot products as a batched matmul: no (N, V) product is materialised.
    return torch.bmm(p.unsqueeze(1), diff.unsqueeze(2)).reshape(-1), p


def _tail_mass(q: Tensor, idx: Tensor) -> Tensor:
    """(N,) the mass of ``q`` outside the ids ``idx``, summed over those ids' complement
    (zero them in place, sum, put them back): 1 - sum_S q would lose it to cancellation
    when small. Clamped to the smallest normal float, a divisor."""
    q_s = q.gather(-1, idx)
    mass = q.scatter_(-1, idx, 0.0).sum(-1).clamp_(min=torch.finfo(torch.float32).tiny)
    q.scatter_(-1, idx, q_s)
    return mass


def forward_rows(student: Tensor, labels: Tensor, teacher: Tensor | None, idx: Tensor | None, val: Tensor | None,
                 temperature: float | Tensor, kd_weight: float | Tensor, tail_lse: Tensor | None = None,
                 count: Tensor | None = None,
                 target: Tensor | None = None, sample_log_r: Tensor | None = None, q_out: Tensor | None = None,
                 work: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """``(loss, ce, kd, saved)``: :class:`FusedForwardKL`'s forward without autograd.

    ``saved`` is what :func:`backward_rows` needs. ``q_out`` (N, V) fp32, if given, receives
    the student's softmax, in whose buffer :func:`backward_rows` then writes the gradient;
    ``work``, two fp32 buffers of at least (N, V), hold the student's log-softmax at 1 and
    at T instead of fresh tensors. The chunked loss (:mod:`kd.losses_chunked`) passes its
    rows of the (N, V) gradient and one pair of buffers for every chunk: on a CPU each fresh
    buffer of this size is memory the kernel must map and zero again (page faults), which
    made chunks 1.3-1.4x slower than one pass over the whole batch.
    """
    keep = labels != -100  # (N,)
    # A chunk of a batch (kd.losses_chunked) divides by the whole batch's count.
    count = (keep.sum().clamp(min=1) if count is None else count).to(torch.float32)
    safe_labels = torch.where(keep, labels, 0).unsqueeze(-1)  # (N, 1): gather needs a valid id
    s = student.float()
    rows = s.shape[0]
    log_q = torch.log_softmax(s, dim=-1, out=None if work is None else work[0][:rows])  # (N, V)
    ce = torch.where(keep, -log_q.gather(-1, safe_labels).squeeze(-1), 0.0).sum() / count
    kd = torch.zeros((), dtype=torch.float32, device=s.device)
    q_t = p = ratio = sid = sample_p = None
    if not known(kd_weight, 0):
        T = temperature
        if known(T, 1):
            log_q_t = log_q
        elif work is None:
            log_q_t = torch.log_softmax(s / T, dim=-1)
        else:  # s / T and its log-softmax in place, in the second buffer
            log_q_t = torch.log_softmax(torch.div(s, T, out=work[1][:rows]), dim=-1, out=work[1][:rows])
        if teacher is not None:
            log_p = torch.log_softmax(teacher.to(torch.float32, copy=True).div_(T), dim=-1)  # (N, V)
            kd_rows, p = _kl_rows(log_p, log_q_t)
        elif target is not None:  # an explicit sparse target: head + sampled tail
            # ``target`` (N, m) sums to 1 per row, ``val`` holds the teacher's exact log p_T
            # of each slot (kd.compact.sampled_targets): KL estimated on the slots.
            p = target
            log_q_slots = log_q_t.gather(-1, idx)
            kd_rows = torch.where(p > 0, p * (val - log_q_slots), 0.0).sum(-1)
        elif tail_lse is None:  # the truncated teacher on its k kept ids
            log_p = torch.log_softmax(val.to(torch.float32, copy=True).div_(T), dim=-1)  # (N, k)
            kd_rows, p = _kl_rows(log_p, log_q_t.gather(-1, idx))
        else:  # the exact teacher on k + 1 buckets
            log_p, log_p_tail = bucket_log_probs(val, tail_lse, T)  # (N, k), (N,)
            kd_rows, p = _kl_rows(log_p, log_q_t.gather(-1, idx))
        q_t = log_q_t.exp() if known(T, 1) else log_q_t.exp_()  # T = 1: log_q is needed below
        if tail_lse is not None:
            q_tail = _tail_mass(q_t, idx)
            p_tail = log_p_tail.exp()
            kd_rows = kd_rows + torch.where(p_tail > 0, p_tail * (log_p_tail - q_tail.log()), 0.0)
            ratio = (p_tail / q_tail).unsqueeze(-1)  # (N, 1): the tail's gradient weight
        if sample_log_r is not None:  # the sampled tail's control variate (module docstring)
            k = idx.shape[-1] - sample_log_r.shape[-1]
            idx, sid, p, c = idx[:, :k], idx[:, k:], p[:, :k], p[:, k:]  # head | samples (c = p_tail w)
            tiny = torch.finfo(torch.float32).tiny
            p_tail = c.sum(-1, keepdim=True)  # (N, 1): the weights sum to 1
            w = c / p_tail.clamp(min=tiny)
            v = torch.softmax(log_q_slots[:, k:] - sample_log_r, -1).nan_to_num_(0.0)  # empty tail: 0
            coef = ((w * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp(min=tiny)).clamp_(0.0, 1.0)
            ratio = coef * p_tail / _tail_mass(q_t, idx).unsqueeze(-1)  # (N, 1)
            sample_p = c - coef * p_tail * v  # (N, S): p_tail (w - c v)
        kd = T * T * torch.where(keep, kd_rows, 0.0).sum() / count
    q = log_q.exp_() if q_out is None else torch.exp(log_q, out=q_out)
    # Three distinct outputs (an autograd Function may not return one tensor twice).
    loss = (ce.clone() if known(kd_weight, 0) else kd.clone() if known(kd_weight, 1)
            else (1 - kd_weight) * ce + kd_weight * kd)
    return loss, ce, kd, (q, q_t, p, safe_labels, keep, count, idx, ratio, sid, sample_p)


def backward_rows(saved: tuple, temperature: float | Tensor, kd_weight: float | Tensor, g_loss: Tensor | float,
                  g_ce: Tensor | float, g_kd: Tensor | float) -> Tensor:
    """The gradient wrt the student logits (fp32, in the saved softmax's buffer: ``saved``
    is spent) for output gradients ``g_loss``, ``g_ce``, ``g_kd``."""
    q, q_t, p, safe_labels, keep, count, idx, ratio, sid, sample_p = saved
    a, T = kd_weight, temperature
    # Each output's weight on the CE and KD parts; unused outputs arrive as zeros.
    w_ce = ((1 - a) * g_loss + g_ce) / count
    grad = q.mul_(w_ce)  # (N, V), in q's buffer: q - onehot(y)
    grad.scatter_add_(-1, safe_labels, (-w_ce).expand(safe_labels.shape).contiguous())
    if q_t is not None:
        w_kd = (a * g_loss + g_kd) * T / count  # d(T^2 KL)/ds = T (q_T - p_T)
        if ratio is not None:  # buckets: T q (1 - r) everywhere, then T (q r - p) on S
            grad.addcmul_(q_t, w_kd * (1 - ratio))
            grad.scatter_add_(-1, idx, (q_t.gather(-1, idx) * ratio - p) * w_kd)
            if sid is not None:  # the sampled tail with its control variate
                grad.scatter_add_(-1, sid, sample_p * -w_kd)
        else:
            grad.addcmul_(q_t, w_kd)
            if idx is None:
                grad.addcmul_(p, -w_kd)
            else:
                grad.scatter_add_(-1, idx, p * -w_kd)
    grad.masked_fill_(~keep.unsqueeze(-1), 0.0)  # masked rows: whatever they held, no gradient
    return grad


class FusedForwardKL(torch.autograd.Function):
    """``(loss, ce, kd)`` of ``(1 - a) CE + a T^2 KL(p_T || q_T)`` over unmasked rows.

    Inputs: student logits (N, V) any float dtype; labels (N,) int64 with ``-100`` masked;
    the teacher as dense logits (N, V) or as ``idx``/``val`` (N, k); ``temperature`` T > 0;
    ``kd_weight`` a in [0, 1] (0: CE only, the teacher is never read); ``tail_lse`` (N,)
    for the compact format's k + 1 buckets, or None; ``count`` the divisor of the sums
    (None: this call's unmasked rows); ``target`` (N, k + S) an explicit head + sampled-tail
    target at ``idx`` with the exact log-probs in ``val``, and ``sample_log_r`` (N, S) its
    samples' log proposal weights, for the control variate. Outputs are fp32 scalars; the
    gradient flows to the student logits only (the teacher is a target).
    """

    @staticmethod
    def forward(ctx, student: Tensor, labels: Tensor, teacher: Tensor | None, idx: Tensor | None,
                val: Tensor | None, temperature: float | Tensor, kd_weight: float | Tensor,
                tail_lse: Tensor | None = None, count: Tensor | None = None,
                target: Tensor | None = None, sample_log_r: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        loss, ce, kd, saved = forward_rows(student, labels, teacher, idx, val, temperature, kd_weight, tail_lse,
                                           count, target, sample_log_r)
        ctx.save_for_backward(*saved)
        ctx.temperature, ctx.kd_weight, ctx.student_dtype = temperature, kd_weight, student.dtype
        return loss, ce, kd

    @staticmethod
    def backward(ctx, g_loss: Tensor, g_ce: Tensor, g_kd: Tensor):
        grad = backward_rows(ctx.saved_tensors, ctx.temperature, ctx.kd_weight, g_loss, g_ce, g_kd)
        return grad.to(ctx.student_dtype), None, None, None, None, None, None, None, None, None, None
