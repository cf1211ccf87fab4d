"""Distillation losses: pure tensor functions, fp32 math, ``-100`` masking, top-k sparse.

The objective of the method (Hinton et al., 2015), per unmasked token::

    loss = (1 - kd_weight) * CE(student, label) + kd_weight * T^2 * D(p_T, q_T)

with ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)`` and ``D`` one of
:data:`DIVERGENCES`. The ``T^2`` keeps the gradient of the soft term comparable across
temperatures: the gradient of ``D`` wrt the student logits shrinks like ``1 / T^2`` as T
grows (``tests/test_losses.py`` checks the high-T limit).

Conventions (``p`` = teacher, ``q`` = student, sums over the vocabulary):

- ``forward_kl``  KL(p || q) = sum p log(p / q)                 (Hinton's method)
- ``reverse_kl``  KL(q || p) = sum q log(q / p)
- ``jsd``         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
                  (beta weights the teacher, as in TRL's generalized JSD; beta = 0.5 is
                  the symmetric JSD, bounded by log 2)
- ``skew_kl``     KL(p || alpha p + (1 - alpha) q)             (DistiLLM; alpha = 0 is
                  forward KL; bounded by -log(alpha) for alpha > 0)
- ``tvd``         0.5 sum |p - q|

Teacher targets come either dense, ``teacher_logits`` (B, T, V), or sparse, the
teacher's top-k raw logits ``topk_values`` (B, T, k) at ``topk_indices`` (B, T, k), as
the soft-label cache stores them. Sparse targets mean the *truncated teacher*
``p~ = softmax(topk_values / T)`` on the k kept tokens and 0 elsewhere; the student keeps
its full-vocabulary ``q = softmax(student / T)``, gathered at the k indices, plus its
tail mass ``1 - q(S)`` outside the kept set S. Every sparse divergence is then the
dense divergence against ``p~`` computed exactly from those k + 1 numbers:

- forward KL, skew KL: the terms outside S vanish (p~ = 0 there). Forward KL equals
  ``KL(p~_S || q_S / q(S)) - log q(S)``: match the teacher's shape on S and put mass on S.
- JSD: outside S, m = (1 - beta) q, so those terms add ``(1 - beta) * tail * -log(1 - beta)``.
- TVD: outside S, |p~ - q| = q, so those terms add ``0.5 * tail``.
- reverse KL is infinite against p~ (q > 0 where p~ = 0), so the sparse version is the
  generalized KL between the two measures restricted to S,
  ``sum_S [q log(q / p~) - q + p~] = sum_S q log(q / p~) + tail``: >= 0, zero only when
  q = p~ on S (hence tail = 0), and the ordinary KL(q || p) once S is the whole vocabulary.

At ``k = V`` the tail is 0 and every sparse value and gradient equals the dense one up
to float rounding (the teacher's softmax over its k logits is then the full softmax).

With the compact format's ``topk_tail_lse`` (:mod:`kd.compact`: the log-partition of the
teacher's logits outside the k ids, on a grid of 1/T) the target is instead the *exact*
tempered teacher on k + 1 buckets (the kept ids and one tail bucket; the student's bucket
is its mass outside them), and every divergence is the ordinary one between those two
(k + 1)-bucket distributions. That is a lower bound of the full-vocabulary divergence
(the shape inside the tail is not supervised): bench/results/soft_labels_compact.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.compact import bucket_log_probs, interpolate, sampled_targets
from kd.losses_chunked import chunked_loss, should_chunk
from kd.losses_fused import FusedForwardKL, known

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")  # = kd.config.DIVERGENCES


class LossParts(NamedTuple):
    """The combined loss and its two parts, all fp32 scalars.

    ``loss = (1 - kd_weight) * ce + kd_weight * kd``; ``kd`` already includes ``T^2``.
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor


# ------------------------------------------------------------------ per-token divergences
# Each takes teacher and student log-probs over the same support (N, S) and the student's
# tail mass outside it (N,) (None for a dense support: zero tail) and returns (N,).


def _plog(p: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    """sum p * (log p - log r) over the last dim, with 0 * log 0 = 0.

    A -inf log-prob (a masked vocabulary entry, or an empty tail bucket) has p = 0 and
    log p - log r = -inf - -inf = NaN. The where goes on the *difference*, before the
    product: a where on the product would still send 0 * NaN = NaN into p's gradient
    (the unselected branch is differentiated too); the subtraction's backward only
    routes the zero it gets.
    """
    diff = torch.where(p > 0, log_p - log_r, 0.0)
    return (p * diff).sum(-1)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``logaddexp(a, b)`` whose gradient is 0, not NaN, where both are -inf.

    ``torch.logaddexp(-inf, -inf)`` is -inf with a NaN backward; the inner where feeds it
    finite stand-ins there and the outer one puts -inf back (with zero gradient).
    """
    empty = (a == -math.inf) & (b == -math.inf)
    out = torch.logaddexp(torch.where(empty, 0.0, a), torch.where(empty, 0.0, b))
    return torch.where(empty, -math.inf, out)


def _tail(tail: Tensor | None, scale: float) -> Tensor | float:
    return 0.0 if tail is None else scale * tail


def forward_kl(log_p: Tensor, log_q: Tensor, tail: Tensor | None = None) -> Tensor:
    """KL(p || q) per token.

    Args:
        log_p: teacher log-probs (N, S).
        log_q: student log-probs on the same support (N, S).
        tail: student mass outside the support (N,); forward KL does not need it
            (the teacher has no mass there).

    Returns:
        (N,) fp32.
    """
    return _plog(log_p.exp(), log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor, tail: Tensor | None = None) -> Tensor:
    """KL(q || p) per token; on a top-k support, the generalized KL on S (+ tail).

    Args:
        log_p: teacher log-probs (N, S).
        log_q: student log-probs on the same support (N, S).
        tail: student mass outside the support (N,) or None (dense).

    Returns:
        (N,) fp32.
    """
    return _plog(log_q.exp(), log_q, log_p) + _tail(tail, 1.0)


def jsd(log_p: Tensor, log_q: Tensor, tail: Tensor | None = None, beta: float = 0.5) -> Tensor:
    """Generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    Args:
        log_p: teacher log-probs (N, S).
        log_q: student log-probs on the same support (N, S).
        tail: student mass outside the support (N,) or None (dense).
        beta: weight of the teacher in the mixture, in (0, 1).

    Returns:
        (N,) fp32.
    """
    # log m by logsumexp: p and q can both be tiny where exp would underflow.
    log_m = _logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    body = beta * _plog(log_p.exp(), log_p, log_m) + (1 - beta) * _plog(log_q.exp(), log_q, log_m)
    return body + _tail(tail, -(1 - beta) * math.log1p(-beta))


def skew_kl(log_p: Tensor, log_q: Tensor, tail: Tensor | None = None, alpha: float = 0.1) -> Tensor:
    """Skew KL: KL(p || alpha p + (1 - alpha) q).

    Args:
        log_p: teacher log-probs (N, S).
        log_q: student log-probs on the same support (N, S).
        tail: student mass outside the support (N,); not needed (p is 0 there).
        alpha: skew towards the teacher, in [0, 1); 0 is forward KL.

    Returns:
        (N,) fp32.
    """
    if alpha == 0:  # the mixture is q itself (and math.log(0) would raise)
        return forward_kl(log_p, log_q)
    log_mix = _logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    return _plog(log_p.exp(), log_p, log_mix)


def tvd(log_p: Tensor, log_q: Tensor, tail: Tensor | None = None) -> Tensor:
    """Total variation distance 0.5 * sum |p - q| per token.

    Args:
        log_p: teacher log-probs (N, S).
        log_q: student log-probs on the same support (N, S).
        tail: student mass outside the support (N,) or None (dense).

    Returns:
        (N,) fp32.
    """
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1) + _tail(tail, 0.5)


def divergence_per_token(
    divergence: str,
    log_p: Tensor,
    log_q: Tensor,
    tail: Tensor | None = None,
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Dispatch by name to one of :data:`DIVERGENCES`; shapes as in :func:`forward_kl`."""
    if divergence == "forward_kl":
        return forward_kl(log_p, log_q, tail)
    if divergence == "reverse_kl":
        return reverse_kl(log_p, log_q, tail)
    if divergence == "jsd":
        return jsd(log_p, log_q, tail, beta=jsd_beta)
    if divergence == "skew_kl":
        return skew_kl(log_p, log_q, tail, alpha=skew_alpha)
    if divergence == "tvd":
        return tvd(log_p, log_q, tail)
    raise ValueError(f"divergence={divergence!r} is not allowed: choose one of {', '.join(DIVERGENCES)}")


# ------------------------------------------------------------------------ the entry point


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy over unmasked positions, in fp32.

    Args:
        logits: (B, T, V) or (N, V), any float dtype.
        labels: (B, T) or (N,) int; ``ignore_index`` marks masked positions.

    Returns:
        fp32 scalar; 0 (not NaN) when every position is masked. A masked row may hold
        anything (inf included) without changing the value or putting NaN in the gradient.
    """
    labels = labels.reshape(-1)
    if ignore_index != IGNORE_INDEX:
        labels = torch.where(labels == ignore_index, IGNORE_INDEX, labels)
    return FusedForwardKL.apply(logits.reshape(-1, logits.shape[-1]), labels, None, None, None, 1.0, 0.0, None, None)[1]


def _check_args(temperature: float | Tensor, kd_weight: float | Tensor, divergence: str, jsd_beta: float,
                skew_alpha: float) -> None:
    # A 0-d tensor is a compiled step's runtime scalar (kd.step), checked as a float there:
    # reading its value here would break the traced graph.
    if not isinstance(temperature, Tensor) and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not allowed: must be > 0")
    if not isinstance(kd_weight, Tensor) and not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight={kd_weight!r} is not allowed: must be in [0, 1]")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not allowed: choose one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta={jsd_beta!r} is not allowed: must be in (0, 1)")
    if divergence == "skew_kl" and not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha={skew_alpha!r} is not allowed: must be in [0, 1)")


def _student_tail_log_mass(log_q_full: Tensor, idx: Tensor) -> Tensor:
    """log of the student's mass outside the kept ids (N,), differentiable, -inf when empty.

    By logsumexp over the ids outside S (not log(1 - sum_S q), which cancels when the
    tail is small); a row with no finite logit outside S gets -inf with a zero gradient.
    """
    outside = torch.ones_like(log_q_full, dtype=torch.bool).scatter_(-1, idx, False)
    masked = log_q_full.masked_fill(~outside, -math.inf)  # (N, V)
    empty = (masked == -math.inf).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, 0.0, masked), dim=-1)
    return torch.where(empty.squeeze(-1), -math.inf, lse)


def _teacher_student_log_probs(
    student: Tensor,
    temperature: float,
    teacher_logits: Tensor | None,
    topk_indices: Tensor | None,
    topk_values: Tensor | None,
    tail_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Tempered log-probs on a common support, for the (N, V) rows already selected.

    Returns:
        log_p (N, S), log_q (N, S) and the student's tail mass (N,) or None when the
        support is a whole distribution (dense, or the k + 1 buckets of ``tail_lse``).
    """
    log_q_full = F.log_softmax(student.float() / temperature, dim=-1)  # (N, V)
    if teacher_logits is not None:
        return F.log_softmax(teacher_logits.float() / temperature, dim=-1), log_q_full, None
    log_q = log_q_full.gather(-1, topk_indices.long())  # (N, k)
    if tail_lse is not None:  # the exact teacher on k + 1 buckets: a dense divergence on them
        log_p, log_p_tail = bucket_log_probs(topk_values, tail_lse, temperature)
        log_q_tail = _student_tail_log_mass(log_q_full, topk_indices.long())
        return torch.cat([log_p, log_p_tail[:, None]], -1), torch.cat([log_q, log_q_tail[:, None]], -1), None
    log_p = F.log_softmax(topk_values.float() / temperature, dim=-1)  # (N, k)
    # Student mass off the teacher's kept set; clamp the rounding at k = V (1 - 1.0000001).
    tail = (1.0 - log_q.exp().sum(-1)).clamp(min=0.0)
    return log_p, log_q, tail


def _check_targets(student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None,
                   topk_indices: Tensor | None, topk_values: Tensor | None, topk_tail_lse: Tensor | None,
                   kd_weight: float | Tensor) -> None:
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not line up: "
            "expected logits (B, T, V) and labels (B, T)"
        )
    if known(kd_weight, 0):
        return
    sparse = topk_indices is not None or topk_values is not None
    if teacher_logits is None and not sparse:
        raise ValueError(
            f"kd_weight={kd_weight} needs teacher targets: pass teacher_logits (B, T, V) or "
            "topk_indices and topk_values (B, T, k), or set kd_weight=0 for cross-entropy only"
        )
    if teacher_logits is not None and sparse:
        raise ValueError("pass either teacher_logits or topk_indices/topk_values, not both")
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                f"{tuple(student_logits.shape)} differ; when only the vocabulary size differs "
                "(padded embedding rows), cut both to the tokenizer length: logits[..., :len(tokenizer)]"
            )
        return
    if topk_indices is None or topk_values is None:
        raise ValueError("sparse teacher targets need both topk_indices and topk_values")
    if topk_indices.shape != topk_values.shape or topk_indices.shape[:-1] != labels.shape:
        raise ValueError(
            f"topk_indices {tuple(topk_indices.shape)} and topk_values {tuple(topk_values.shape)} "
            f"must both be (B, T, k) with (B, T) = {tuple(labels.shape)}"
        )
    if topk_tail_lse is not None and topk_tail_lse.shape[:-1] != labels.shape:
        raise ValueError(f"topk_tail_lse {tuple(topk_tail_lse.shape)} must be (B, T, G) with (B, T) = "
                         f"{tuple(labels.shape)}")


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    topk_indices: Tensor | None = None,
    topk_values: Tensor | None = None,
    topk_tail_lse: Tensor | None = None,
    topk_tail_slope: Tensor | None = None,
    tail_betas: tuple[float, ...] | None = None,
    tail_sample_indices: Tensor | None = None,
    tail_sample_values: Tensor | None = None,
    proposal_temperature: float | None = None,
    temperature: float | Tensor,
    kd_weight: float | Tensor,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    check_indices: bool = True,
    chunk_tokens: int | None = None,
) -> LossParts:
    """``(1 - kd_weight) * CE + kd_weight * T^2 * D(teacher_T, student_T)``, masked means.

    Args:
        student_logits: (B, T, V), aligned so ``student_logits[:, t]`` predicts
            ``labels[:, t]``; any float dtype (the math runs in fp32).
        labels: (B, T) int; ``-100`` positions are excluded from both CE and KD.
        teacher_logits: dense teacher logits (B, T, V) with the student's V.
        topk_indices: sparse teacher targets, token ids (B, T, k), instead of
            ``teacher_logits``.
        topk_values: the teacher's raw (untempered) logits at those ids (B, T, k), e.g. fp16.
        topk_tail_lse: the compact format (:mod:`kd.compact`): the log-partition of the
            teacher's logits outside the k ids at the inverse temperatures ``tail_betas``
            (B, T, G). With it the teacher is exact on k + 1 buckets; without it, the
            truncated teacher (renormalised over its k logits).
        topk_tail_slope: its slopes (B, T, G), to interpolate between grid points.
        tail_betas: the grid's inverse temperatures (G,), ascending.
        tail_sample_indices: the compact format's sampled tail (:func:`kd.compact.sample_tail`):
            ids (B, T, S) drawn from the teacher's tail at ``proposal_temperature``; with
            them the tail's shape is estimated by importance weights (forward KL only).
        tail_sample_values: the teacher's raw logits at those ids (B, T, S).
        proposal_temperature: the temperature the samples were drawn at.
        temperature: T > 0, applied to teacher and student alike. A 0-d tensor (a
            compiled step's runtime input, :mod:`kd.step`) is taken as it is, unchecked,
            except with the compact format's tail, whose grid lookup needs a float.
        kd_weight: in [0, 1]; 0 never reads the teacher tensors (they may be None). A 0-d
            tensor likewise, and is taken as above 0.
        divergence: one of :data:`DIVERGENCES`.
        jsd_beta: teacher weight in the JSD mixture, in (0, 1).
        skew_alpha: teacher weight in the skew-KL mixture, in [0, 1).
        check_indices: check that ``topk_indices`` lie in [0, V) (a host sync); callers
            that checked their soft labels once pass False.
        chunk_tokens: compute in chunks of this many tokens, forward and backward
            (:mod:`kd.losses_chunked`: memory bounded by the chunk); None = automatic
            (chunks once B * T * V passes :data:`kd.losses_chunked.AUTO_CHUNK_ELEMENTS`),
            0 = never.

    Returns:
        :class:`LossParts` ``(loss, ce, kd)`` of fp32 scalars; ``kd`` includes ``T^2``
        and is a 0 tensor when ``kd_weight == 0``. An all-masked batch gives zeros with
        finite (zero) gradients.

    Raises:
        ValueError: a knob out of range, teacher targets missing or given twice, a
            temperature outside the compact grid, or shapes that do not line up
            (different vocabularies, token ids past V).
    """
    _check_args(temperature, kd_weight, divergence, jsd_beta, skew_alpha)
    if isinstance(temperature, Tensor) and topk_tail_lse is not None:
        raise ValueError("temperature as a tensor is not allowed with topk_tail_lse: the compact grid's "
                         "interpolation needs it as a float")
    # Runtime scalars in the loss's own precision, as a Python float is used there.
    temperature = temperature.float() if isinstance(temperature, Tensor) else temperature
    kd_weight = kd_weight.float() if isinstance(kd_weight, Tensor) else kd_weight
    _check_targets(student_logits, labels, teacher_logits, topk_indices, topk_values, topk_tail_lse, kd_weight)
    vocab = student_logits.shape[-1]
    n = labels.numel()
    student = student_logits.reshape(n, vocab)
    labels = labels.reshape(-1)
    teacher = idx = val = tail = target = sample_log_r = None
    if not known(kd_weight, 0):
        keep = labels != IGNORE_INDEX
        teacher = None if teacher_logits is None else teacher_logits.reshape(n, vocab)
        if topk_indices is not None:
            # A masked row's ids may be anything: point them at token 0 so gather stays in range.
            idx = torch.where(keep.unsqueeze(-1), topk_indices.reshape(n, -1).long(), 0)
            val = topk_values.reshape(n, -1)
            if check_indices:
                _check_ids(idx, vocab)
        if topk_tail_lse is not None and idx is not None:
            if tail_betas is None:
                raise ValueError("topk_tail_lse needs tail_betas, the grid's inverse temperatures")
            slope = None if topk_tail_slope is None else topk_tail_slope.reshape(n, -1)
            tail = interpolate(topk_tail_lse.reshape(n, -1), slope, tuple(tail_betas), 1.0 / temperature)
            tail = torch.where(keep, tail, 0.0)  # masked rows may hold anything
        if tail_sample_indices is not None:
            idx, val, target, sample_log_r = _sampled_slots(idx, val, tail, keep, tail_sample_indices,
                                                            tail_sample_values, proposal_temperature, temperature,
                                                            divergence, n)
            tail = None
            if check_indices:  # the drawn ids too
                _check_ids(idx, vocab)

    args = (temperature, kd_weight, divergence, jsd_beta, skew_alpha)
    if should_chunk(chunk_tokens, n, vocab):
        return chunked_loss(student, labels, teacher, idx, val, tail, args, chunk_tokens, target, sample_log_r)
    return loss_rows(student, labels, teacher, idx, val, tail, *args, target=target, sample_log_r=sample_log_r)


def _sampled_slots(idx: Tensor | None, val: Tensor | None, tail: Tensor | None, keep: Tensor, sample_idx: Tensor,
                   sample_val: Tensor | None, proposal_temperature: float | None, temperature: float,
                   divergence: str, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(slot ids (N, k + S), exact log p_T per slot, target per slot, the samples' log
    proposal weights (N, S)) of head + sampled tail."""
    if tail is None or idx is None or val is None:
        raise ValueError("tail samples need the compact format: topk_indices, topk_values and topk_tail_lse")
    if sample_val is None or sample_val.shape != sample_idx.shape or sample_idx.numel() != n * sample_idx.shape[-1]:
        raise ValueError(f"tail_sample_indices {tuple(sample_idx.shape)} need tail_sample_values of the same "
                         "shape (B, T, S)")
    if divergence != "forward_kl":
        raise ValueError(f"divergence={divergence!r} is not allowed with a sampled tail: importance weights "
                         "estimate E_p[.] terms, i.e. forward_kl only; use forward_kl or a cache without tail samples")
    if not (proposal_temperature and proposal_temperature > 0):
        raise ValueError(f"proposal_temperature={proposal_temperature!r} is not allowed: a sampled tail needs the "
                         "temperature (> 0) it was drawn at")
    sid = torch.where(keep.unsqueeze(-1), sample_idx.reshape(n, -1).long(), 0)
    target, log_p, log_r = sampled_targets(val, tail, sample_val.reshape(n, -1), temperature, proposal_temperature)
    return torch.cat([idx, sid], -1), log_p, target, log_r


def _check_ids(idx: Tensor, vocab: int) -> None:
    # A host sync buys a readable error instead of a CUDA device-side assert; the
    # training loop checks its soft labels once instead (check_indices=False).
    lo, hi = torch.stack(torch.aminmax(idx)).tolist() if idx.numel() else (0, 0)
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"topk_indices hold token ids in [{lo}, {hi}] but the student has "
            f"{vocab} logits: teacher and student must share a tokenizer; cut the student's logits "
            "to the tokenizer length (logits[..., :len(tokenizer)]) and rebuild the soft labels with it"
        )


def loss_rows(student: Tensor, labels: Tensor, teacher: Tensor | None, idx: Tensor | None, val: Tensor | None,
              tail: Tensor | None, temperature: float | Tensor, kd_weight: float | Tensor, divergence: str,
              jsd_beta: float, skew_alpha: float, count: Tensor | None = None, target: Tensor | None = None,
              sample_log_r: Tensor | None = None) -> LossParts:
    """The loss on (N, V) rows whose targets are checked: teacher (N, V) or idx/val (N, k)
    (+ tail (N,), B(1/T)); masked rows (label -100) stay in and are zeroed by weights.
    ``count`` divides the sums (default: this batch's unmasked rows; a chunk passes the
    whole batch's). ``target`` (N, m): an explicit sparse target at ``idx`` with the
    teacher's exact log-probs in ``val`` (forward KL only: :func:`_sampled_slots`); with
    ``sample_log_r`` (N, S) its last S slots are tail samples and the gradient takes the
    control variate of :mod:`kd.losses_fused`."""
    if count is None:
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    if known(kd_weight, 0):  # cross-entropy only: the teacher tensors are never read
        return LossParts(*FusedForwardKL.apply(student, labels, None, None, None, temperature, 0.0, None, count))
    if divergence == "forward_kl":  # Hinton's loss, the default: one fused node (kd.losses_fused)
        return LossParts(*FusedForwardKL.apply(student, labels, teacher, idx, val, temperature, kd_weight, tail,
                                               count, target, sample_log_r))
    keep = labels != IGNORE_INDEX
    ce = FusedForwardKL.apply(student, labels, None, None, None, 1.0, 0.0, None, count)[1]
    # Masked rows may hold anything (padding, inf): replace them by zeros before the (N, V)
    # math, so neither the value nor a gradient (0 * NaN in a softmax backward) sees them.
    rows = keep.unsqueeze(-1)
    student = torch.where(rows, student, 0.0)
    teacher = None if teacher is None else torch.where(rows, teacher, 0.0)
    val = None if val is None else torch.where(rows, val, 0.0)
    log_p, log_q, tail_q = _teacher_student_log_probs(student, temperature, teacher, idx, val, tail)
    per_token = divergence_per_token(divergence, log_p, log_q, tail_q, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    # The T^2 of the method: undo the 1/T^2 the tempered softmax puts on the gradients.
    kd = temperature**2 * torch.where(keep, per_token, 0.0).sum() / count
    if known(kd_weight, 1):
        return LossParts(kd, ce, kd)
    return LossParts((1 - kd_weight) * ce + kd_weight * kd, ce, kd)
